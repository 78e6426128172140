"""SDFT vs SFT wall-clock per step, on the same learners, data, batch and machine, in one run.

The paper (Shenfeld et al. 2026) reports SDFT at roughly 4x the wall-clock of SFT (on-policy
generation plus a teacher forward pass per step). This script measures our ratio:

* ``sft``        - ``algorithm.variant: sft``: the learners train on the demonstrations (no
                   rollout, no teacher; ``teacher.kind: frozen`` so that no EMA is kept);
* ``sdft``       - synchronous SDFT (``schedule.max_staleness: 0``): rollout -> teacher scoring
                   -> learner step -> weight sync, every step;
* ``sdft-pipe1`` - pipelined SDFT (``max_staleness: 1``): the next batch is generated and
                   scored while the learners train; ``--pipe-threads`` torch threads per role
                   (default ``cpu_count // 3``: 1 on 2 cores, as the roles compute at once),
                   the others ``--threads`` (default ``cpu_count``; one role computes at a time).

Same learner count, micro-batch (the whole batch in one micro-batch), optimizer, lr, fp32 and
prompts per step in all three. SFT trains on the demonstration tokens (short answers, about
10-20 tokens); SDFT on up to ``--max-new-tokens`` sampled tokens; both tokens/s are printed.

    .venv/bin/python scripts/bench_sdft_vs_sft.py                    # SmolLM2-135M, 5 steps, 8 prompts, 32 tokens
    .venv/bin/python scripts/bench_sdft_vs_sft.py --tiny --steps 2    # smoke run (tiny random model)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = bc.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    ap.add_argument("--no-pipelined", action="store_true", help="skip the max_staleness=1 SDFT configuration")
    args = ap.parse_args(argv)
    model, info, root = bc.begin(args, "SDFT vs SFT: mean step time after the warm-up step")

    configs = [("sft", {"algorithm.variant": "sft", "teacher.kind": "frozen"}),
               ("sdft", {}),
               ("sdft-pipe1", {"schedule.max_staleness": 1})]
    if args.no_pipelined:
        configs = configs[:2]
    results, runs = bc.run_configs(args, model, root, configs)
    bc.shutdown_ray()
    by = {r.name: r for r in results}
    con = bc.console()
    con.print(bc.results_table("SDFT vs SFT (same learners, data, batch; first step excluded)", results,
                               reference=by["sft"], ref_label="vs sft"))
    con.print(bc.phase_table("mean seconds per timed step, by phase (controller metrics)", results))
    ratios = {
        "sdft_over_sft_step_time": bc.ratio("sdft/sft step time", by["sdft"], by["sft"],
                                            note="paper: SDFT ~4x the wall-clock of SFT"),
    }
    if "sdft-pipe1" in by:
        ratios["sdft_pipe1_over_sft_step_time"] = bc.ratio("sdft-pipe1/sft step time", by["sdft-pipe1"], by["sft"])
        ratios["sdft_over_sdft_pipe1_step_time"] = bc.ratio("sdft/sdft-pipe1 step time (pipelining speed-up)",
                                                            by["sdft"], by["sdft-pipe1"])
    ratios["sft_over_sdft_tokens_per_s"] = bc.ratio("sft/sdft trained tokens per s", by["sft"], by["sdft"],
                                                    field_name="tokens_per_s")
    return bc.finish(args.json, info, results, runs, ratios)


if __name__ == "__main__":
    sys.exit(main())
