"""One small actor-group class for every role, placed on bundles of a placement group.

``ActorGroup`` starts N copies of a Ray actor class, each pinned to its own bundle, and
calls methods on all of them (returning ObjectRefs, never waiting). Rollout and teacher
groups use Ray's ``max_restarts`` so that a dead actor comes back with the same bundle;
the controller then pushes the current weights again and re-issues the lost work.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sdft_ray.config import ResourcesConfig


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


class SyncGroupMember:
    """Lets an actor join a weight sync group (:mod:`sdft_ray.collective`) on the controller's call."""

    def join_sync_group(self, name: str, master_addr: str, master_port: int, rank: int, world_size: int,
                        backend: str = "auto", timeout_s: float = 600.0) -> dict:
        from sdft_ray.collective import join_group

        return join_group(name, master_addr, master_port, rank, world_size, backend, timeout_s)

    def sync_group_token(self, name: str) -> str | None:
        from sdft_ray.collective import membership

        return membership(name)


class ActorGroup:
    def __init__(
        self,
        role: str,
        actor_cls: type,
        count: int,
        placement_group: PlacementGroup,
        first_bundle: int,
        resources: ResourcesConfig,
        make_args: Callable[[int], tuple[tuple, dict]],
        max_restarts: int = 0,
        custom_resources: dict[str, float] | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.role = role
        self.count = count
        self.resources = resources
        self.handles = []
        remote_cls = ray.remote(actor_cls) if not hasattr(actor_cls, "remote") else actor_cls
        for rank in range(count):
            args, kwargs = make_args(rank)
            handle = remote_cls.options(
                num_cpus=resources.num_cpus,
                num_gpus=resources.num_gpus,
                resources=custom_resources or None,
                max_restarts=max_restarts,
                max_task_retries=0,
                name=None,
                runtime_env=worker_runtime_env(resources, extra_env),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=placement_group,
                    placement_group_bundle_index=first_bundle + rank,
                ),
            ).remote(*args, **kwargs)
            self.handles.append(handle)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.handles[index]

    def call(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """Call ``method`` on every actor with the same arguments."""
        return [getattr(h, method).remote(*args, **kwargs) for h in self.handles]

    def kill(self) -> None:
        for h in self.handles:
            ray.kill(h, no_restart=True)
