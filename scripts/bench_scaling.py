"""Step time with 1, 2, 4 rollout workers and 1, 2 learners (data-parallel DeepSpeed ranks).

On a cluster each added rollout worker or learner brings its own accelerator. On one CPU
machine they only split the same cores, so this script shows where adding actors stops
helping: it prints ``os.cpu_count()``, the torch threads it gives every actor, each
configuration's mean step time after the warm-up step, the speed-up over one rollout worker
and one learner, and "cores busy" (CPU seconds used by the whole process tree per wall-clock
second over the timed steps). When cores busy reaches ``os.cpu_count()`` the cores are
saturated and more actors cannot make a step faster.

Threads (``--threads-mode split``, the default): the cores are split between the actors of a
role, ``torch_threads = max(1, cpu_count // workers)`` for rollout workers and learners (so 4
rollout workers on 2 cores get 1 thread each, not 4 x 2); the teacher keeps ``--threads``.
``--threads-mode fixed`` gives every actor ``--threads``.

Default grid: rollout workers 1, 2, 4 with 1 learner, and 2 learners with 1 rollout worker;
``--full-grid`` runs every combination. ``prompts_per_step`` must be divisible by
rollout workers x learners (configurations that are not are skipped and say so).

    .venv/bin/python scripts/bench_scaling.py                        # SmolLM2-135M
    .venv/bin/python scripts/bench_scaling.py --tiny --steps 3       # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def grid(rollouts: list[int], learners: list[int], full: bool) -> list[tuple[int, int]]:
    if full:
        return [(r, l) for l in learners for r in rollouts]
    cells = [(r, learners[0]) for r in rollouts]
    cells += [(rollouts[0], l) for l in learners[1:]]
    return cells


def threads_for(args: argparse.Namespace, workers: int) -> int:
    cores = os.cpu_count() or 1
    return args.threads if args.threads_mode == "fixed" else max(1, cores // workers)


def main(argv: list[str] | None = None) -> int:
    ap = bc.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    ap.add_argument("--rollout-workers", default="1,2,4", help="rollout.num_workers values")
    ap.add_argument("--learners", default="1,2", help="learner.num_workers values")
    ap.add_argument("--full-grid", action="store_true", help="every (rollout workers, learners) pair")
    ap.add_argument("--threads-mode", choices=["split", "fixed"], default="split")
    ap.add_argument("--staleness", type=int, default=0, help="schedule.max_staleness for every configuration")
    args = ap.parse_args(argv)
    model, info, root = bc.begin(args, "scaling rollout workers and learners on one machine")
    cores = os.cpu_count() or 1
    print(f"os.cpu_count() = {cores}; threads mode {args.threads_mode}", flush=True)

    configs, skipped = [], []
    for r, l in grid(ints(args.rollout_workers), ints(args.learners), args.full_grid):
        if args.prompts % (r * l):
            skipped.append(f"R{r}xL{l} (prompts {args.prompts} not divisible by {r * l})")
            continue
        configs.append((f"R{r}xL{l}", {
            "rollout.num_workers": r, "learner.num_workers": l, "schedule.max_staleness": args.staleness,
            "rollout.batch_size": args.prompts // r, "learner.micro_batch_size": args.prompts // l,
            "placement.rollout.torch_threads": threads_for(args, r),
            "placement.learner.torch_threads": threads_for(args, l),
            "placement.teacher.torch_threads": args.threads,
        }))
    for s in skipped:
        print(f"skipped {s}", flush=True)
    if not configs:
        print("no configuration to run", flush=True)
        return 1
    results, runs = bc.run_configs(args, model, root, configs)
    bc.shutdown_ray()

    base = results[0]
    con = bc.console()
    con.print(bc.results_table(f"scaling on {cores} CPU cores (first step excluded)", results, reference=base,
                               ref_label=f"vs {base.name}"))
    con.print(bc.phase_table("mean seconds per timed step, by phase (controller metrics)", results))
    from rich.table import Table

    table = Table(title="threads and saturation")
    for col in ("configuration", "threads rollout/teacher/learner", "total threads", "speed-up vs " + base.name,
                "cores busy", f"cores busy / {cores}"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for r in results:
        t = r.settings["threads"]
        n = (r.settings["rollout_workers"] * t["rollout"] + r.settings["teacher_workers"] * t["teacher"]
             + r.settings["learners"] * t["learner"])
        speed = base.mean_step_s / r.mean_step_s if r.ok and base.ok else None
        table.add_row(r.name, f"{t['rollout']}/{t['teacher']}/{t['learner']}", str(n), bc.fmt(speed) + "x" * (speed is not None),
                      bc.fmt(r.cores_busy), bc.fmt(r.cores_busy / cores if r.cores_busy is not None else None, ".0%"))
    con.print(table)

    ratios = {}
    for r in results[1:]:
        ratios[f"{r.name}_over_{base.name}_step_time"] = bc.ratio(f"{r.name}/{base.name} step time", r, base,
                                                                  note="< 1 means faster")
    print(saturation_verdict(results, cores), flush=True)
    print(f"load average at the end: {bc.loadavg()} (start {info['loadavg_start']})", flush=True)
    bc.write_json(args.json, {"info": info, "results": results, "runs": runs, "ratios": ratios, "skipped": skipped,
                              "cpu_count": cores, "loadavg_end": bc.loadavg()})
    return 0 if all(r.ok for r in results) else 1


def saturation_verdict(results: list[bc.Result], cores: int) -> str:
    """Where adding actors stops paying: the first step along each axis that is not >= 10% faster."""
    ok = {r.name: r for r in results if r.ok}
    lines = [f"saturation on {cores} cores:"]
    for axis, key in (("rollout workers", "rollout_workers"), ("learners", "learners")):
        other = "learners" if key == "rollout_workers" else "rollout_workers"
        row = sorted((r for r in ok.values() if r.settings[other] == min(x.settings[other] for x in ok.values())),
                     key=lambda r: r.settings[key])
        row = [r for i, r in enumerate(row) if i == 0 or r.settings[key] != row[i - 1].settings[key]]
        if len(row) < 2:
            continue
        prev = row[0]
        verdict = f"  {axis}: no saturation seen up to {row[-1].settings[key]}"
        for r in row[1:]:
            gain = prev.mean_step_s / r.mean_step_s
            if gain < 1.10:
                verdict = (f"  {axis}: saturated at {prev.settings[key]} - going to {r.settings[key]} changes the step "
                           f"time {gain:.2f}x ({prev.mean_step_s:.2f} s -> {r.mean_step_s:.2f} s; cores busy "
                           f"{bc.fmt(prev.cores_busy)} -> {bc.fmt(r.cores_busy)} of {cores})")
                break
            prev = r
        lines.append(verdict)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
