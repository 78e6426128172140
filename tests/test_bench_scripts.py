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
