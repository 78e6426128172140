"""The study's divergence-by-position profiles: where in a response the teacher and the student
disagree, before training and after each phase-1 setting.

For the base model and the kept (first-seed) checkpoint of every phase-1 setting, ``sdft-ray
probe`` samples the student on the trained facts and measures, per response position, the
configured loss's divergence between the student and the **base** model prompted with the
demonstration through the chosen template (the frozen teacher; at EMA rate 0.01 the EMA teacher
after the study's steps still holds most of the base weights), and the demonstration shift
(teacher with the fact's demonstration vs another fact's). Before training the profile says where
SDFT's signal sits; after, which positions a method moved toward the teacher.

Outputs: ``divergence_by_position.csv`` (model, position, mean divergence, mean shift, rows that
reach the position) and ``divergence_by_position.png``; each probe's full JSON report under
``<work>/profiles/`` (reused by a rerun).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdft_ray.checkpoint import atomic_write_text
from sdft_ray.study.run import lr_tag
from sdft_ray.study.spec import SFT_VARIANT, StudySpec

PROFILE_CSV = "divergence_by_position.csv"
PROFILE_PNG = "divergence_by_position.png"


@dataclass(frozen=True)
class KeptModel:
    """The base model (``folder`` None, ``run`` "base") or a phase-1 run whose checkpoint's
    student weights were kept (the first seed of every setting)."""

    label: str
    folder: str | None
    arm: Any
    run: str


def weights_stamp(folder: str | os.PathLike[str]) -> list[list[Any]]:
    """Name, size and modification time of every weights file in a model folder: a cache keyed by
    the folder's path alone would outlive a retrain that writes new weights to the same path."""
    from sdft_ray.evaluation.runner import resolve_checkpoint

    path = Path(resolve_checkpoint(folder))
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir())
            if f.suffix in (".safetensors", ".bin")]


def kept_models(spec: StudySpec, work: Path) -> list[KeptModel]:
    """The base model, then every kept phase-1 checkpoint, in the study file's arm order."""
    out = [KeptModel("base", None, spec.arms[0], "base")]
    for arm in spec.arms:
        seed = spec.arm_seeds(arm)[0]
        for lr in arm.lrs:
            record = work / "runs" / f"p1-{arm.name}-lr{lr_tag(lr)}-s{seed}" / "record.json"
            if not record.is_file():
                continue
            folder = json.loads(record.read_text(encoding="utf-8"))["info"].get("checkpoint")
            if folder and Path(folder).is_dir():
                out.append(KeptModel(f"{arm.name} lr={lr:g}", folder, arm, f"p1/{arm.name}/lr{lr_tag(lr)}/s{seed}"))
    return out


def _probe_config(spec: StudySpec, arm: Any, work: Path, template: str) -> Any:
    """The phase-1 run config of an SDFT arm (rollout length, loss, template), probing the trained
    facts: the profile is measured the way that arm's loss would see it."""
    sdft = arm if arm.variant != SFT_VARIANT else next((a for a in spec.arms if a.variant != SFT_VARIANT), arm)
    lr = sdft.lrs[0]
    cfg = spec.run_config(sdft, lr, spec.seeds[0], model_path=spec.model, data_path=str(work / "data" / "train_facts.jsonl"),
                          out_dir=str(work / "profiles"), template=template, epochs=spec.arm_epochs(sdft))
    return cfg.model_copy(update={"probe": cfg.probe.model_copy(update={"reference_column": "answer"})})


def _profile_rows(label: str, report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = report["rows"]
    width = max((len(r["divergence"]) for r in rows), default=0)
    out = []
    for t in range(width):
        div = [r["divergence"][t] for r in rows if len(r["divergence"]) > t]
        shift = [r["shift"][t] for r in rows if r.get("shift") and len(r["shift"]) > t]
        out.append({"model": label, "position": t, "rows": len(div), "divergence": statistics.fmean(div),
                    "shift": statistics.fmean(shift) if shift else math.nan})
    return out


def divergence_profiles(spec: StudySpec, work: str | os.PathLike[str], out: str | os.PathLike[str], template: str,
                        *, echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Probe the base model and every kept phase-1 checkpoint; write the CSV and the plot."""
    from sdft_ray.models import resolve_model_path
    from sdft_ray.probe import run_probe
    from sdft_ray.study.report import _write

    work, out = Path(work), Path(out)
    (work / "profiles").mkdir(parents=True, exist_ok=True)
    base = resolve_model_path(spec.model)
    rows: list[dict[str, Any]] = []
    for kept in kept_models(spec, work):
        label, folder, arm = kept.label, kept.folder, kept.arm
        path = work / "profiles" / ("".join(ch if ch.isalnum() else "_" for ch in label) + ".json")
        stamp_file = path.with_suffix(".weights.json")  # which weights the profile was measured on
        stamp = json.dumps(weights_stamp(folder or base))
        if path.is_file() and not stamp_file.is_file():  # a profile from before stamps: its weights are these
            atomic_write_text(stamp_file, stamp)
        if not path.is_file() or stamp_file.read_text(encoding="utf-8") != stamp:
            echo(f"[study] divergence profile: {label}")
            cfg = _probe_config(spec, arm, work, template)
            run_probe(cfg, num_examples=spec.facts.n_train, model_folder=folder, teacher_folder=base, out=path,
                      echo=lambda s: None)
            atomic_write_text(stamp_file, stamp)
        rows += _profile_rows(label, json.loads(path.read_text(encoding="utf-8")))
    _write(out, PROFILE_CSV.removesuffix(".csv"), rows, ("model", "position", "rows", "divergence", "shift"))
    return {"profiles_csv": out / PROFILE_CSV, "profiles_png": plot_profiles(rows, out / PROFILE_PNG)}


def plot_profiles(rows: list[dict[str, Any]], path: Path) -> Path:
    """Mean divergence by response position, one line per model (positions reached by >= 3
    rows); below, the base teacher's demonstration shift on the same samples."""
    from sdft_ray.study.report import _plt, save_figure

    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True)
    for label in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == label and r["rows"] >= 3]
        style = {"color": "black", "linewidth": 2.2} if label == "base" else {"linewidth": 1.2}
        top.plot([r["position"] for r in mine], [r["divergence"] for r in mine], label=label, **style)
        bottom.plot([r["position"] for r in mine], [r["shift"] for r in mine], label=label, **style)
    top.set_ylabel("divergence (nats), mean over samples")
    top.set_title("student vs the base teacher with the demonstration, on the student's own samples "
                  "(trained facts)", fontsize=8)
    bottom.set_ylabel("demonstration shift (nats)")
    bottom.set_xlabel("response position (tokens)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=7)
    return save_figure(fig, path)
