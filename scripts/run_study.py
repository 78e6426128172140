"""Run the small-scale continual-learning study end to end (SFT vs SDFT, lr sweep, curriculum).

    # the study in docs/study.md and the README (SmolLM2-135M-Instruct on CPU, lrs 1e-5 and 5e-5:
    # 35-50 min on a busy 2-core machine; results/study/ also has lr 2e-4: add --lrs 1e-5,5e-5,2e-4)
    .venv/bin/python scripts/run_study.py --out results/study

    # smoke run for tests: tiny random Llama + test tokenizer, 1 step per stage, 2 eval rows per kind
    .venv/bin/python scripts/run_study.py --quick --out /tmp/study-quick

Size flags override the study file (configs/study/smollm2.yaml): ``--steps 12,10`` (per stage,
or one value for all), ``--lrs 1e-5,5e-5``, ``--methods sft,sdft``, ``--eval-limit 40`` (rows
per task kind), ``--eval-max-new-tokens 32`` (every task), ``--set key=value`` (any study
field, e.g. ``--set train.schedule.prompts_per_step=4``). Training runs and checkpoints go to
``--work`` (default ``runs/study``); a rerun with the same ``--work`` reuses finished stages
(``--fresh`` starts over). Tables and the two PNG plots go to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _path in (str(REPO), str(REPO / "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-builds its CPU ops (deepspeed_shm_comm) into TORCH_EXTENSIONS_DIR. Several
# virtual environments sharing the default ~/.cache/torch_extensions rebuild it in turn (their
# compiler flags differ): give this interpreter its own folder so the build happens once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" /
                                                  ("sdft-ray-" + hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])))

DEFAULT_CONFIG = REPO / "configs" / "study" / "smollm2.yaml"
QUICK_CONFIG = REPO / "configs" / "study" / "quick.yaml"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", help=f"study YAML (default {DEFAULT_CONFIG.relative_to(REPO)}; "
                                              f"--quick: {QUICK_CONFIG.relative_to(REPO)})")
    ap.add_argument("--quick", action="store_true",
                    help="tiny random model with the test tokenizer, 1 step per stage, 2 eval rows per kind (tests)")
    ap.add_argument("--out", default=None, help="tables + plots (default results/study, --quick: runs/study-quick/out)")
    ap.add_argument("--work", default=None, help="training runs, checkpoints, samples (default runs/study[-quick])")
    ap.add_argument("--fresh", action="store_true", help="delete --work first instead of reusing finished stages")
    ap.add_argument("--model", help="model folder or embedded:<name> (overrides the study file)")
    ap.add_argument("--methods", help="comma list of variants, e.g. sft,sdft")
    ap.add_argument("--lrs", type=_floats, help="comma list of learning rates, e.g. 1e-5,5e-5")
    ap.add_argument("--steps", type=_ints, help="optimizer steps per stage: one value for all or one per stage")
    ap.add_argument("--prompts-per-step", type=int, help="schedule.prompts_per_step of every run")
    ap.add_argument("--eval-limit", type=int, help="first N eval rows of every kind of every task")
    ap.add_argument("--eval-max-new-tokens", type=int, help="max_new_tokens of every eval task")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a study field (dotted, YAML value); repeatable")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import yaml

    from sdft_ray.config import _set_dotted, parse_override
    from sdft_ray.errors import ConfigError
    from sdft_ray.study import run_study, study_from_dict

    config = Path(args.config) if args.config else (QUICK_CONFIG if args.quick else DEFAULT_CONFIG)
    work = Path(args.work or (REPO / "runs" / ("study-quick" if args.quick else "study")))
    out = Path(args.out or (work / "out" if args.quick else REPO / "results" / "study"))
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)

    tree = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    for item in args.overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    if args.quick:
        from conftest_tokenizer import make_test_tokenizer

        from sdft_ray.models import build_random_model

        folder = work / "tiny_model"
        if not (folder / "config.json").is_file():
            build_random_model(folder, make_test_tokenizer(), initializer_range=0.3)
        tree["model"] = str(folder)
    if args.model:
        tree["model"] = args.model
    if args.methods:
        tree["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.lrs:
        tree["lrs"] = args.lrs
    if args.steps:
        stages = tree.get("stages") or []
        if len(args.steps) not in (1, len(stages)):
            ap_error = f"--steps: give 1 value or {len(stages)} (one per stage), got {len(args.steps)}"
            print(f"error: {ap_error}", file=sys.stderr)
            return 2
        for i, stage in enumerate(stages):
            stage["steps"] = args.steps[i if len(args.steps) > 1 else 0]
    if args.prompts_per_step:
        tree.setdefault("train", {}).setdefault("schedule", {})["prompts_per_step"] = args.prompts_per_step
    if args.eval_limit:
        tree["eval_limit_per_kind"] = args.eval_limit
    if args.eval_max_new_tokens:
        tree["eval_max_new_tokens"] = {k: args.eval_max_new_tokens
                                       for k in (tree.get("eval_max_new_tokens") or {})} or {}
        if not tree["eval_max_new_tokens"]:
            from sdft_ray.evaluation import load_tasks

            tasks = load_tasks(REPO / tree.get("eval_tasks", "configs/eval/continual.yaml"))
            tree["eval_max_new_tokens"] = {t.name: args.eval_max_new_tokens for t in tasks}
    try:
        spec = study_from_dict(tree, str(config))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    (work / "study.yaml").write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    print(f"[study] {spec.model}: methods {spec.methods}, lrs {spec.lrs}, stages "
          f"{[(s.name, s.steps) for s in spec.stages]}, eval limit/kind {spec.eval_limit_per_kind}; "
          f"load average {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    paths = run_study(spec, out, work, echo=lambda s: print(s, flush=True))
    print(f"[study] done in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    print(paths["summary"].read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
