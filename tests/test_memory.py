"""sdft_ray/memory.py: the per-actor memory accounting of scripts/memory_breakdown.py, on hand-sized tensors."""

from __future__ import annotations

import json

import torch

from sdft_ray.memory import MiB, MemoryBaseline, optimizer_state_tensors, process_memory, tensor_bytes


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(256, dtype=torch.float32)  # 1024 bytes
    view = a.view(16, 16)  # the same storage (as tied embeddings share one)
    b = torch.zeros(128, dtype=torch.bfloat16)  # 256 bytes
    assert tensor_bytes([a, view, b, None]) * MiB == 1024 + 256
    assert tensor_bytes([]) == 0


def test_adamw_state_is_two_fp32_copies_and_a_step_counter():
    p = torch.nn.Parameter(torch.zeros(100))
    opt = torch.optim.AdamW([p])
    assert tensor_bytes(optimizer_state_tensors(opt)) == 0  # nothing before the first step
    p.grad = torch.ones(100)
    opt.step()
    # exp_avg and exp_avg_sq: 100 fp32 each; step: one fp32 scalar
    assert tensor_bytes(optimizer_state_tensors(opt)) * MiB == 2 * 400 + 4


def test_process_memory_and_the_remainder():
    now = process_memory()
    assert now["rss"] > 0 and now["pss"] > 0 and now["peak_rss"] >= now["rss"] - 1
    baseline = MemoryBaseline()
    held = torch.ones(64 * MiB // 4)  # 64 MiB, touched
    report = baseline.report(weights=tensor_bytes([held]))
    assert report["weights"] == 64
    # the tensor shows in RSS, so what is left unexplained stays well under its size
    assert report["rss"] - report["baseline_rss"] >= 60 and report["other"] < 32
    del held


def test_release_free_memory_returns_freed_heap_pages_to_the_os():
    """Freed blocks below the heap's top stay in the process (RSS unchanged after free); after
    release_free_memory() the OS has them back. Measured in a fresh interpreter."""
    import subprocess
    import sys

    code = """
import gc, json, sys
sys.path.insert(0, sys.argv[1])
from sdft_ray.memory import process_memory, release_free_memory
blocks = [bytearray(64 * 1024) for _ in range(3000)]   # 188 MiB of heap blocks, under the mmap threshold
for b in blocks:
    b[::4096] = bytes(len(b[::4096]))                  # touch every page
full = process_memory()["rss"]
top = blocks[-1:]                                       # the heap's top stays in use
del blocks; gc.collect()
freed = process_memory()["rss"]
ok = release_free_memory()
print(json.dumps([full, freed, process_memory()["rss"], ok]))
"""
    from sdft_ray.runner import REPO_ROOT

    full, freed, trimmed, ok = json.loads(subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], check=True,
                                                         capture_output=True, text=True).stdout)
    assert ok
    assert freed > full - 50  # free() alone kept (nearly) all of it
    assert trimmed < freed - 120  # MiB handed back
