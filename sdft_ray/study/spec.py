"""The study file (``configs/study/*.yaml``): one typed, validated description of a study.

Everything that is decided before the study runs lives here - model, seeds, the fact subset,
the evaluation lengths, the teacher templates and the Phase-0 gate, the arms and their learning
rates, the curriculum stage and the ``train:`` RunConfig tree under every run - so that the
plan in docs/study.md and the file that ran are the same thing. Unknown keys and bad values
are a :class:`~sdft_ray.errors.ConfigError` naming the field; every run's RunConfig is built
once at load time, so an arm override with a typo fails before anything trains.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sdft_ray.config import RunConfig, _format_validation_error, _set_dotted, config_from_dict, parse_override, read_yaml
from sdft_ray.errors import ConfigError

__all__ = ["ArmSpec", "StudySpec", "load_study", "merge_tree", "resolve_teacher_template", "study_from_dict"]

SFT_VARIANT = "sft"
SDFT_VARIANT = "sdft"


def resolve_teacher_template(value: str) -> str:
    """The template text for a ``prompts.teacher_template`` value: a name of the template registry
    in :mod:`sdft_ray.prompts` (where it has one) or a literal template. The one place the
    study turns a template setting into text."""
    from sdft_ray import prompts

    resolve = getattr(prompts, "resolve_template", None)
    return resolve(value) if resolve is not None else prompts.validate_template(value)


def merge_tree(into: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge mapping ``new`` into ``into`` (in place; ``new`` wins)."""
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge_tree(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FactsSpec(_Section):
    """Phase 1: which facts are trained and which are held out as controls."""

    train: str = Field("data/fictional_facts/train.jsonl", description="Training rows: prompt, demonstration, entity, fact.")
    task: str = Field("fictional_facts", description="Eval task (in eval_tasks) with the strict/paraphrase/ood questions.")
    n_train: int = Field(24, ge=1, description="Entity-fact pairs trained.")
    n_control: int = Field(24, ge=1, description="Entity-fact pairs never trained (controls), other entities.")
    selection_seed: int = Field(0, description="Seeds the deterministic choice of trained and control pairs.")
    epochs: float = Field(10.0, gt=0, description="Passes over the trained facts of every run (SFT and SDFT alike), "
                                                      "unless an arm sets its own epochs.")
    min_samples_per_fact: int = Field(8, ge=1, description="Refuse a study giving a fact fewer on-policy samples.")


class EvalSpec(_Section):
    max_new_tokens: int = Field(96, ge=1, description="Greedy answer length for fact and prior questions.")
    tools_max_new_tokens: int = Field(128, ge=1, description="Greedy answer length for tool calls.")
    batch_size: int = Field(16, ge=1)
    threads: int = Field(1, ge=1, description="torch threads of the driver while it evaluates.")


class ForgettingSpec(_Section):
    task: str = Field("prior", description="Eval task whose prompts the base model answers (KL/NLL, accuracy).")
    max_new_tokens: int = Field(96, ge=1, description="Length limit of the base model's cached greedy answers.")
    batch_size: int = Field(8, ge=1, description="Prompts per teacher-forced forward pass.")


class GateSpec(_Section):
    """Phase-0 gate on the demonstration-conditioned teacher (fixed before the study runs)."""

    strict: float = Field(0.70, ge=0, le=1, description="Teacher accuracy on strict questions at least this.")
    paraphrase: float = Field(0.50, ge=0, le=1, description="Teacher accuracy on paraphrases at least this.")
    finished: float = Field(0.90, ge=0, le=1, description="Share of teacher answers ending within the rollout length.")


class TeacherCheckSpec(_Section):
    templates: dict[str, str] = Field(..., description="label -> template name or literal template (>= 1).")
    gate: GateSpec = Field(default_factory=GateSpec)
    on_fail: Literal["continue", "stop"] = Field(
        "continue", description="When no template passes: run phases 1-2 anyway (verdict 'not applicable') or stop.")

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("give at least one template")
        for label, template in value.items():
            try:
                resolve_teacher_template(template)
            except ValueError as e:
                raise ValueError(f"{label}: {e}") from None
        return value


class ArmSpec(_Section):
    name: str = Field(..., min_length=1, description="Label in every table and plot.")
    variant: str = Field(..., min_length=1, description="algorithm.variant: sft | sdft | ...")
    lrs: list[float] = Field(..., min_length=1, description="Peak learning rates; every one is run with every seed.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="RunConfig tree merged for this arm only.")
    seeds: list[int] | None = Field(None, min_length=1, description="This arm's seeds, a subset of the study's "
                                    "(an ablation run with fewer seeds); default: all of the study's seeds.")
    epochs: float | None = Field(None, gt=0, description="This arm's passes over the trained facts (a longer "
                                 "schedule); default: facts.epochs.")

    @field_validator("lrs")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(x <= 0 for x in value):
            raise ValueError(f"learning rates must be positive, got {value}")
        return value


class CurriculumSpec(_Section):
    """Phase 2: the tool-call stage, from each variant's best phase-1 checkpoint."""

    task: str = Field("tool_calls", description="Eval task of the stage.")
    train: str = Field("data/tool_calls/train.jsonl", description="Training rows (prompt, demonstration, reference).")
    epochs: float = Field(1.0, ge=1, description="Passes over the stage's data (at least one full pass).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="RunConfig tree merged for this stage.")


class StudySpec(_Section):
    model: str = Field(..., min_length=1, description="Base model folder or embedded:<name>.")
    seeds: list[int] = Field(..., min_length=1, description="schedule.seed of the runs; the first one's checkpoints are kept.")
    eval_tasks: str = Field("configs/eval/continual.yaml", description="Eval task file the study's tasks come from.")
    facts: FactsSpec = Field(default_factory=FactsSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    forgetting: ForgettingSpec = Field(default_factory=ForgettingSpec)
    teacher_check: TeacherCheckSpec
    arms: list[ArmSpec] = Field(..., min_length=1)
    curriculum: CurriculumSpec | None = Field(default_factory=CurriculumSpec)
    train: dict[str, Any] = Field(default_factory=dict, description="RunConfig tree under every run.")

    @model_validator(mode="after")
    def _checks(self) -> "StudySpec":
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: must be distinct, got {self.seeds}")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms: names must be unique, got {names}")
        for arm in self.arms:
            if arm.seeds is not None and not (set(arm.seeds) <= set(self.seeds) and self.seeds[0] in arm.seeds):
                raise ValueError(f"arms[{arm.name}].seeds: {arm.seeds} must be a subset of seeds {self.seeds} "
                                 f"holding the first one, {self.seeds[0]} (its checkpoints start phase 2)")
            cfg = self.run_config(arm, arm.lrs[0], self.seeds[0], model_path=self.model, data_path=self.facts.train,
                                  out_dir="runs/study-check", template=next(iter(self.teacher_check.templates.values())),
                                  epochs=self.arm_epochs(arm))
            if arm.variant != SFT_VARIANT:
                samples = self.arm_epochs(arm) * cfg.rollout.num_samples
                if samples < self.facts.min_samples_per_fact:
                    raise ValueError(f"arms[{arm.name}]: epochs (the arm's, else facts.epochs) x "
                                     f"rollout.num_samples = {samples:g} on-policy samples per fact, under "
                                     f"facts.min_samples_per_fact = {self.facts.min_samples_per_fact}")
            if self.curriculum is not None:
                self.run_config(arm, arm.lrs[0], self.seeds[0], model_path=self.model, data_path=self.curriculum.train,
                                out_dir="runs/study-check", template=next(iter(self.teacher_check.templates.values())),
                                epochs=self.curriculum.epochs, stage_overrides=self.curriculum.overrides)
        return self

    # ---- derived ---------------------------------------------------------------------------
    def arm_seeds(self, arm: ArmSpec) -> list[int]:
        """The seeds an arm runs with, in the study's order."""
        return [s for s in self.seeds if arm.seeds is None or s in arm.seeds]

    def arm_epochs(self, arm: ArmSpec) -> float:
        """The passes over the trained facts of an arm's phase-1 runs."""
        return self.facts.epochs if arm.epochs is None else arm.epochs

    def arm(self, name: str) -> ArmSpec:
        return next(a for a in self.arms if a.name == name)

    @property
    def variants(self) -> list[str]:
        """The distinct variants of the arms, in arm order (phase 2 runs one chain per variant)."""
        return list(dict.fromkeys(a.variant for a in self.arms))

    def run_config(self, arm: ArmSpec, lr: float, seed: int, *, model_path: str, data_path: str,
                   out_dir: str | os.PathLike[str], template: str, epochs: float,
                   stage_overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """One run's RunConfig: ``train`` < the Phase-0 template < arm overrides < stage overrides
        < what the study sets (variant, model, data, lr, seed, epochs, output)."""
        tree = copy.deepcopy(self.train)
        merge_tree(tree, {"prompts": {"teacher_template": resolve_teacher_template(template)}})
        merge_tree(tree, arm.overrides)
        merge_tree(tree, stage_overrides or {})
        merge_tree(tree, {"algorithm": {"variant": arm.variant}, "model": {"path": str(model_path)},
                          "data": {"path": str(data_path)}, "learner": {"lr": float(lr)},
                          "schedule": {"seed": int(seed), "epochs": float(epochs), "max_steps": None},
                          "output": {"dir": str(out_dir), "save_final": True, "checkpoint_every": 0, "keep_last": 1}})
        try:
            return config_from_dict(tree, f"arm {arm.name} lr={lr:g} seed={seed}")
        except ConfigError as e:
            raise ValueError(f"arms[{arm.name}]: {e}") from None

    def rollout_tokens(self, stage_overrides: Mapping[str, Any] | None = None) -> int:
        """``rollout.max_new_tokens`` of the train tree (with a stage's overrides)."""
        tree = merge_tree(copy.deepcopy(self.train), stage_overrides or {})
        return config_from_dict(tree, "study train").rollout.max_new_tokens


def study_from_dict(tree: Mapping[str, Any], source: str = "<dict>") -> StudySpec:
    """Validate a study mapping; errors name the field (``arms.0.lrs``, ``teacher_check.gate.strict``)."""
    try:
        return StudySpec.model_validate(dict(tree))
    except ValidationError as exc:
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        raise ConfigError(_format_validation_error(exc, source), field=".".join(map(str, first)) or None) from None


def load_study(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> StudySpec:
    """Read a study YAML and apply ``a.b=c`` overrides (``seeds=[0]``, ``facts.n_train=6``)."""
    tree = study_tree(path)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return study_from_dict(tree, str(path) + (" + --set " + " ".join(overrides) if overrides else ""))


def study_tree(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a study file, before validation. ``extends: other.yaml`` (relative to
    this file) starts from that study's mapping: this file's mappings merge into it key by key,
    and any other value - a list such as ``arms`` included - replaces the one there."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to this file ({' -> '.join(p.name for p in _seen + (path,))})",
                          field="extends")
    tree = read_yaml(path, "study file") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping")
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be the path of another study file, got {parent!r}", field="extends")
    base_path = path.parent / parent
    if not base_path.is_file():
        raise ConfigError(f"{path}: extends: no study file at {base_path}", field="extends")
    return merge_tree(study_tree(base_path, _seen + (path,)), tree)
