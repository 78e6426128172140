"""Where an actor's memory goes: the process (RSS, PSS, peak RSS, the library baseline before any
model loaded) and the tensors it holds by purpose (weights, gradients, optimizer state, EMA).

Each role's actor answers ``memory_report()`` with :func:`process_memory` plus its own
:func:`tensor_bytes` lines; ``scripts/memory_breakdown.py`` prints them side by side, and the
remainder (RSS minus baseline minus the tensors) is what the allocator, activations of the last
step that it kept, and other buffers hold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
from collections.abc import Iterable

import torch

MiB = 2**20


def process_memory() -> dict[str, float]:
    """This process now: ``rss``, ``pss`` (shared pages split between their users; Linux
    ``smaps_rollup``) and ``peak_rss`` (``ru_maxrss``), in MiB."""
    out = {"rss": float("nan"), "pss": float("nan"),
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    out[key.lower()] = int(rest.split()[0]) / 1024
    except OSError:  # not Linux: RSS from the peak only
        pass
    return out


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> float:
    """MiB of the distinct storages behind ``tensors`` (a storage shared by two tensors, e.g. tied
    embeddings, counts once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total / MiB


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


class MemoryBaseline:
    """Records the process's memory when an actor starts (libraries imported, no model yet)."""

    def __init__(self) -> None:
        self.at_start = process_memory()

    def report(self, **tensors_mib: float) -> dict[str, float]:
        now = process_memory()
        accounted = sum(tensors_mib.values())
        return {"pid": os.getpid(), **now, "baseline_rss": self.at_start["rss"], **tensors_mib,
                "other": now["rss"] - self.at_start["rss"] - accounted}


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once per process (None without glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``): after a step's
    activations and logits are freed, glibc keeps them mapped, and an actor's RSS stays at its
    peak. Returns False where there is no glibc (nothing is done)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
