"""Where each actor's memory goes after a few synchronous SDFT steps (issue 13, item 3).

Starts the run's role groups (``sdft_ray.groups.RunGroups``) on the given config, trains
``--steps`` steps (generate -> score -> train -> sync), then asks every actor for
``memory_report()`` (``sdft_ray/memory.py``): RSS, PSS, peak RSS, the library baseline (RSS when
the actor started, before any model loaded) and the tensors it holds by purpose (weights,
gradients, optimizer state, EMA; a colocated learner also its teacher module's own tensors); ``other`` is RSS minus baseline minus those tensors (allocator,
buffers kept from the last step). Memory numbers do not depend on the CPU load.

    .venv/bin/python scripts/memory_breakdown.py configs/quickstart.yaml --steps 3 [--set k=v] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLUMNS = ("rss", "pss", "peak_rss", "baseline_rss", "weights", "gradients", "optimizer", "ema", "teacher_weights",
           "other")


def measure(cfg, steps: int) -> list[dict]:
    import ray

    from sdft_ray.data import EpochSampler
    from sdft_ray.groups import RunGroups
    from sdft_ray.memory import process_memory
    from sdft_ray.roles import ColocatedRoleGroup
    from sdft_ray.runner import init_ray, prepare
    from sdft_ray.trajectory import PromptShard

    run = prepare(cfg)
    init_ray(cfg)
    sampler = EpochSampler(len(run.examples), cfg.schedule.seed)
    rows = []
    with RunGroups(cfg, run.model_folder, steps) as groups:
        for step in range(1, steps + 1):
            batch = groups.generate(PromptShard.of_examples(step, step, sampler.next_batch(cfg.schedule.prompts_per_step),
                                                            run.examples))
            groups.collect(batch)
            groups.train(batch)
            groups.sync(step)
        for name, group in (("rollout", groups.rollout), *groups.teachers.items()):
            group.drain()
            if isinstance(group, ColocatedRoleGroup):  # hosted by the learners: in their reports
                continue
            for i, report in enumerate(ray.get([m.handle.memory_report.remote() for m in group.members])):
                rows.append({"actor": f"{name} {i}", **report})
        for report in groups.learners.call("memory_report"):
            rows.append({"actor": f"learner {report.pop('rank')}", **report})
    rows.append({"actor": "driver", **process_memory()})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default=str(REPO / "configs" / "quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from sdft_ray.config import load_config

    cfg = load_config(args.config, [*args.overrides, "output.loggers=[jsonl]", "output.progress=off",
                                    "output.dir=/tmp/sdft-ray-memory-breakdown"])
    rows = measure(cfg, args.steps)
    table = Table(title=f"memory after {args.steps} synchronous steps, MiB ({args.config}; model.dtype {cfg.model.dtype})")
    table.add_column("actor")
    for c in COLUMNS:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(r["actor"], *(f"{r[c]:.0f}" if isinstance(r.get(c), (int, float)) else "-" for c in COLUMNS))
    Console(width=160).print(table)
    actors = [r for r in rows if r["actor"] != "driver"]
    print(f"sum over actors: RSS {sum(r['rss'] for r in actors):.0f} MiB, PSS {sum(r['pss'] for r in actors):.0f} MiB, "
          f"peak RSS {sum(r['peak_rss'] for r in actors):.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
