"""The ``sdft-ray`` command line.

    sdft-ray train CONFIG [--set a.b=c ...] [--resume latest|PATH]
    sdft-ray probe CONFIG [--set a.b=c ...] [--num-examples N] [--out FILE]
    sdft-ray export CHECKPOINT OUT [--weights student|teacher] [--adapter]
    sdft-ray eval CHECKPOINT TASKS... --out DIR [--limit N] [--engine hf|vllm]
    sdft-ray lm-eval-task TASK.yaml --data LOCAL_DATA --out DIR [--num-fewshot N --fewshot-data F]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sdft_ray.errors import ConfigError, DataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdft-ray", description="Self-Distillation Fine-Tuning on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with a YAML config")
    train.add_argument("config", nargs="?", help="YAML config (defaults if omitted)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                       help="override a config value (repeatable)")
    train.add_argument("--resume", metavar="latest|PATH", help="resume from the latest or a given checkpoint")
    train.add_argument("--trust-checkpoint", action="store_true",
                       help="allow --resume from a checkpoint outside this run's output.dir (it contains pickles)")
    train.add_argument("--allow-config-change", action="store_true",
                       help="with --resume: continue although the config differs from the checkpoint's")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    probe = sub.add_parser("probe", help="check the teacher before training (answers, lengths, divergence by position)")
    probe.add_argument("config", nargs="?", help="YAML config (defaults if omitted)")
    probe.add_argument("--set", dest="overrides", action="append", default=[], metavar="a.b=c",
                       help="override a config value (repeatable)")
    probe.add_argument("--num-examples", type=int, help="examples to probe (probe.num_examples, default 32)")
    probe.add_argument("--out", help="JSON report (probe.out, default <output.dir>/probe.json)")
    export = sub.add_parser("export", help="export a checkpoint to a Hugging Face model folder")
    export.add_argument("checkpoint", help="a checkpoint folder (runs/x/checkpoints/step-...) or a run folder")
    export.add_argument("out", help="output folder (must not exist or be empty)")
    export.add_argument("--weights", choices=["student", "teacher"], default="student")
    export.add_argument("--adapter", action="store_true",
                        help="LoRA runs: write the PEFT adapter folder alone instead of the merged model")
    evaluate = sub.add_parser("eval", help="score a checkpoint on evaluation tasks (JSONL/CSV results)")
    evaluate.add_argument("checkpoint", help="a checkpoint folder, a run folder (its latest), an HF folder or embedded:NAME")
    evaluate.add_argument("tasks", nargs="+", help="task YAML files or folders (configs/eval/...)")
    evaluate.add_argument("--out", required=True, help="results folder (results.jsonl, results.csv, samples/)")
    evaluate.add_argument("--name", help="checkpoint name in the results (default: the checkpoint path)")
    evaluate.add_argument("--limit", type=int, help="first N rows of every task")
    evaluate.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--sampled", action="store_true", help="sample single-sample tasks too (default greedy)")
    evaluate.add_argument("--seed", type=int, default=0)
    lm_eval = sub.add_parser("lm-eval-task", help="convert an lm-evaluation-harness task YAML over local data")
    lm_eval.add_argument("task_yaml")
    lm_eval.add_argument("--data", required=True, help="local copy of the task's data (JSONL, Parquet, Arrow, datasets folder)")
    lm_eval.add_argument("--out", required=True, help="folder for <task>.jsonl and <task>.yaml")
    lm_eval.add_argument("--split", help="split of a datasets folder (default: the YAML's test_split)")
    lm_eval.add_argument("--num-fewshot", type=int)
    lm_eval.add_argument("--fewshot-data", help="rows for the few-shot examples (the first N are used)")
    lm_eval.add_argument("--limit", type=int)
    return parser


def _latest(path: str) -> str:
    """A run folder's latest checkpoint, or ``path`` itself."""
    from pathlib import Path

    from sdft_ray.checkpoint import CheckpointManager

    if (Path(path) / "checkpoints").is_dir():
        return str(CheckpointManager(Path(path) / "checkpoints").latest() or path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            from sdft_ray.config import load_config

            cfg = load_config(args.config, args.overrides)
            if args.print_config:
                print(cfg.to_yaml())
                return 0
            from sdft_ray.runner import train

            summary = train(cfg, resume=args.resume, trust_checkpoint=args.trust_checkpoint,
                            allow_config_change=args.allow_config_change)
            from sdft_ray.answers import show_answers

            answers = show_answers(cfg, summary)
            if answers:
                print(answers, flush=True)
            last = summary["history"][-1] if summary["history"] else {}
            print(json.dumps({"steps": summary["steps"], "seconds": round(summary["seconds"], 1),
                              "final_loss": last.get("loss"), "checkpoint": summary["latest_checkpoint"]}))
            return 0
        if args.command == "probe":
            from sdft_ray.config import load_config
            from sdft_ray.probe import print_report, run_probe

            extra = [f"probe.num_examples={args.num_examples}"] if args.num_examples is not None else []
            extra += [f"probe.out={json.dumps(args.out)}"] if args.out else []
            cfg = load_config(args.config, [*args.overrides, *extra])
            print_report(run_probe(cfg, echo=lambda line: print(line, file=sys.stderr, flush=True)))
            return 0
        if args.command == "eval":
            from sdft_ray.evaluation import evaluate_checkpoint, load_tasks, write_results

            ckpt = _latest(args.checkpoint)
            samples: list = []
            rows = evaluate_checkpoint(ckpt, load_tasks(args.tasks), engine=args.engine, greedy=not args.sampled,
                                       seed=args.seed, batch_size=args.batch_size, limit=args.limit, samples=samples)
            paths = write_results(rows, args.out, args.name or ckpt, samples)
            for row in rows:
                print(json.dumps({k: row[k] for k in ("task", "kind", "metric", "n", "score")}))
            print(f"results: {paths['csv']}", file=sys.stderr)
            return 0
        if args.command == "lm-eval-task":
            from sdft_ray.evaluation.lm_eval import convert_lm_eval_task

            tasks = convert_lm_eval_task(args.task_yaml, args.data, args.out, split=args.split,
                                         num_fewshot=args.num_fewshot, fewshot_data=args.fewshot_data,
                                         limit=args.limit)
            print(f"{tasks[0].path} ({len(tasks)} task(s): {', '.join(t.name for t in tasks)}); "
                  f"run: sdft-ray eval CHECKPOINT {tasks[0].path[:-len('.jsonl')]}.yaml --out DIR")
            return 0
        from sdft_ray.export import export_checkpoint

        print(export_checkpoint(_latest(args.checkpoint), args.out, args.weights, adapter_only=args.adapter))
        return 0
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
