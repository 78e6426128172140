"""``all_reduce_sum``: 2 gloo ranks, and the copy-on-``.to`` behaviour of a GPU simulated on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdft_ray.distributed import all_reduce_sum


def _old_gpu_branch(local: float, device: str) -> float:
    """What ``LearnerWorker._normaliser`` ran on a GPU: reduce ``total.to(device)``, read ``total``."""
    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total.to(device))
    return float(total.item())


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = {"helper": all_reduce_sum([rank + 1.0, 10.0 * (rank + 1)], "cpu"),
                  "helper_tensor": all_reduce_sum(torch.tensor([0.5 * rank]), torch.device("cpu"))}
        # On CUDA, .to(device) always returns a new tensor: make the CPU do the same.
        to = torch.Tensor.to
        torch.Tensor.to = lambda self, *a, **k: to(self, *a, **k).clone()
        try:
            result["old_copying"] = _old_gpu_branch(rank + 1.0, "cpu")
            result["helper_copying"] = all_reduce_sum([rank + 1.0], "cpu")
        finally:
            torch.Tensor.to = to
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_all_reduce_sum_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["helper"] == [3.0, 30.0]
        assert res["helper_tensor"] == [0.5]
        assert res["helper_copying"] == [3.0]  # reads back the tensor it reduced
        assert res["old_copying"] == rank + 1.0  # the bug: each rank keeps its own count


def test_all_reduce_sum_without_a_process_group_is_the_identity():
    assert not dist.is_initialized()
    assert all_reduce_sum([2.0, 5.0], "cpu") == [2.0, 5.0]
    assert all_reduce_sum(torch.tensor(4), "cpu") == [4.0]
