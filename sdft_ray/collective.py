"""Weight-broadcast process groups, separate from the learners' DeepSpeed group.

A *sync group* joins learner rank 0 (group rank 0, the sender) with the actors that receive
one kind of weights: the rollout workers (student weights) or the teacher scorers (teacher
weights). Each is a standalone ``torch.distributed`` process group built on its own
``TCPStore`` (hosted by the sender), so it needs no default process group and does not touch
the learners' DeepSpeed one: gloo moves CPU buffers (this machine, CI), NCCL moves GPU buffers
(clusters). :class:`sdft_ray.weights.CollectiveTransport` broadcasts bucketed weights over it.

Every member calls :func:`join_group` at the same time (the controller issues the calls
together and waits for all of them); joining again under the same name replaces the old
group, which is how the controller rebuilds a group after a member was restarted.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SyncGroup", "broadcast", "get_group", "join_group", "leave_group", "membership", "resolve_backend"]


@dataclass
class SyncGroup:
    name: str
    rank: int
    world_size: int
    backend: str
    device: torch.device
    process_group: Any
    store: Any  # keeps the TCPStore (and, on rank 0, its server) alive
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # this membership, to detect restarts


_GROUPS: dict[str, SyncGroup] = {}


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``nccl`` when this process sees a GPU, else ``gloo``."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"sync group backend must be auto, gloo or nccl, got {backend!r}")
    return backend


def join_group(name: str, master_addr: str, master_port: int, rank: int, world_size: int,
               backend: str = "auto", timeout_s: float = 600.0) -> dict[str, Any]:
    """Become ``rank`` of the sync group ``name`` (rank 0 hosts the store); blocks until all
    ``world_size`` members have joined. Returns a description of the membership."""
    from torch.distributed import PrefixStore, TCPStore

    backend = resolve_backend(backend)
    timeout = datetime.timedelta(seconds=timeout_s)
    leave_group(name)
    store = TCPStore(master_addr, int(master_port), world_size, is_master=rank == 0, timeout=timeout,
                     wait_for_workers=True, use_libuv=True)
    prefixed = PrefixStore(f"sdft_sync/{name}", store)
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        group = ProcessGroupGloo(prefixed, rank, world_size, timeout)
        device = torch.device("cpu")
    else:
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = ProcessGroupNCCL(prefixed, rank, world_size, options)
        device = torch.device("cuda", torch.cuda.current_device())
    member = _GROUPS[name] = SyncGroup(name, rank, world_size, backend, device, group, store)
    return {"group": name, "rank": rank, "world_size": world_size, "backend": backend, "device": str(device),
            "token": member.token}


def membership(name: str) -> str | None:
    """The token of this process's membership in ``name`` (None if not a member): a restarted
    actor has none, so the controller can rebuild the group before a broadcast would hang."""
    group = _GROUPS.get(name)
    return None if group is None else group.token


def get_group(name: str) -> SyncGroup:
    try:
        return _GROUPS[name]
    except KeyError:
        raise RuntimeError(f"this process is not in weight sync group {name!r}; joined: {sorted(_GROUPS)}") from None


def broadcast(name: str, tensor: torch.Tensor) -> None:
    """Broadcast ``tensor`` (on the group's device) in place from group rank 0."""
    group = get_group(name)
    group.process_group.broadcast(tensor, 0).wait()
    if group.device.type == "cuda":
        torch.cuda.current_stream().synchronize()


def leave_group(name: str) -> None:
    """Forget the group ``name`` in this process (a no-op if not a member)."""
    group = _GROUPS.pop(name, None)
    if group is not None and hasattr(group.process_group, "shutdown"):
        try:
            group.process_group.shutdown()
        except Exception:  # noqa: BLE001 - a peer may already be gone; nothing to release then
            pass
