"""sdft_ray/memory.py: the per-actor memory accounting of scripts/memory_breakdown.py, on hand-sized tensors."""

from __future__ import annotations

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
