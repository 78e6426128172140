"""Collective reductions that read back the tensor they reduced, on every device.

``all_reduce(t.to(device))`` reduces a temporary when ``.to`` copies (any GPU) and leaves ``t``
as it was, while on the CPU ``.to("cpu")`` returns ``t`` itself and the same line works: CPU
tests pass, GPU runs divide by the local count. :func:`all_reduce_sum` has one code path for
every device: it moves the values once, reduces that tensor in place and reads that tensor
back, so a CPU (gloo) test runs exactly what a GPU (NCCL) run runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def all_reduce_sum(values: Sequence[float] | torch.Tensor, device: torch.device | str,
                   group: dist.ProcessGroup | None = None) -> list[float]:
    """Sum ``values`` (a few numbers: counts, loss sums) over the ranks of ``group`` (default: the
    default process group), in float64 on ``device`` (the backend's device: CUDA for NCCL, CPU
    for gloo). Without an initialised process group this process is the only rank and the
    values come back as they are. Returns python floats, the same on every rank."""
    reduced = torch.as_tensor(values, dtype=torch.float64).reshape(-1).to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced.cpu().tolist()
