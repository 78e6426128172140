"""Run the science study (docs/study.md): teacher check, knowledge injection, curriculum.

    # the study of docs/study.md (SmolLM2-135M-Instruct on CPU; configs/study/smollm2.yaml)
    .venv/bin/python scripts/run_study.py --out results/study --work runs/study

    # one table, verdict and frontier over finished studies' output folders (e.g. a later seed)
    .venv/bin/python scripts/run_study.py --combine results/levers results/levers_seeds --out results/levers_all

    # smoke run (tests/test_study.py): tiny random Llama + test tokenizer, 3 + 3 facts, seconds per run
    .venv/bin/python scripts/run_study.py --quick --out /tmp/study-quick/out --work /tmp/study-quick

Any field of the study file can be overridden with ``--set key=value`` (dotted, YAML value), e.g.
``--set seeds=[0] --set facts.n_train=12 --set eval.max_new_tokens=128``; ``--model`` replaces the
base model. Training runs, checkpoints and evaluation caches go to ``--work``; a rerun with the
same ``--work`` reuses every finished run and evaluation (``--fresh`` starts over). Tables, raw
rows and plots go to ``--out``. Progress lines show the elapsed time and an estimate of what is
left.
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", help=f"study YAML (default {DEFAULT_CONFIG.relative_to(REPO)}; "
                                              f"--quick: {QUICK_CONFIG.relative_to(REPO)})")
    ap.add_argument("--quick", action="store_true", help="tiny random model with the test tokenizer (tests)")
    ap.add_argument("--out", default=None, help="tables + plots (default results/study, --quick: <work>/out)")
    ap.add_argument("--work", default=None, help="runs, checkpoints, caches (default runs/study[-quick])")
    ap.add_argument("--fresh", action="store_true", help="delete --work first instead of reusing finished runs")
    ap.add_argument("--model", help="model folder or embedded:<name> (overrides the study file)")
    ap.add_argument("--profiles-only", action="store_true",
                    help="only (re)compute the diagnostics of a finished --work: the divergence-by-position "
                         "profiles and the facts' log-likelihoods")
    ap.add_argument("--combine", nargs="+", metavar="OUT_DIR",
                    help="combine the phase-1 runs of finished studies' output folders (e.g. another seed run "
                         "later) into one table, verdict and frontier in --out; nothing is trained")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a study field (dotted, YAML value); repeatable")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    import yaml

    # per-task progress of every evaluation ("evaluating task i/N", then score, rows and seconds)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sdft_ray.evaluation").setLevel(logging.INFO)

    from sdft_ray.config import _set_dotted, parse_override
    from sdft_ray.errors import ConfigError
    from sdft_ray.study import run_study, study_from_dict
    from sdft_ray.study.spec import study_tree

    if args.combine:
        from sdft_ray.study.combine import combine_results

        if not args.out:
            print("error: --combine needs --out", file=sys.stderr)
            return 2
        try:
            paths = combine_results(args.combine, args.out)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for name, path in paths.items():
            print(f"  {name}: {path}")
        print(paths["summary"].read_text(encoding="utf-8"))
        return 0
    config = Path(args.config) if args.config else (QUICK_CONFIG if args.quick else DEFAULT_CONFIG)
    work = Path(args.work or (REPO / "runs" / ("study-quick" if args.quick else "study")))
    out = Path(args.out or (work / "out" if args.quick else REPO / "results" / "study"))
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        tree = study_tree(config)
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
        spec = study_from_dict(tree, str(config) + (" + --set " + " ".join(args.overrides) if args.overrides else ""))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (work / "study.yaml").write_text(yaml.safe_dump(tree, sort_keys=False, allow_unicode=True), encoding="utf-8")
    runs = sum(len(a.lrs) * len(spec.arm_seeds(a)) for a in spec.arms)
    print(f"[study] {spec.model}: {len(spec.arms)} arms ({', '.join(a.name for a in spec.arms)}), {runs} phase-1 runs, "
          f"seeds {spec.seeds}, {spec.facts.n_train} trained + {spec.facts.n_control} control facts x "
          f"{spec.facts.epochs:g} epochs; load average {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    if args.profiles_only:
        import json

        from sdft_ray.study.fact_likelihood import fact_likelihoods
        from sdft_ray.study.profiles import divergence_profiles
        from sdft_ray.study.run import StudyRunner, read_jsonl

        chosen = json.loads((out / "gate.json").read_text(encoding="utf-8"))["chosen"]
        paths = divergence_profiles(spec, work, out, spec.teacher_check.templates[chosen])
        runner = StudyRunner(spec, out, work)
        runner.prepare()  # the fact tasks and the base model (answers read from the cache)
        prior_kl = {r["run"]: r["prior_kl"] for r in read_jsonl(out / "runs.jsonl") if r.get("prior_kl") is not None}
        paths |= fact_likelihoods(spec, work, out, runner.facts_tasks, runner.base_folder, prior_kl)
        for name, path in paths.items():
            print(f"  {name}: {path}")
        return 0
    paths = run_study(spec, out, work, echo=lambda s: print(s, flush=True))
    print(f"[study] done in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()}")
    for name, path in paths.items():
        print(f"  {name}: {path}")
    print(paths["summary"].read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
