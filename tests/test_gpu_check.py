"""``scripts/gpu_check.sh`` on the CPU (CUDA-only parts SKIP): it runs with only torch, numpy and
transformers importable, passes, and exits non-zero when a check fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict:
    return {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_check_passes_on_cpu_with_skips():
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert not [line for line in lines if line.startswith("FAIL")], out[-4000:]
    passed = [line for line in lines if line.startswith("PASS")]
    # 11 loss cases, the reduction helper, bf16 forward, the EMA, the rollout log-probs
    assert len(passed) == 15, "\n".join(lines)
    assert any(line.startswith("SKIP  scoring memory") for line in lines)
    assert any(line.startswith("SKIP  reduction old pattern") for line in lines)


@pytest.mark.timeout(120)
def test_gpu_check_fails_loudly_on_a_wrong_loss():
    """A loss 1 % off on the device makes its line FAIL and the exit status 1."""
    code = ("import runpy, sys, sdft_ray.losses as L\n"
            "orig = L.distillation_loss\n"
            "def off(*a, **k):\n"
            "    loss, m = orig(*a, **k)\n"
            "    return loss * 1.01, m\n"
            "L.distillation_loss = off\n"
            "sys.argv = ['gpu_check.py', '--device', 'cpu', '--only', 'loss']\n"
            "runpy.run_path('scripts/gpu_check.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**_env(), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.count("FAIL  loss") == 11, proc.stdout
