"""Smoke test of the benchmark scripts: one script end to end on the tiny random model.

Benchmarks are scripts, not timed tests: this only checks that ``scripts/bench_sdft_vs_sft.py``
runs (Ray actors, SFT and SDFT configurations, tables) and prints its ratio line. Which
numbers it prints is not checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_sdft_vs_sft_tiny_prints_ratio(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_sdft_vs_sft.py"), "--tiny", "--steps", "2",
           "--prompts", "4", "--max-new-tokens", "8", "--no-pipelined", "--json", str(out),
           "--keep-output", str(tmp_path / "runs")]
    # A local Ray of its own (not a cluster named by RAY_ADDRESS).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert re.search(r"^ratio sdft/sft step time: \d+\.\d+x", proc.stdout, re.M), proc.stdout[-4000:]
    payload = json.loads(out.read_text())
    assert payload["ratios"]["sdft_over_sft_step_time"] > 0
    assert {r["name"] for r in payload["results"]} == {"sft", "sdft"}


def test_trl_phase_split_by_hand():
    """TRL's rows split a step like sdft-ray's time/* metrics, over the steps after the first:
    step i runs from end i-1 to end i; its generation and teacher seconds are the i-th entries."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_trl import trl_phase_means

    got = trl_phase_means([0.0, 10.0, 22.0], [3.0, 4.0, 5.0], [1.0, 2.0, 3.0])
    assert got == pytest.approx({"time/step": 11.0, "time/rollout_busy": 4.5, "time/teacher_busy": 2.5,
                                 "time/learner_busy": 4.0})
    # LoRA (teacher not a module of its own): the teacher's passes stay in learner_busy
    assert trl_phase_means([0.0, 10.0, 22.0], [3.0, 4.0, 5.0], None) == pytest.approx(
        {"time/step": 11.0, "time/rollout_busy": 4.5, "time/learner_busy": 6.5})
    assert trl_phase_means([0.0], [3.0], None) == {}
