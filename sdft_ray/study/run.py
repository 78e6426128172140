"""Run a study (:class:`~sdft_ray.study.spec.StudySpec`) end to end; resumable.

* **Phase 0, the teacher check** - the base model answers the fact questions (trained and
  control facts, every kind) with the demonstration in context through each template of
  ``teacher_check.templates`` (the teacher) and without it (the student), greedy, at the
  rollout length; :func:`~sdft_ray.study.verdict.check_gate` /
  :func:`~sdft_ray.study.verdict.choose_template` pick the template phase 1 uses.
* **Phase 1, knowledge injection** - every arm x learning rate x seed trains on the trained
  facts (``sdft_ray.runner.train``), then is evaluated on trained facts, control facts and the
  prior questions (greedy, ``eval.max_new_tokens``), and scored teacher-forced on the base
  model's own answers to the prior prompts (KL(base || model), NLL).
* **Phase 2, the curriculum** - per variant, the best phase-1 setting
  (:func:`~sdft_ray.study.verdict.best_setting`; its first seed's checkpoint) trains on the
  tool-call data; before it trains, that checkpoint is evaluated on the tool calls as student
  and as teacher (its weights + the demonstration: the weights that teach the stage); after,
  everything is evaluated again.

Everything under ``work_dir`` is reused by a rerun: a run whose ``record.json`` matches the
current run config and evaluation is not run again; a finished training whose evaluation is
missing is only evaluated. The tables, raw rows and plots go to ``out_dir``
(:mod:`sdft_ray.study.report`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdft_ray.checkpoint import atomic_write_text
from sdft_ray.errors import ConfigError
from sdft_ray.models import is_model_folder
from sdft_ray.study.design import (fact_demonstrations, pick_rows, reference_demonstrations, select_facts,
                                   teacher_rows)
from sdft_ray.study.spec import ArmSpec, StudySpec, resolve_teacher_template
from sdft_ray.study.verdict import GateResult, Setting, best_setting, check_gate, choose_template

__all__ = ["ModelRecord", "StudyRunner", "read_jsonl", "run_study", "write_jsonl"]

REPO_ROOT = Path(__file__).resolve().parents[2]
FACTS_TRAINED, FACTS_CONTROL, FACTS_TEACHER, FACTS_STUDENT = "facts_trained", "facts_control", "facts_teacher", "facts_student"
TOOLS_TEACHER = "tools_teacher"


# ---- files -----------------------------------------------------------------------------------


def _resolve(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return p
    return REPO_ROOT / p


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = _resolve(path)
    if path.suffix not in (".jsonl", ".json"):
        raise ConfigError(f"{path}: the study reads JSON-lines files only")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: Sequence[Any]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
    return path


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def same_run_config(saved_yaml: str | None, cfg: Any) -> bool:
    """Whether a finished run was trained with ``cfg``: the saved YAML, read with today's schema,
    sets the same values (a config key added to sdft-ray since, at its default, changes nothing)."""
    from sdft_ray.config import config_from_dict

    if not saved_yaml:
        return False
    import yaml

    try:
        saved = config_from_dict(yaml.safe_load(saved_yaml), "saved run config")
    except (ConfigError, ValueError, yaml.YAMLError):
        return False
    return saved.model_dump(exclude_defaults=True) == cfg.model_dump(exclude_defaults=True)


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("+", "").replace("-0", "-")


# ---- records ---------------------------------------------------------------------------------


@dataclass
class ModelRecord:
    """One evaluated model: its identity, evaluation rows (per task x kind), per-question
    samples, per-prompt prior divergence (None for prompt-only evaluations) and bookkeeping."""

    run: str  # "base", "p1/<arm>/lr<tag>/s<seed>", "p2/<variant>", "phase0/<label>", ...
    phase: str  # base | phase0 | phase1 | phase2
    arm: str | None = None
    variant: str | None = None
    lr: float | None = None
    seed: int | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    kl: list[dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, Any]:
        return {"run": self.run, "phase": self.phase, "arm": self.arm, "variant": self.variant, "lr": self.lr,
                "seed": self.seed}

    def outcomes(self, task: str, kind: str) -> list[bool]:
        """Full-credit outcomes of ``task``/``kind`` questions, in question order."""
        picked = sorted((s for s in self.samples if s["task"] == task and s["kind"] == kind), key=lambda s: s["index"])
        return [s["score"] >= 1.0 for s in picked]

    def all_outcomes(self, task: str) -> list[bool]:
        picked = sorted((s for s in self.samples if s["task"] == task), key=lambda s: s["index"])
        return [s["score"] >= 1.0 for s in picked]

    def kl_values(self) -> list[float]:
        return [r["kl"] for r in sorted(self.kl or [], key=lambda r: r["index"])]


# ---- progress --------------------------------------------------------------------------------


class StudyProgress:
    """Elapsed time and an estimate of what is left, from the units still to do and the mean
    measured time of finished units of the same kind (``train:sft``, ``train:sdft``,
    ``eval:model`` = a model on every task + the prior KL, ``eval:prompts`` = one prompt set);
    kinds not measured yet count at the mean of all measured units. Reused units count as done."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.start = time.perf_counter()
        self.todo: dict[str, int] = {}
        self.times: dict[str, list[float]] = {}

    def plan(self, kind: str, count: int) -> None:
        self.todo[kind] = self.todo.get(kind, 0) + count

    def done(self, kind: str, seconds: float | None) -> None:
        self.todo[kind] = max(0, self.todo.get(kind, 0) - 1)
        if seconds is not None:
            self.times.setdefault(kind, []).append(seconds)

    def estimate(self) -> float | None:
        measured = [t for ts in self.times.values() for t in ts]
        if not measured:
            return None
        overall = sum(measured) / len(measured)
        return sum(n * (sum(self.times[k]) / len(self.times[k]) if self.times.get(k) else overall)
                   for k, n in self.todo.items())

    @staticmethod
    def _clock(seconds: float) -> str:
        m, s = divmod(int(seconds), 60)
        h, m = divmod(m, 60)
        return f"{h}:{m:02d}:{s:02d}"

    def say(self, message: str) -> None:
        left = self.estimate()
        todo = sum(self.todo.values())
        eta = f"~{self._clock(left)} left" if left is not None else "estimate after the first unit"
        self.echo(f"[study {self._clock(time.perf_counter() - self.start)} | {todo} units to do, {eta} | "
                  f"load {os.getloadavg()[0]:.1f}] {message}")


# ---- the runner ------------------------------------------------------------------------------


class StudyRunner:
    def __init__(self, spec: StudySpec, out_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str], *,
                 echo: Callable[[str], None] = print):
        self.spec = spec
        self.out = Path(out_dir)
        self.work = Path(work_dir)
        self.progress = StudyProgress(echo)
        self.records: list[ModelRecord] = []
        self.training: list[dict[str, Any]] = []
        self.gate: list[GateResult] = []
        self.chosen: GateResult | None = None
        self.gate_passed = False
        self.chains: list[dict[str, Any]] = []  # phase 2: per variant, the chosen setting and its runs
        self.runtimes: dict[str, Any] = {"cpu_count": os.cpu_count(),
                                         "loadavg_start": [round(x, 2) for x in os.getloadavg()], "units": []}

    # ---- preparation ---------------------------------------------------------------------
    def prepare(self) -> None:
        from sdft_ray.evaluation import load_tasks
        from sdft_ray.models import resolve_model_path

        spec = self.spec
        tasks = {t.name: t for t in load_tasks(_resolve(spec.eval_tasks))}
        needed = [spec.facts.task, spec.forgetting.task] + ([spec.curriculum.task] if spec.curriculum else [])
        for name in needed:
            if name not in tasks:
                raise ConfigError(f"study: task {name!r} is not in {spec.eval_tasks} (tasks: {', '.join(tasks)})")
        data = self.work / "data"
        facts_task = tasks[spec.facts.task]
        train_rows = read_jsonl(spec.facts.train)
        eval_rows = read_jsonl(facts_task.resolved_path())
        trained, control = select_facts(train_rows, spec.facts.n_train, spec.facts.n_control, spec.facts.selection_seed)
        atomic_write_text(data / "selection.json", json.dumps({"trained": trained, "control": control}, indent=1))
        self.facts_train_file = write_jsonl(data / "train_facts.jsonl", pick_rows(train_rows, trained))
        n = spec.eval.max_new_tokens
        trained_rows, control_rows = pick_rows(eval_rows, trained), pick_rows(eval_rows, control)

        def task(name: str, rows: list[dict], tokens: int, file: str | None = None):
            path = write_jsonl(data / f"eval_{file or name}.jsonl", rows)
            return dataclasses.replace(facts_task, name=name, path=str(path), max_new_tokens=tokens)

        self.facts_tasks = [task(FACTS_TRAINED, trained_rows, n), task(FACTS_CONTROL, control_rows, n)]
        self.prior_task = dataclasses.replace(tasks[spec.forgetting.task], max_new_tokens=n)
        rollout = spec.rollout_tokens()
        both = trained_rows + control_rows
        demos = fact_demonstrations(both, train_rows)
        self.student_task = task(FACTS_STUDENT, both, rollout)
        self.teacher_tasks = {label: task(FACTS_TEACHER, teacher_rows(both, demos, resolve_teacher_template(t),
                                                                      facts_task.prompt_column),
                                          rollout, file=f"{FACTS_TEACHER}_{_safe(label)}")
                              for label, t in spec.teacher_check.templates.items()}
        self.tools_task = None
        if spec.curriculum:
            self.tools_task = dataclasses.replace(tasks[spec.curriculum.task],
                                                  max_new_tokens=spec.eval.tools_max_new_tokens)
            self.tools_train_file = _resolve(spec.curriculum.train)
        self.base_folder = str(resolve_model_path(spec.model, (spec.train.get("model") or {}).get("cache_dir")))
        from sdft_ray.evaluation.forgetting import ForgettingProbe

        self.progress.say(f"the base model's greedy answers to the {spec.forgetting.task!r} prompts "
                          f"({spec.forgetting.max_new_tokens} new tokens; generated once, then read from the cache)")
        t0 = time.perf_counter()
        self.probe = ForgettingProbe(self.base_folder, self.prior_task, self.work / "base" / "base_answers.jsonl",
                                     max_new_tokens=spec.forgetting.max_new_tokens,
                                     batch_size=spec.forgetting.batch_size, generation_batch_size=spec.eval.batch_size,
                                     dtype=(spec.train.get("model") or {}).get("dtype", "float32"))
        self.progress.say(f"{len(self.probe.answers)} base answers ready in {time.perf_counter() - t0:.0f} s "
                          f"({sum(a.finished for a in self.probe.answers)} finished)")

    # ---- evaluation with caches ----------------------------------------------------------
    def _fingerprint(self, tasks: Sequence[Any]) -> str:
        return _sha([[t.name, _sha(Path(t.path).read_text(encoding="utf-8")), t.max_new_tokens, t.metric,
                      dict(t.metric_options)] for t in tasks] + [self.spec.eval.batch_size])

    def evaluate(self, folder: str, tasks: Sequence[Any], cache: Path, what: str,
                 with_kl: bool) -> tuple[list[dict], list[dict], list[dict] | None, float]:
        """Greedy evaluation of ``folder`` on ``tasks`` (+ the prior KL), cached in ``cache``/.
        Returns rows, samples, KL rows and the seconds it took (0 when cached)."""
        from sdft_ray.evaluation import evaluate_checkpoint

        key = {"model": str(folder), "tasks": self._fingerprint(tasks), "kl": self.probe.digest if with_kl else None}
        unit = _eval_unit(with_kl)
        meta = cache / "eval.json"
        if meta.is_file():
            saved = json.loads(meta.read_text(encoding="utf-8"))
            if saved.get("key") == key:
                kl = read_jsonl(cache / "prior_kl.jsonl") if with_kl else None
                self.progress.done(unit, None)
                return saved["rows"], read_jsonl(cache / "eval_samples.jsonl"), kl, 0.0
        self.progress.say(f"evaluating {what}")
        t0 = time.perf_counter()
        samples: list[dict] = []
        rows = evaluate_checkpoint(folder, list(tasks), engine="hf", batch_size=self.spec.eval.batch_size,
                                   samples=samples)
        samples = [{k: s[k] for k in ("task", "kind", "index", "score", "finished", "tokens", "response")}
                   for s in samples]
        kl = [dataclasses.asdict(r) for r in self.probe.divergence(folder)] if with_kl else None
        seconds = time.perf_counter() - t0
        write_jsonl(cache / "eval_samples.jsonl", samples)
        if kl is not None:
            write_jsonl(cache / "prior_kl.jsonl", kl)
        atomic_write_text(meta, json.dumps({"key": key, "model": folder, "rows": rows, "seconds": seconds}, indent=1))
        self.progress.done(unit, seconds)
        self.runtimes["units"].append({"what": f"evaluate {what}", "seconds": round(seconds, 1),
                                       "loadavg": round(os.getloadavg()[0], 2)})
        self.progress.say(f"evaluated {what} in {seconds:.0f} s")
        return rows, samples, kl, seconds

    def model_tasks(self, tools: bool) -> list[Any]:
        return self.facts_tasks + [self.prior_task] + ([self.tools_task] if tools and self.tools_task else [])

    # ---- phase 0 -------------------------------------------------------------------------
    def phase0(self) -> None:
        spec = self.spec
        rows, samples, kl, _ = self.evaluate(self.base_folder, self.model_tasks(tools=True), self.work / "base",
                                             "the base model", with_kl=True)
        self.base = ModelRecord("base", "base", rows=rows, samples=samples, kl=kl)
        self.records.append(self.base)
        rows, samples, _, _ = self.evaluate(self.base_folder, [self.student_task], self.work / "phase0" / "student",
                                            "phase 0: the student (query only)", with_kl=False)
        self.records.append(ModelRecord("phase0/student", "phase0", rows=rows, samples=samples))
        gate = spec.teacher_check.gate
        for label, task in self.teacher_tasks.items():
            rows, samples, _, _ = self.evaluate(self.base_folder, [task], self.work / "phase0" / _safe(label),
                                                f"phase 0: the teacher with template {label!r}", with_kl=False)
            self.records.append(ModelRecord(f"phase0/{label}", "phase0", arm=label, rows=rows, samples=samples))
            self.gate.append(check_gate(label, rows, strict=gate.strict, paraphrase=gate.paraphrase,
                                        finished=gate.finished))
        self.chosen, self.gate_passed = choose_template(self.gate)
        self.progress.say(f"phase 0: gate {'passed' if self.gate_passed else 'FAILED'}; template for phase 1: "
                          f"{self.chosen.label!r} (teacher strict {self.chosen.strict:.2f}, paraphrase "
                          f"{self.chosen.paraphrase:.2f}, finished {self.chosen.finished:.2f})")

    # ---- training runs -------------------------------------------------------------------
    def _train_kind(self, arm: ArmSpec) -> str:
        return f"train:{arm.variant}"

    def train_and_evaluate(self, record: ModelRecord, arm: ArmSpec, cfg: Any, run_dir: Path, tools: bool,
                           keep_student: bool) -> ModelRecord:
        """Train ``cfg`` into ``run_dir`` unless a finished run with the same config is there,
        then evaluate its student; fills ``record``."""
        from sdft_ray.checkpoint import CheckpointManager

        config_text = cfg.to_yaml()
        done = run_dir / "record.json"
        tasks = self.model_tasks(tools)
        if done.is_file():
            saved = json.loads(done.read_text(encoding="utf-8"))
            if same_run_config(saved.get("config"), cfg) and saved.get("eval_key") == self._eval_key(tasks):
                record.rows, record.info = saved["rows"], saved["info"]
                record.samples = read_jsonl(run_dir / "eval_samples.jsonl")
                record.kl = read_jsonl(run_dir / "prior_kl.jsonl")
                self.training.extend(_history_rows(run_dir, record.tags))
                self.progress.done(self._train_kind(arm), None)
                self.progress.done(_eval_unit(True), None)
                self.progress.say(f"{record.run}: reusing the finished run")
                return record
        ckpt = CheckpointManager(run_dir / "checkpoints").latest()
        trained = (ckpt is not None and is_model_folder(ckpt / "student")
                   and (run_dir / "config.yaml").is_file()
                   and same_run_config((run_dir / "config.yaml").read_text(encoding="utf-8"), cfg))
        info: dict[str, Any] = {}
        if not trained:
            from sdft_ray.runner import train

            if run_dir.exists():
                shutil.rmtree(run_dir)  # an unfinished attempt, or one with another config
            load0 = os.getloadavg()[0]
            self.progress.say(f"{record.run}: training from {cfg.model.path}")
            t0 = time.perf_counter()
            summary = train(cfg)
            seconds = time.perf_counter() - t0
            ckpt = CheckpointManager(run_dir / "checkpoints").latest()
            if ckpt is None:
                raise RuntimeError(f"{run_dir}: training finished without a checkpoint")
            info = {"steps": summary["steps"], "train_s": round(seconds, 1),
                    "loop_s": round(float(summary.get("seconds", 0.0)), 1), "loadavg_start": round(load0, 2),
                    "loadavg_end": round(os.getloadavg()[0], 2)}
            self.progress.done(self._train_kind(arm), seconds)
            self.runtimes["units"].append({"what": f"train {record.run}", "seconds": round(seconds, 1),
                                           "loadavg": info["loadavg_end"]})
            self.progress.say(f"{record.run}: trained {summary['steps']} steps in {seconds:.0f} s")
        else:
            self.progress.done(self._train_kind(arm), None)
            info = json.loads((run_dir / "train_info.json").read_text()) if (run_dir / "train_info.json").is_file() else {}
        atomic_write_text(run_dir / "train_info.json", json.dumps(info))
        rows, samples, kl, eval_s = self.evaluate(str(ckpt / "student"), tasks, run_dir, record.run, with_kl=True)
        info = {**info, "eval_s": round(eval_s, 1), "checkpoint": str(ckpt / "student")}
        record.rows, record.samples, record.kl, record.info = rows, samples, kl, info
        atomic_write_text(done, json.dumps({"config": config_text, "eval_key": self._eval_key(tasks), "rows": rows,
                                            "info": info}, indent=1))
        self.training.extend(_history_rows(run_dir, record.tags))
        _drop_training_state(ckpt, keep_student)
        return record

    def _eval_key(self, tasks: Sequence[Any]) -> dict[str, Any]:
        return {"tasks": self._fingerprint(tasks), "kl": self.probe.digest}

    # ---- phase 1 -------------------------------------------------------------------------
    def phase1_runs(self) -> list[tuple[ArmSpec, float, int]]:
        return [(arm, lr, seed) for arm in self.spec.arms for lr in arm.lrs for seed in self.spec.arm_seeds(arm)]

    def phase1(self) -> None:
        spec = self.spec
        template = spec.teacher_check.templates[self.chosen.label]
        for arm, lr, seed in self.phase1_runs():
            run = f"p1/{arm.name}/lr{lr_tag(lr)}/s{seed}"
            run_dir = self.work / "runs" / run.replace("/", "-")
            cfg = spec.run_config(arm, lr, seed, model_path=self.base_folder, data_path=str(self.facts_train_file),
                                  out_dir=run_dir, template=template, epochs=spec.arm_epochs(arm))
            record = ModelRecord(run, "phase1", arm.name, arm.variant, lr, seed)
            self.records.append(self.train_and_evaluate(record, arm, cfg, run_dir, tools=False,
                                                        keep_student=seed == spec.seeds[0]))
            self.flush()

    def settings(self) -> list[Setting]:
        """Every (arm, lr) over its seeds, for the decision rules."""
        from sdft_ray.study.report import settings_of

        return settings_of(self.records, self.base)

    def profiles(self) -> None:
        """Divergence by response position: the base model and every kept phase-1 checkpoint."""
        from sdft_ray.study.profiles import divergence_profiles

        divergence_profiles(self.spec, self.work, self.out, self.spec.teacher_check.templates[self.chosen.label],
                            echo=self.progress.say)
        self.fact_likelihoods()

    def fact_likelihoods(self) -> dict[str, Path]:
        """The log-probability of every fact's answer under the base model and every kept phase-1
        checkpoint (a diagnostic beside the pre-registered measures)."""
        from sdft_ray.study.fact_likelihood import fact_likelihoods

        prior_kl = {r.run: sum(v) / len(v) for r in self.records if r.phase == "phase1" and (v := r.kl_values())}
        return fact_likelihoods(self.spec, self.work, self.out, self.facts_tasks, self.base_folder, prior_kl,
                                echo=self.progress.say)

    # ---- phase 2 -------------------------------------------------------------------------
    def phase2(self) -> None:
        spec = self.spec
        cur = spec.curriculum
        template = spec.teacher_check.templates[self.chosen.label]
        settings = self.settings()
        rollout = spec.rollout_tokens(cur.overrides)
        tool_rows = read_jsonl(self.tools_task.resolved_path())
        teacher_file = write_jsonl(self.work / "data" / f"eval_{TOOLS_TEACHER}.jsonl",
                                   teacher_rows(tool_rows, reference_demonstrations(tool_rows, self.tools_task.reference_column),
                                                resolve_teacher_template(template), self.tools_task.prompt_column))
        teacher_task = dataclasses.replace(self.tools_task, name=TOOLS_TEACHER, path=str(teacher_file),
                                           max_new_tokens=rollout)
        for variant in spec.variants:
            pool = [s for s in settings if s.variant == variant]
            if not pool:
                continue
            best = best_setting(pool)
            arm = spec.arm(best.arm)
            start = next(r for r in self.records if r.phase == "phase1" and r.arm == best.arm and r.lr == best.lr
                         and r.seed == spec.seeds[0])
            checkpoint = start.info["checkpoint"]
            self.progress.say(f"phase 2 ({variant}): from {start.run} (strict {best.accuracy:.2f} over seeds, "
                              f"prior KL {best.mean_kl:.3f})")
            # the phase-1 checkpoint on the tool calls, as the student and as the teacher of the stage
            rows, samples, _, _ = self.evaluate(checkpoint, [self.tools_task], self.work / "phase2" / variant / "before",
                                                f"{start.run} on the tool calls", with_kl=False)
            before = ModelRecord(f"p2/{variant}/before", "phase2-start", arm.name, variant, best.lr, spec.seeds[0],
                                 rows=rows, samples=samples)
            rows, samples, _, _ = self.evaluate(checkpoint, [teacher_task], self.work / "phase2" / variant / "teacher",
                                                f"the tool-call teacher ({start.run} + demonstration)", with_kl=False)
            teacher = ModelRecord(f"p2/{variant}/teacher", "phase2-teacher", arm.name, variant, best.lr, spec.seeds[0],
                                  rows=rows, samples=samples)
            run = f"p2/{variant}"
            run_dir = self.work / "runs" / run.replace("/", "-")
            cfg = spec.run_config(arm, best.lr, spec.seeds[0], model_path=checkpoint, data_path=str(self.tools_train_file),
                                  out_dir=run_dir, template=template, epochs=cur.epochs, stage_overrides=cur.overrides)
            record = self.train_and_evaluate(ModelRecord(run, "phase2", arm.name, variant, best.lr, spec.seeds[0]),
                                             arm, cfg, run_dir, tools=True, keep_student=True)
            self.records += [before, teacher, record]
            self.chains.append({"variant": variant, "setting": best.name, "arm": arm.name, "lr": best.lr,
                                "start": start.run, "before": before.run, "teacher": teacher.run, "after": run})
            self.flush()

    # ---- driver --------------------------------------------------------------------------
    def plan(self) -> None:
        p = self.progress
        p.plan(_eval_unit(True), 1)
        p.plan(_eval_unit(False), 1 + len(self.spec.teacher_check.templates))
        for arm, _, _ in self.phase1_runs():
            p.plan(self._train_kind(arm), 1)
            p.plan(_eval_unit(True), 1)
        if self.spec.curriculum:
            for variant in self.spec.variants:
                p.plan(f"train:{variant}", 1)
                p.plan(_eval_unit(False), 2)
                p.plan(_eval_unit(True), 1)

    def flush(self) -> None:
        from sdft_ray.study.report import write_tables

        self.runtimes["total_s"] = round(time.perf_counter() - self.progress.start, 1)
        self.runtimes["loadavg_now"] = [round(x, 2) for x in os.getloadavg()]
        write_tables(self, self.out)

    def run(self) -> dict[str, Path]:
        import torch

        from sdft_ray.study.report import write_report

        for key, value in (("DS_ACCELERATOR", "cpu"), ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
            os.environ.setdefault(key, value)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        old_threads = torch.get_num_threads()
        torch.set_num_threads(self.spec.eval.threads)  # the driver only evaluates; training runs in Ray actors
        try:
            self.prepare()
            self.plan()
            self.phase0()
            self.flush()
            if self.gate_passed or self.spec.teacher_check.on_fail == "continue":
                self.phase1()  # flushes the tables after every run
                self.profiles()
                if self.spec.curriculum:
                    self.phase2()
            else:
                self.progress.say("phase 0: no template passed the gate and teacher_check.on_fail is 'stop'")
        finally:
            torch.set_num_threads(old_threads)
            _shutdown_ray()
        self.flush()
        paths = write_report(self, self.out)
        self.progress.say(f"done; verdict: {json.loads((self.out / 'verdict.json').read_text())['verdict']}")
        return paths


def run_study(spec: StudySpec, out_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str], *,
              echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Run ``spec`` (resuming from ``work_dir``), write tables, raw rows and plots to ``out_dir``."""
    return StudyRunner(spec, out_dir, work_dir, echo=echo).run()


def _eval_unit(with_kl: bool) -> str:
    return "eval:model" if with_kl else "eval:prompts"


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def _history_rows(run_dir: Path, tags: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-step training metrics of a run, tagged (the step's scheduled lr is ``step_lr``)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    keys = ("loss", "divergence", "implicit_reward", "grad_norm", "rollout/response_len", "rollout/finished_fraction",
            "time/step")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            h = json.loads(line)
            out.append({**tags, "step": h.get("step"), **({"step_lr": h["lr"]} if "lr" in h else {}),
                        **{k: h[k] for k in keys if k in h}})
    return out


def _drop_training_state(ckpt: Path, keep_student: bool) -> None:
    """A finished, evaluated run keeps its metrics; its DeepSpeed optimizer state and EMA file go,
    and its student weights too unless a later phase may start from them."""
    shutil.rmtree(ckpt / "deepspeed", ignore_errors=True)
    for path in ckpt.glob("*.safetensors"):
        path.unlink(missing_ok=True)
    if not keep_student:
        shutil.rmtree(ckpt / "student", ignore_errors=True)


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover
        pass
