"""Versioned weight sync between roles, behind one small transport interface.

The learner (rank 0) publishes named tensors as a ``WeightHandle``: a version number plus
whatever the transport needs to deliver them. Receivers (rollout engines, teacher scorers)
iterate the named tensors and copy them into their own model. Both transports pack parameters
into flat byte buckets (``bucket_mb`` each: one transfer per bucket, not one RPC per
parameter) so that a receiver streams them with bounded memory:

* ``object_store``: buckets are Ray objects; works everywhere, the default;
* ``collective``: buckets are broadcast from learner rank 0 over a sync group
  (:mod:`sdft_ray.collective`; gloo on CPU, NCCL between GPUs), no object-store copy.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


#: ``WeightHandle.transport`` of weights that stay in the learner's process (placement.mode colocated)
IN_PROCESS = "in_process"


@dataclass(frozen=True)
class WeightHandle:
    """A published set of weights: small enough to pass through the controller."""

    version: int
    kind: str  # "student" or "teacher"
    transport: str
    payload: tuple[Any, ...] = field(default=())  # transport-specific (object refs for the object store)
    num_bytes: int = 0
    num_tensors: int = 0


class WeightTransport(ABC):
    name: str

    @abstractmethod
    def publish(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, kind: str) -> WeightHandle:
        """Sender side: make ``named_tensors`` available to receivers."""

    @abstractmethod
    def receive(self, handle: WeightHandle) -> Iterator[tuple[str, torch.Tensor]]:
        """Receiver side: yield (name, CPU tensor) pairs of a handle."""


_ALIGN = 16  # every tensor starts at a multiple of this many bytes, so any dtype can view it


def pack_tensors(items: list[tuple[str, torch.Tensor]], device: torch.device | str = "cpu"
                 ) -> tuple[dict[str, Any], torch.Tensor]:
    """``(meta, flat)``: the tensors' bytes in one flat uint8 tensor on ``device`` (each starting
    at a multiple of 16 bytes) and what it takes to cut them out again (names, dtypes, shapes,
    offsets)."""
    tensors = [t.detach().to(device).contiguous() for _, t in items]
    offsets, size = [], 0
    for t in tensors:
        offsets.append(size)
        size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    flat = torch.zeros(size, dtype=torch.uint8, device=device)
    for t, offset in zip(tensors, offsets):
        raw = t.reshape(-1).view(torch.uint8)
        flat[offset : offset + raw.numel()] = raw
    meta = {"names": [n for n, _ in items], "dtypes": [_DTYPE_NAMES[t.dtype] for t in tensors],
            "shapes": [tuple(t.shape) for t in tensors], "offsets": offsets, "num_bytes": size}
    return meta, flat


def unpack_tensors(meta: dict[str, Any], flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Views into ``flat`` for every tensor that :func:`pack_tensors` described in ``meta``."""
    for name, dtype_name, shape, offset in zip(meta["names"], meta["dtypes"], meta["shapes"], meta["offsets"]):
        dtype = _NAME_DTYPES[dtype_name]
        count = int(np.prod(shape)) if shape else 1
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        yield name, flat[offset : offset + nbytes].view(dtype).view(shape)


def pack_bucket(items: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Pack tensors into one flat uint8 numpy buffer (zero-copy in Ray's object store)."""
    meta, flat = pack_tensors(items)
    return {**meta, "data": flat.numpy()}


def unpack_bucket(bucket: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    with warnings.catch_warnings():  # object-store arrays are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(np.asarray(bucket["data"]))
    yield from unpack_tensors(bucket, data)


def bucketize(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


class ObjectStoreTransport(WeightTransport):
    """Buckets in the Ray object store: works everywhere (CPU, GPU, across nodes)."""

    name = "object_store"

    def __init__(self, bucket_mb: float = 256.0):
        self.bucket_bytes = int(bucket_mb * 2**20)

    def publish(self, named_tensors, version, kind):
        import ray

        refs, total, count = [], 0, 0
        for bucket in bucketize(named_tensors, self.bucket_bytes):
            packed = pack_bucket(bucket)
            total += packed["data"].nbytes
            count += len(bucket)
            refs.append(ray.put(packed))
        return WeightHandle(version=version, kind=kind, transport=self.name, payload=tuple(refs),
                            num_bytes=total, num_tensors=count)

    def receive(self, handle):
        import ray

        for ref in handle.payload:  # one bucket in memory at a time
            yield from unpack_bucket(ray.get(ref))


class InProcessTransport(WeightTransport):
    """Same packing without Ray: for single-process use and unit tests."""

    name = "in_process"

    def publish(self, named_tensors, version, kind):
        buckets = tuple(pack_bucket(b) for b in bucketize(named_tensors, 2**62))
        return WeightHandle(version, kind, self.name, buckets, sum(b["data"].nbytes for b in buckets),
                            sum(len(b["names"]) for b in buckets))

    def receive(self, handle):
        for bucket in handle.payload:
            yield from unpack_bucket(bucket)


class FileTransport(WeightTransport):
    """A safetensors file on shared storage (checkpoint snapshots of what a role held)."""

    name = "file"

    def publish(self, named_tensors, version, kind, path: str | None = None):
        from safetensors.torch import save_file

        if path is None:
            raise ValueError("FileTransport.publish needs a path")
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in named_tensors}
        save_file(tensors, path, metadata={"version": str(version), "kind": kind})
        return WeightHandle(version, kind, self.name, (str(path),), sum(t.numel() * t.element_size() for t in tensors.values()),
                            len(tensors))

    def receive(self, handle):
        from safetensors import safe_open

        with safe_open(handle.payload[0], framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


class CollectiveTransport(WeightTransport):
    """Bucketed broadcast over a sync group (:mod:`sdft_ray.collective`): gloo on CPU, NCCL on GPUs.

    Two phases, because a broadcast needs the sender and every receiver at once:
    :meth:`publish` (learner rank 0, group rank 0) packs the weights into flat buckets in host
    memory and returns a handle with their layout only; then :meth:`send` and every receiver's
    :meth:`receive` run together (the controller issues both and waits). :meth:`send` moves one
    bucket at a time to the group's device (a GPU for NCCL), so the sender's accelerator never
    holds more than one bucket beyond its model. The packed buckets stay in host memory after
    sending (what the object store would hold) so that a restarted receiver, or a checkpoint
    snapshot, gets exactly what the group holds (:meth:`retained`).
    """

    name = "collective"

    def __init__(self, group: str | None = None, bucket_mb: float = 256.0):
        self.group = group
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._pending: list[torch.Tensor] = []
        self._retained: list[tuple[dict[str, Any], torch.Tensor]] | None = None
        self.published: tuple[int, str] | None = None  # (version, kind) of the retained weights

    def publish(self, named_tensors, version, kind):
        from sdft_ray.collective import get_group

        if self.group is None:
            raise ValueError("CollectiveTransport.publish needs the sync group's name")
        get_group(self.group)  # a clear error now if this process is not the group's sender
        metas, flats = [], []
        for bucket in bucketize(named_tensors, self.bucket_bytes):
            meta, flat = pack_tensors(bucket, "cpu")
            metas.append(meta)
            flats.append(flat)
        self._pending = flats
        self._retained = list(zip(metas, flats))
        self.published = (version, kind)
        return WeightHandle(version=version, kind=kind, transport=self.name, payload=(self.group, tuple(metas)),
                            num_bytes=sum(m["num_bytes"] for m in metas), num_tensors=sum(len(m["names"]) for m in metas))

    def send(self) -> int:
        """Broadcast the buckets of the last :meth:`publish` (sender side); returns the bytes sent."""
        from sdft_ray.collective import broadcast, get_group

        device = get_group(self.group).device
        sent = 0
        for flat in self._pending:
            broadcast(self.group, flat.to(device, non_blocking=False))  # a no-op on CPU groups
            sent += int(flat.numel())
        self._pending = []
        return sent

    def receive(self, handle):
        from sdft_ray.collective import broadcast, get_group

        group, metas = handle.payload
        device = get_group(group).device
        for meta in metas:  # one bucket in memory at a time
            flat = torch.empty(meta["num_bytes"], dtype=torch.uint8, device=device)
            broadcast(group, flat)
            yield from unpack_tensors(meta, flat)

    def retained(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of the last publish again (for a restarted receiver or a snapshot)."""
        if self._retained is None:
            raise RuntimeError(f"nothing was published on sync group {self.group!r} yet")
        return (pair for meta, flat in self._retained for pair in unpack_tensors(meta, flat))


TRANSPORTS: dict[str, type[WeightTransport]] = {
    CollectiveTransport.name: CollectiveTransport,
    ObjectStoreTransport.name: ObjectStoreTransport,
    InProcessTransport.name: InProcessTransport,
    FileTransport.name: FileTransport,
}


def get_transport(name: str) -> WeightTransport:
    try:
        return TRANSPORTS[name]()
    except KeyError:
        raise ValueError(f"unknown weight transport {name!r}; known: {sorted(TRANSPORTS)}") from None


@torch.no_grad()
def load_named_tensors(model: torch.nn.Module, named: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy named tensors into ``model``'s parameters (dtype/device cast); returns the count.

    Unknown names are an error; tied parameters are updated once through their shared tensor.
    """
    params = dict(model.named_parameters())
    count = 0
    for name, tensor in named:
        if name not in params:
            raise KeyError(f"weight sync: parameter {name!r} does not exist in the receiving model")
        target = params[name]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, model expects {tuple(target.shape)}")
        target.data.copy_(tensor.to(device=target.device, dtype=target.dtype))
        count += 1
    return count
