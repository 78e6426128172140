"""``sdft-ray train CONFIG [--set a.b=c ...] [--resume latest|PATH]`` and ``sdft-ray export``."""

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
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    export = sub.add_parser("export", help="export a checkpoint to a Hugging Face model folder")
    export.add_argument("checkpoint", help="a checkpoint folder (runs/x/checkpoints/step-...) or a run folder")
    export.add_argument("out", help="output folder (must not exist or be empty)")
    export.add_argument("--weights", choices=["student", "teacher"], default="student")
    return parser


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

            summary = train(cfg, resume=args.resume, trust_checkpoint=args.trust_checkpoint)
            last = summary["history"][-1] if summary["history"] else {}
            print(json.dumps({"steps": summary["steps"], "seconds": round(summary["seconds"], 1),
                              "final_loss": last.get("loss"), "checkpoint": summary["latest_checkpoint"]}))
            return 0
        from pathlib import Path

        from sdft_ray.checkpoint import CheckpointManager
        from sdft_ray.export import export_checkpoint

        ckpt = Path(args.checkpoint)
        if (ckpt / "checkpoints").is_dir():
            ckpt = CheckpointManager(ckpt / "checkpoints").latest() or ckpt
        print(export_checkpoint(ckpt, args.out, args.weights))
        return 0
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
