"""Versioned weight sync between roles, behind one small transport interface.

The learner (rank 0) publishes named tensors as a ``WeightHandle``: a version number plus
whatever the transport needs to deliver them. Receivers (rollout engines, teacher scorers)
iterate the named tensors and copy them into their own model. The object-store transport
packs parameters into flat byte buckets (``bucket_mb`` each: one object per bucket, not
one RPC per parameter) so that a receiver streams them with bounded memory.
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


def pack_bucket(items: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Pack tensors into one flat uint8 numpy buffer (zero-copy in Ray's object store)."""
    tensors = [t.detach().to("cpu").contiguous() for _, t in items]
    flat = torch.cat([t.view(-1).view(torch.uint8) for t in tensors]) if tensors else torch.empty(0, dtype=torch.uint8)
    return {
        "names": [n for n, _ in items],
        "dtypes": [_DTYPE_NAMES[t.dtype] for t in tensors],
        "shapes": [tuple(t.shape) for t in tensors],
        "data": flat.numpy(),
    }


def unpack_bucket(bucket: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    with warnings.catch_warnings():  # object-store arrays are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(np.asarray(bucket["data"]))
    offset = 0
    for name, dtype_name, shape in zip(bucket["names"], bucket["dtypes"], bucket["shapes"]):
        dtype = _NAME_DTYPES[dtype_name]
        count = int(np.prod(shape)) if shape else 1
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        yield name, data[offset : offset + nbytes].view(dtype).view(shape)
        offset += nbytes


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


TRANSPORTS: dict[str, type[WeightTransport]] = {
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
