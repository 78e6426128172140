"""What every role's actor shares: its process environment, thread caps, weight versions and
membership in a weight sync group. Groups of actors are made and driven by
:mod:`sdft_ray.roles` (rollout and teacher) and the learner group there."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

from sdft_ray.config import ResourcesConfig
from sdft_ray.errors import StaleActor


def worker_runtime_env(resources: ResourcesConfig, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Environment for a role's processes: CPU DeepSpeed when the role has no GPU, thread caps."""
    threads = str(resources.torch_threads or max(1, int(resources.num_cpus)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    if resources.num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("SDFT_RAY_CACHE", "HF_HUB_OFFLINE", "PYTHONPATH"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(extra_env or {})
    return {"env_vars": env}


def set_torch_threads(resources: dict | ResourcesConfig | None) -> None:
    import torch

    if resources is None:
        return
    if isinstance(resources, dict):
        resources = ResourcesConfig.model_validate(resources)
    torch.set_num_threads(resources.torch_threads or max(1, int(resources.num_cpus)))


class WeightHolder:
    """An actor that holds versioned weights (rollout workers, teacher scorers).

    ``ready()`` names this incarnation of the actor (a fresh id each time Ray starts it, so a
    restart is seen even when the actor was idle) and the weight version it holds. Every work call
    passes the incarnation and version it was sent for to :meth:`check_expected`, which refuses
    with :class:`~sdft_ray.errors.StaleActor` instead of working with other weights.
    """

    version: int = 0

    def start_incarnation(self) -> None:
        self.version = 0  # the model folder's weights
        self.incarnation = uuid.uuid4().hex
        self.weight_updates = 0

    def ready(self) -> dict[str, Any]:
        return {"incarnation": self.incarnation, "version": self.version, "weight_updates": self.weight_updates,
                "pid": os.getpid(), "host": socket.gethostname()}

    def check_expected(self, expect: tuple[str | None, int] | None) -> None:
        """``expect`` = (incarnation, weight version) the call was sent for; None = no check."""
        if expect is None:
            return
        incarnation, version = expect
        if version != self.version or (incarnation is not None and incarnation != self.incarnation):
            raise StaleActor(self.incarnation, self.version, incarnation, version)

    def loaded(self, version: int) -> int:
        self.version = version
        self.weight_updates += 1
        return version


class SyncGroupMember:
    """Lets an actor join a weight sync group (:mod:`sdft_ray.collective`) on the controller's call."""

    def join_sync_group(self, name: str, master_addr: str, master_port: int, rank: int, world_size: int,
                        backend: str = "auto", timeout_s: float = 600.0) -> dict:
        from sdft_ray.collective import join_group

        return join_group(name, master_addr, master_port, rank, world_size, backend, timeout_s)

    def sync_group_token(self, name: str) -> str | None:
        from sdft_ray.collective import membership

        return membership(name)
