"""Pipelined (``schedule.max_staleness`` 1 and 2) vs synchronous SDFT: step time and per-role utilisation.

With ``max_staleness: k`` the controller keeps up to ``k`` batches of rollout + teacher scoring
in flight while the learners train; 0 is the synchronous algorithm. On separate accelerators
this overlaps generation with training. On a CPU machine every role shares the same cores, so
the overlap can only fill the gaps (idle time in weight sync, object-store transfers,
Python overhead) and otherwise makes the roles compete: this script measures which.

Configurations (same model, data, batch, one run):

* ``sync-<T>t``  - max_staleness 0, ``--threads`` (T, default ``os.cpu_count()``) torch threads
  per role: only one role computes at a time, so each may use every core;
* ``pipe1-<P>t`` - max_staleness 1, ``--pipe-threads`` (P, default ``cpu_count // 3``, 1 on 2
  cores) per role: the three roles compute at the same time;
* ``pipe2-<P>t`` - max_staleness 2;
* with ``--thread-variants`` also ``pipe1-<T>t`` (pipelined with T threads each: more threads
  than cores) and ``sync-<P>t`` (synchronous with P threads), which separate the effect of
  pipelining from the effect of the thread count.

Prints mean step time after the warm-up step, the ratios to ``sync``, and each role's busy time
and busy share of wall-clock from the run summary (``summary["utilisation"]``: the whole
``Controller.run``, as the trainer prints it; ``--timed-utilisation`` restricts it to the
timed steps). A role's busy shares can add up to more than 100% only if roles overlap in time;
on shared cores overlapping roles each run slower, which the shares do not show - "cores busy"
(CPU seconds of the process tree per wall second) does.

    .venv/bin/python scripts/bench_pipeline.py                       # SmolLM2-135M
    .venv/bin/python scripts/bench_pipeline.py --tiny --steps 3      # smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = bc.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), steps=6)
    ap.add_argument("--staleness", default="1,2", help="comma-separated max_staleness values besides 0")
    ap.add_argument("--thread-variants", action="store_true",
                    help="also run max_staleness=1 with --threads per role and max_staleness=0 with --pipe-threads "
                         "per role, to separate the effect of pipelining from the effect of the thread count")
    ap.add_argument("--timed-utilisation", action="store_true",
                    help="utilisation over the timed steps only (busy time of the batches trained in those steps, "
                         "some of it generated before the window when pipelined: can exceed 100%%) instead of "
                         "summary['utilisation'] over the whole run")
    args = ap.parse_args(argv)
    model, info, root = bc.begin(args, "pipelined vs synchronous SDFT: mean step time after the warm-up step")

    stale = [int(k) for k in args.staleness.split(",") if k.strip()]
    T, P = args.threads, args.pipe_threads
    every = lambda n: {f"placement.{r}.torch_threads": n for r in ("rollout", "teacher", "learner")}  # noqa: E731
    configs = [(f"sync-{T}t", {"schedule.max_staleness": 0, **every(T)})]
    configs += [(f"pipe{k}-{P}t", {"schedule.max_staleness": k, **every(P)}) for k in stale]
    if args.thread_variants:
        if P != T:
            configs.append((f"pipe1-{T}t", {"schedule.max_staleness": 1, **every(T)}))
            configs.append((f"sync-{P}t", {"schedule.max_staleness": 0, **every(P)}))
    results, runs = bc.run_configs(args, model, root, configs)
    bc.shutdown_ray()

    by = {r.name: r for r in results}
    sync = results[0]
    con = bc.console()
    con.print(bc.results_table("pipelined vs synchronous SDFT (first step excluded)", results,
                               reference=sync, ref_label=f"vs {sync.name}"))
    con.print(bc.phase_table("mean seconds per timed step, by phase (controller metrics)", results))
    con.print(bc.utilisation_table(
        "per-role utilisation: " + ("timed steps only" if args.timed_utilisation else
                                    "summary['utilisation'], whole run incl. the warm-up step"),
        results, timed=args.timed_utilisation))
    ratios = {}
    for name, _ in configs[1:]:
        ratios[f"{name}_over_{sync.name}_step_time"] = bc.ratio(f"{name}/{sync.name} step time", by[name], sync,
                                                                note="< 1 means faster than synchronous")
    for r in results:
        if r.ok:
            stale_seen = [s for s in r.extra.get("staleness", []) if s is not None]
            print(f"  {r.name}: trajectory staleness per step {stale_seen}", flush=True)
    return bc.finish(args.json, info, results, runs, ratios)


if __name__ == "__main__":
    sys.exit(main())
