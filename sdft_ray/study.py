"""A small continual-learning study: a sequential curriculum of SFT / SDFT stages over an lr sweep.

For every ``method`` (``sft``: the supervised baseline, ``sdft``: self-distillation; any
``algorithm.variant`` works) and every learning rate, the stages run in order: stage ``k``
trains (:func:`sdft_ray.runner.train`) starting from stage ``k-1``'s student weights (stage 1
from the base model) and then evaluates **every** task - the new ones, the earlier ones and
the prior-capability probe - on the stage's checkpoint. Stage 0 is the base model, evaluated
once and shared by every (method, lr).

Beside the student, the study measures the **demonstration-conditioned teacher**: the base
model prompted with the query *and* its demonstration through the teacher template
(:func:`sdft_ray.prompts.fill_template`), which is the signal SDFT distils. A teacher that
cannot use the demonstration cannot teach anything (the paper's "in-context learning gates
the method").

Outputs (``out_dir``)::

    results.jsonl / results.csv   method, lr, stage, stage_name, trained_on, task, kind, metric, n, score, ...
    teacher.jsonl / teacher.csv   the base model without (student) and with (teacher) the demonstration
    training.jsonl                per training step: method, lr, stage, step, loss, seconds
    runtimes.json                 wall-clock of every training run and evaluation, load averages
    summary.md                    the tables above, pivoted (what docs/study.md and the README quote)
    frontier.png                  new-task vs prior-task accuracy, one point per (method, lr), per stage
    curriculum.png                per-task accuracy over the stages, one line per (task, method), per lr

The study is described by a YAML file (``configs/study/*.yaml``, see :class:`StudySpec` and
:func:`load_study`); everything that is not measured (model, stage data, steps, eval limits)
lives there, ``--set a.b=c`` overrides included. A rerun with the same ``work_dir`` reuses
finished stages (their checkpoint and evaluation), so an interrupted study resumes.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from sdft_ray.checkpoint import atomic_write_text
from sdft_ray.config import RunConfig, _set_dotted, config_from_dict, parse_override, read_yaml
from sdft_ray.errors import ConfigError

log = logging.getLogger("sdft_ray.study")

__all__ = [
    "RESULT_COLUMNS",
    "TEACHER_COLUMNS",
    "StageSpec",
    "StudySpec",
    "TeacherSpec",
    "load_study",
    "plot_curriculum",
    "plot_frontier",
    "run_study",
    "study_from_dict",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_COLUMNS = ("method", "lr", "stage", "stage_name", "trained_on", "task", "kind", "metric", "n", "score",
                  "mean_response_tokens", "finished_fraction")
TEACHER_COLUMNS = ("model", "role", "task", "kind", "metric", "n", "score", "mean_response_tokens",
                   "finished_fraction")
BASE_STAGE = "base"


# ---- the study description ------------------------------------------------------------------


@dataclass
class StageSpec:
    """One curriculum stage: train on ``data`` for ``steps`` optimizer steps; ``task`` is the
    eval task that measures what this stage teaches (its "new task").

    ``match_eval_on`` (e.g. ``[entity, fact]``) keeps only the training rows whose values in
    these columns occur in the (limited) eval subset of ``task``: with a few steps, training
    then covers exactly the facts whose questions are scored. ``overrides`` is a RunConfig tree
    merged for this stage only (e.g. ``{rollout: {max_new_tokens: 48}}``)."""

    name: str
    data: str
    task: str
    steps: int
    match_eval_on: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherSpec:
    """Where the demonstration of an eval row comes from, for the teacher's own accuracy.

    ``train`` + ``match_on``: the demonstration of the training row with the same values in
    these columns (fictional facts: ``entity`` + ``fact``). ``from_reference``: the row's
    reference serialised as JSON (tool calls: the training demonstrations are exactly that)."""

    task: str
    train: str | None = None
    match_on: tuple[str, ...] = ()
    from_reference: bool = False


@dataclass
class StudySpec:
    model: str
    methods: list[str]
    lrs: list[float]
    stages: list[StageSpec]
    eval_tasks: str = "configs/eval/continual.yaml"
    eval_limit_per_kind: int | None = None  # first N rows of every kind of every task
    eval_max_new_tokens: dict[str, int] = field(default_factory=dict)  # per task name
    eval_batch_size: int = 16
    eval_threads: int = 1  # torch threads in the driver while evaluating (more is slower on a busy machine)
    parallel_eval: bool = False  # evaluate on a background thread while the next stage trains
    prior_task: str = "prior"
    teacher: list[TeacherSpec] = field(default_factory=list)
    train: dict[str, Any] = field(default_factory=dict)  # RunConfig tree under every stage
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep_optimizer_state: bool = False  # False: drop a stage's DeepSpeed state once the next stage has its weights

    def run_config(self, method: str, lr: float, stage: StageSpec, model_path: str, data_path: str,
                   out_dir: Path) -> RunConfig:
        """The RunConfig of one training run: train tree < method overrides < stage overrides < study values."""
        tree = copy.deepcopy(self.train)
        _merge(tree, copy.deepcopy(self.method_overrides.get(method, {})))
        _merge(tree, copy.deepcopy(stage.overrides))
        _merge(tree, {"algorithm": {"variant": method}, "model": {"path": model_path},
                      "data": {"path": data_path}, "learner": {"lr": float(lr)},
                      "schedule": {"max_steps": int(stage.steps)},
                      "output": {"dir": str(out_dir), "save_final": True, "checkpoint_every": 0, "keep_last": 1}})
        return config_from_dict(tree, f"study {method} lr={lr} stage {stage.name}")


def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: expected a list of column names, got {value!r}", field=where)


def study_from_dict(tree: Mapping[str, Any], source: str = "<dict>") -> StudySpec:
    """Validate a study mapping (see ``configs/study/smollm2.yaml``); errors name the field."""
    known = {f.name for f in dataclasses.fields(StudySpec)}
    unknown = sorted(set(tree) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown study field {unknown[0]!r}; allowed: {', '.join(sorted(known))}",
                          field=unknown[0])
    for key in ("model", "methods", "lrs", "stages"):
        if key not in tree:
            raise ConfigError(f"{source}: missing required field {key!r}", field=key)
    values = dict(tree)
    if not isinstance(values["model"], str) or not values["model"].strip():
        raise ConfigError(f"{source}: model: expected a model folder or embedded:<name>", field="model")
    methods = values["methods"]
    if isinstance(methods, str):
        methods = [methods]
    if not methods or not all(isinstance(m, str) and m for m in methods):
        raise ConfigError(f"{source}: methods: expected a non-empty list of variant names", field="methods")
    values["methods"] = list(methods)
    lrs = values["lrs"]
    if isinstance(lrs, (int, float)) and not isinstance(lrs, bool):
        lrs = [lrs]
    try:
        lrs = [float(x) for x in lrs]
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: lrs: expected a list of numbers, got {values['lrs']!r}", field="lrs") from None
    if not lrs or any(x <= 0 for x in lrs):
        raise ConfigError(f"{source}: lrs: expected a non-empty list of positive numbers, got {lrs}", field="lrs")
    values["lrs"] = lrs
    stages = []
    if not isinstance(values["stages"], Sequence) or not values["stages"]:
        raise ConfigError(f"{source}: stages: expected a non-empty list", field="stages")
    stage_fields = {f.name for f in dataclasses.fields(StageSpec)}
    for i, entry in enumerate(values["stages"]):
        where = f"{source}: stages[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a mapping", field="stages")
        bad = sorted(set(entry) - stage_fields)
        if bad:
            raise ConfigError(f"{where}.{bad[0]}: unknown field; allowed: {', '.join(sorted(stage_fields))}",
                              field=bad[0])
        for key in ("name", "data", "task", "steps"):
            if key not in entry:
                raise ConfigError(f"{where}.{key}: missing required field", field=key)
        steps = entry["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"{where}.steps: expected a positive integer, got {steps!r}", field="steps")
        stages.append(StageSpec(name=str(entry["name"]), data=str(entry["data"]), task=str(entry["task"]),
                                steps=steps, match_eval_on=_strings(entry.get("match_eval_on"), f"{where}.match_eval_on"),
                                overrides=dict(entry.get("overrides") or {})))
    names = [s.name for s in stages]
    if len(set(names)) != len(names) or BASE_STAGE in names:
        raise ConfigError(f"{source}: stages: names must be unique and not {BASE_STAGE!r}, got {names}", field="stages")
    values["stages"] = stages
    teacher = []
    for i, entry in enumerate(values.get("teacher") or []):
        where = f"{source}: teacher[{i}]"
        if not isinstance(entry, Mapping) or "task" not in entry:
            raise ConfigError(f"{where}: expected a mapping with 'task'", field="teacher")
        spec = TeacherSpec(task=str(entry["task"]), train=entry.get("train"),
                           match_on=_strings(entry.get("match_on"), f"{where}.match_on"),
                           from_reference=bool(entry.get("from_reference", False)))
        if not spec.from_reference and not (spec.train and spec.match_on):
            raise ConfigError(f"{where}: give either train + match_on or from_reference: true", field="teacher")
        teacher.append(spec)
    values["teacher"] = teacher
    limit = values.get("eval_limit_per_kind")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"{source}: eval_limit_per_kind: expected a positive integer or null, got {limit!r}",
                          field="eval_limit_per_kind")
    for key in ("train", "method_overrides", "eval_max_new_tokens"):
        if not isinstance(values.get(key, {}) or {}, Mapping):
            raise ConfigError(f"{source}: {key}: expected a mapping", field=key)
        values[key] = dict(values.get(key) or {})
    spec = StudySpec(**values)
    # Every run's config must validate before anything trains: build them with placeholders.
    for method in spec.methods:
        for stage in spec.stages:
            try:
                spec.run_config(method, spec.lrs[0], stage, spec.model, stage.data, Path("runs/study-check"))
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}", field=e.field) from None
    return spec


def load_study(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> StudySpec:
    """Read a study YAML and apply ``a.b=c`` overrides (e.g. ``lrs=[1e-5]``, ``stages.0.steps=4``
    is not supported: use ``--steps`` of the CLI or edit the file)."""
    tree = read_yaml(path, "study file") or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return study_from_dict(tree, str(path) + (" + --set " + " ".join(overrides) if overrides else ""))


# ---- data selection -------------------------------------------------------------------------


def _resolve(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return p
    return REPO_ROOT / p


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    path = _resolve(path)
    if path.suffix not in (".jsonl", ".json"):
        raise ConfigError(f"{path}: the study selects rows from JSON-lines files only")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    keys = list(columns) + sorted({k for r in rows for k in r} - set(columns))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, restval="", lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) and k not in ("lr",) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())
    return path


def select_per_kind(rows: Sequence[Mapping[str, Any]], kind_column: str | None, limit: int | None) -> list[dict]:
    """The first ``limit`` rows of every value of ``kind_column`` (file order kept)."""
    if limit is None:
        return [dict(r) for r in rows]
    counts: dict[Any, int] = {}
    out = []
    for row in rows:
        kind = row.get(kind_column) if kind_column else None
        if counts.get(kind, 0) < limit:
            counts[kind] = counts.get(kind, 0) + 1
            out.append(dict(row))
    return out


def _key(row: Mapping[str, Any], columns: Sequence[str], where: str) -> tuple:
    missing = [c for c in columns if c not in row]
    if missing:
        raise ConfigError(f"{where}: row has no column {missing[0]!r} (needed to match train and eval rows)")
    return tuple(json.dumps(row[c], sort_keys=True) for c in columns)


# ---- evaluation -------------------------------------------------------------------------------


def _slim(row: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("task", "kind", "metric", "n", "score", "mean_response_tokens", "finished_fraction")
    return {k: row[k] for k in keep if k in row}


@dataclass
class _Prepared:
    tasks: list[Any]  # EvalTask on the selected subsets
    teacher_tasks: list[Any]  # the same tasks with teacher prompts (query + demonstration)
    teacher_missing: dict[str, int]
    stage_data: dict[str, str]  # stage name -> training file


def prepare_study(spec: StudySpec, work_dir: Path) -> _Prepared:
    """Write the eval subsets, the teacher-prompt eval files and the stage training subsets."""
    from sdft_ray.evaluation import load_tasks
    from sdft_ray.prompts import DEFAULT_TEMPLATE_NAME, fill_template, resolve_template

    tasks = {t.name: t for t in load_tasks(_resolve(spec.eval_tasks))}
    for name in [spec.prior_task] + [s.task for s in spec.stages] + [t.task for t in spec.teacher]:
        if name not in tasks:
            raise ConfigError(f"study: task {name!r} is not in {spec.eval_tasks} (tasks: {', '.join(tasks)})")
    data_dir = work_dir / "data"
    subsets: dict[str, list[dict]] = {}
    prepared = []
    for name, task in tasks.items():
        rows = select_per_kind(read_jsonl(task.resolved_path()), task.kind_column, spec.eval_limit_per_kind)
        subsets[name] = rows
        path = write_jsonl(data_dir / f"eval_{name}.jsonl", rows)
        prepared.append(dataclasses.replace(task, path=str(path),
                                            max_new_tokens=int(spec.eval_max_new_tokens.get(name, task.max_new_tokens))))
    by_name = {t.name: t for t in prepared}

    template = resolve_template((spec.train.get("prompts") or {}).get("teacher_template", DEFAULT_TEMPLATE_NAME))
    teacher_tasks, missing = [], {}
    for tspec in spec.teacher:
        task = by_name[tspec.task]
        demos: dict[tuple, str] = {}
        if not tspec.from_reference:
            for row in read_jsonl(tspec.train):
                demos.setdefault(_key(row, tspec.match_on, str(tspec.train)), row["demonstration"])
        rows, lost = [], 0
        for row in subsets[tspec.task]:
            if tspec.from_reference:
                demo = json.dumps(row[task.reference_column])
            else:
                demo = demos.get(_key(row, tspec.match_on, f"eval task {tspec.task}"))
            prompt = row.get(task.prompt_column)
            if demo is None or not isinstance(prompt, str):
                lost += 1
                continue
            rows.append({**row, task.prompt_column: fill_template(template, prompt, demo), "demonstration_used": demo})
        missing[tspec.task] = lost
        if rows:
            path = write_jsonl(data_dir / f"teacher_{tspec.task}.jsonl", rows)
            teacher_tasks.append(dataclasses.replace(task, path=str(path)))

    stage_data = {}
    for stage in spec.stages:
        if not stage.match_eval_on:
            stage_data[stage.name] = str(_resolve(stage.data))
            continue
        wanted = {_key(r, stage.match_eval_on, f"eval task {stage.task}") for r in subsets[stage.task]}
        rows = [r for r in read_jsonl(stage.data) if _key(r, stage.match_eval_on, stage.data) in wanted]
        if not rows:
            raise ConfigError(f"study: stage {stage.name!r}: no row of {stage.data} matches the eval subset of "
                              f"{stage.task!r} on {list(stage.match_eval_on)}")
        stage_data[stage.name] = str(write_jsonl(data_dir / f"train_{stage.name}.jsonl", rows))
    return _Prepared(list(by_name.values()), teacher_tasks, missing, stage_data)


def _evaluate(spec: StudySpec, model: str, tasks: Sequence[Any], cache: Path) -> tuple[list[dict], float, bool]:
    """Evaluate ``model`` on ``tasks`` (greedy), cached in ``cache`` (rows + per-sample records).
    Returns (rows, seconds the evaluation took, whether it came from the cache)."""
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        return saved["rows"], saved["seconds"], True
    from sdft_ray.evaluation import evaluate_checkpoint

    samples: list[dict] = []
    t0 = time.perf_counter()
    rows = evaluate_checkpoint(model, list(tasks), engine="hf", batch_size=spec.eval_batch_size, samples=samples)
    seconds = time.perf_counter() - t0
    rows = [_slim(r) for r in rows]
    write_jsonl(cache.with_name(cache.stem + "_samples.jsonl"), samples)
    atomic_write_text(cache, json.dumps({"model": str(model), "rows": rows, "seconds": seconds}, indent=1))
    return rows, seconds, False


# ---- the study --------------------------------------------------------------------------------


def _lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("+", "").replace("-0", "-")


def _history_rows(history: Sequence[Mapping[str, Any]], **tags: Any) -> list[dict[str, Any]]:
    keys = ("loss", "divergence", "implicit_reward", "grad_norm", "rollout/response_len", "time/step")
    # the step's scheduled learning rate is "step_lr": "lr" is the study's peak lr (a tag)
    return [{**tags, "step": i + 1, **({"step_lr": h["lr"]} if "lr" in h else {}), **{k: h[k] for k in keys if k in h}}
            for i, h in enumerate(history)]


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class _Evaluator:
    """Runs evaluations in order, inline or on one background thread (``parallel``) so that a
    stage's evaluation overlaps the next training run (the driver only waits on Ray actors then)."""

    def __init__(self, parallel: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="study-eval") if parallel else None

    def submit(self, fn: Callable[[], Any], on_done: Callable[[Any], None]):
        from concurrent.futures import Future

        if self.pool is None:
            future: Future = Future()
            future.set_result(fn())
            on_done(future.result())
            return future
        future = self.pool.submit(fn)
        future.add_done_callback(lambda f: f.exception() is None and on_done(f.result()))
        return future

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def run_study(spec: StudySpec, out_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str], *,
              echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Run every (method, lr) curriculum, write the tables and the plots into ``out_dir``.

    Training runs, checkpoints and per-sample evaluation records go under ``work_dir``; a
    stage whose checkpoint and evaluation are already there is not run again. With
    ``spec.parallel_eval`` evaluations run on a background thread while the next stage trains."""
    import threading

    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Import everything both threads use here, once: transformers' lazy module is not safe to
    # import from two threads at the same time (the evaluator thread runs beside training).
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    import sdft_ray.engines.hf  # noqa: F401
    import sdft_ray.evaluation.runner  # noqa: F401
    import sdft_ray.runner  # noqa: F401
    from sdft_ray.checkpoint import CheckpointManager
    from sdft_ray.models import resolve_model_path

    del transformers
    out, work = Path(out_dir), Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    runtimes: dict[str, Any] = {"loadavg_start": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
                                "parallel_eval": spec.parallel_eval, "eval_threads": spec.eval_threads,
                                "runs": [], "evals": []}
    prepared = prepare_study(spec, work)
    base_folder = str(resolve_model_path(spec.model, (spec.train.get("model") or {}).get("cache_dir")))
    lock = threading.RLock()
    evals: dict[tuple, list[dict[str, Any]]] = {}  # (method, lr, stage) -> rows; ("base",) / ("teacher",)
    training: list[dict[str, Any]] = []
    order = {(m, lr): i for i, (m, lr) in enumerate((m, lr) for m in spec.methods for lr in spec.lrs)}

    def results() -> list[dict[str, Any]]:
        rows = []
        for (method, lr), _ in sorted(order.items(), key=lambda kv: kv[1]):
            if ("base",) in evals:
                rows += [{"method": method, "lr": lr, "stage": 0, "stage_name": BASE_STAGE, "trained_on": "", **r}
                         for r in evals[("base",)]]
            for k, stage in enumerate(spec.stages, start=1):
                rows += [{"method": method, "lr": lr, "stage": k, "stage_name": stage.name,
                          "trained_on": stage.task, **r} for r in evals.get((method, lr, k), [])]
        return rows

    def teacher_table() -> list[dict[str, Any]]:
        taught = {t.task for t in spec.teacher}
        rows = [{"model": "base", "role": "student (query only)", **r} for r in evals.get(("base",), [])
                if r["task"] in taught]
        return rows + [{"model": "base", "role": "teacher (query + demonstration)", **r}
                       for r in evals.get(("teacher",), [])]

    def flush() -> None:
        with lock:
            table = results()
            write_jsonl(out / "results.jsonl", table)
            write_csv(out / "results.csv", table, RESULT_COLUMNS)
            write_jsonl(out / "training.jsonl", training)
            teacher = teacher_table()
            write_jsonl(out / "teacher.jsonl", teacher)
            write_csv(out / "teacher.csv", teacher, TEACHER_COLUMNS)
            runtimes["total_s"] = round(time.perf_counter() - t_start, 1)
            runtimes["loadavg_now"] = [round(x, 2) for x in os.getloadavg()]
            atomic_write_text(out / "runtimes.json", json.dumps(runtimes, indent=1, default=str))

    def evaluation(key: tuple, what: str, model: str, tasks: Sequence[Any], cache: Path) -> None:
        def run() -> tuple[list[dict], float, bool]:
            echo(f"[study] evaluating {what} (load {os.getloadavg()[0]:.1f})")
            return _evaluate(spec, model, tasks, cache)

        def done(result: tuple[list[dict], float, bool]) -> None:
            rows, seconds, cached = result
            with lock:
                evals[key] = rows
                runtimes["evals"].append({"what": what, "seconds": round(seconds, 1)})
            echo(f"[study] evaluated {what} in {seconds:.0f} s" + (" (cached)" if cached else ""))
            flush()

        futures.append(evaluator.submit(run, done))

    old_threads = torch.get_num_threads()
    torch.set_num_threads(spec.eval_threads)  # process-wide: the driver itself only evaluates
    evaluator = _Evaluator(spec.parallel_eval)
    futures: list[Any] = []
    try:
        evaluation(("base",), f"the base model {spec.model}", base_folder, prepared.tasks,
                   work / "evals" / "base.json")
        if prepared.teacher_tasks:
            runtimes["teacher_rows_without_demonstration"] = prepared.teacher_missing
            evaluation(("teacher",), "the demonstration-conditioned teacher (base model, query + demonstration)",
                       base_folder, prepared.teacher_tasks, work / "evals" / "teacher_base.json")
        for method in spec.methods:
            for lr in spec.lrs:
                tags = {"method": method, "lr": lr}
                model_path, previous_ckpt = base_folder, None
                for k, stage in enumerate(spec.stages, start=1):
                    run_dir = work / "runs" / f"{method}_lr{_lr_tag(lr)}" / f"{k}-{stage.name}"
                    cache = run_dir / "eval.json"
                    ckpt = CheckpointManager(run_dir / "checkpoints").latest()
                    reused = not (ckpt is None or not (ckpt / "student" / "config.json").is_file())
                    if not reused:
                        cfg = spec.run_config(method, lr, stage, model_path, prepared.stage_data[stage.name], run_dir)
                        echo(f"[study] {method} lr={lr:g} stage {k} ({stage.name}): training {stage.steps} steps "
                             f"from {model_path} (load {os.getloadavg()[0]:.1f})")
                        if run_dir.exists():
                            shutil.rmtree(run_dir)  # an unfinished earlier attempt
                        cache.unlink(missing_ok=True)
                        from sdft_ray.runner import train

                        t0 = time.perf_counter()
                        summary = train(cfg)
                        train_s = time.perf_counter() - t0
                        ckpt = CheckpointManager(run_dir / "checkpoints").latest()
                        if ckpt is None:
                            raise RuntimeError(f"{run_dir}: training finished without a checkpoint")
                        timing = {**tags, "stage": k, "stage_name": stage.name, "steps": summary["steps"],
                                  "train_s": round(train_s, 1),
                                  "loop_s": round(float(summary.get("seconds", 0.0)), 1),
                                  "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
                        atomic_write_text(run_dir / "timing.json", json.dumps(timing))
                        echo(f"[study] {method} lr={lr:g} stage {k} ({stage.name}): trained in {train_s:.0f} s")
                    else:
                        echo(f"[study] {method} lr={lr:g} stage {k} ({stage.name}): reusing {ckpt}")
                        timing_file = run_dir / "timing.json"
                        timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {
                            **tags, "stage": k, "stage_name": stage.name, "steps": stage.steps, "train_s": None}
                    with lock:
                        runtimes["runs"].append({**timing, "fresh": not reused})
                        training.extend(_history_rows(_read_metrics(run_dir), **tags, stage=k, stage_name=stage.name))
                    evaluation((method, lr, k), f"{method} lr={lr:g} after stage {k} ({stage.name})",
                               str(ckpt / "student"), prepared.tasks, cache)
                    if previous_ckpt is not None and not spec.keep_optimizer_state:
                        _drop_training_state(previous_ckpt)
                    previous_ckpt, model_path = ckpt, str(ckpt / "student")
                if previous_ckpt is not None and not spec.keep_optimizer_state:
                    _drop_training_state(previous_ckpt)
        _shutdown_ray()
    finally:
        evaluator.close()
        torch.set_num_threads(old_threads)
    for future in futures:
        future.result()  # re-raise an evaluation error
    runtimes["total_s"] = round(time.perf_counter() - t_start, 1)
    log_file = work / "invocations.jsonl"  # every run_study call on this work folder, with its wall-clock
    trained = sum(1 for r in runtimes["runs"] if r.get("fresh"))
    with open(log_file, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "total_s": runtimes["total_s"],
                             "trained_runs": trained, "loadavg_start": runtimes["loadavg_start"]}) + "\n")
    runtimes["invocations"] = [json.loads(x) for x in log_file.read_text(encoding="utf-8").splitlines() if x.strip()]
    flush()
    table, teacher = results(), teacher_table()
    paths = {"results": out / "results.csv", "teacher": out / "teacher.csv", "runtimes": out / "runtimes.json"}
    paths["frontier"] = plot_frontier(table, spec, out / "frontier.png")
    paths["curriculum"] = plot_curriculum(table, spec, out / "curriculum.png", teacher)
    paths["summary"] = write_summary(table, teacher, runtimes, spec, out / "summary.md")
    return paths


def _drop_training_state(ckpt: Path) -> None:
    """Keep ``student/`` (the next stage's starting point and what was evaluated); remove the
    DeepSpeed optimizer state and the EMA file, which a finished study never reads again."""
    for name in ("deepspeed",):
        shutil.rmtree(ckpt / name, ignore_errors=True)
    for path in ckpt.glob("*.safetensors"):
        path.unlink(missing_ok=True)


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:  # pragma: no cover
        pass


# ---- tables and plots -------------------------------------------------------------------------


def _score(results: Sequence[Mapping[str, Any]], *, kind: str = "all", **match: Any) -> float | None:
    for row in results:
        if row["kind"] == kind and all(row.get(k) == v for k, v in match.items()):
            return float(row["score"])
    return None


def plot_frontier(results: Sequence[Mapping[str, Any]], spec: StudySpec, path: Path) -> Path:
    """One panel per stage: x = that stage's task accuracy after the stage, y = prior-task
    accuracy after the stage; one point per (method, lr); the base model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = ["o", "s", "^", "D", "v", "P"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(spec.stages), figsize=(5.2 * len(spec.stages), 4.4), squeeze=False)
    for k, (stage, ax) in enumerate(zip(spec.stages, axes[0]), start=1):
        base_x = _score(results, stage=0, task=stage.task)
        base_y = _score(results, stage=0, task=spec.prior_task)
        if base_x is not None and base_y is not None:
            ax.scatter([base_x], [base_y], marker="*", s=220, color="black", label="base model", zorder=3)
        for m, method in enumerate(spec.methods):
            xs, ys = [], []
            for lr in spec.lrs:
                x = _score(results, method=method, lr=lr, stage=k, task=stage.task)
                y = _score(results, method=method, lr=lr, stage=k, task=spec.prior_task)
                if x is None or y is None:
                    continue
                xs.append(x)
                ys.append(y)
                ax.annotate(f"{lr:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
            ax.plot(xs, ys, linestyle=":", marker=markers[m % len(markers)], color=colors[m % len(colors)],
                    label=method.upper(), markersize=8)
        ax.set_xlabel(f"new task: {stage.task} accuracy")
        ax.set_ylabel(f"prior task: {spec.prior_task} accuracy")
        ax.set_title(f"after stage {k} ({stage.name})")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{spec.model}: new-task vs prior-task accuracy (labels: learning rate)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_curriculum(results: Sequence[Mapping[str, Any]], spec: StudySpec, path: Path,
                    teacher_rows: Sequence[Mapping[str, Any]] = ()) -> Path:
    """One panel per lr: accuracy of every task (colour) after every stage, one line per method
    (line style); crosses at stage 0 mark the base model's accuracy *with* the demonstration
    in context (the teacher)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", ":"]
    labels = [BASE_STAGE] + [f"{k}: {s.name}" for k, s in enumerate(spec.stages, start=1)]
    fig, axes = plt.subplots(1, len(spec.lrs), figsize=(max(6.5, 5.2 * len(spec.lrs)), 5.4), squeeze=False)
    for lr, ax in zip(spec.lrs, axes[0]):
        for t, task in enumerate(tasks):
            for m, method in enumerate(spec.methods):
                ys = [_score(results, method=method, lr=lr, stage=k, task=task) for k in range(len(labels))]
                pts = [(k, y) for k, y in enumerate(ys) if y is not None]
                if pts:
                    ax.plot(*zip(*pts), linestyle=styles[m % len(styles)], marker="o", color=colors[t % len(colors)],
                            label=f"{task} ({method.upper()})")
            teacher = _score(teacher_rows, task=task, role="teacher (query + demonstration)")
            if teacher is not None:
                ax.scatter([0], [teacher], marker="x", s=70, color=colors[t % len(colors)],
                           label=f"{task}: teacher (base + demo)")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("curriculum stage (trained on, in order)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"lr = {lr:g}")
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=3, frameon=False, handlelength=3.5)
    fig.suptitle(f"{spec.model}: per-task accuracy over the curriculum "
                 "(colour: task, line style: method; x: base model + demonstration = teacher)", fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_summary(results: Sequence[Mapping[str, Any]], teacher_rows: Sequence[Mapping[str, Any]],
                  runtimes: Mapping[str, Any], spec: StudySpec, path: Path) -> Path:
    """Markdown pivots: accuracy (%) per (method, lr, stage) x task/kind, and teacher vs student."""
    columns = list(dict.fromkeys((r["task"], r["kind"]) for r in results))
    ns = {(r["task"], r["kind"]): r["n"] for r in results}
    lines = [f"# Study summary ({spec.model})", "",
             "Accuracy in % (greedy decoding). `all` = every evaluated row of the task; n = rows.", "",
             "| method | lr | stage | " + " | ".join(f"{t}/{k} (n={ns[(t, k)]})" for t, k in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    keys = list(dict.fromkeys((r["method"], r["lr"], r["stage"], r["stage_name"]) for r in results))
    for method, lr, stage, name in keys:
        cells = [_fmt(_score(results, kind=k, method=method, lr=lr, stage=stage, task=t)) for t, k in columns]
        lines.append(f"| {method} | {lr:g} | {stage}: {name} | " + " | ".join(cells) + " |")
    if teacher_rows:
        first_stage = {}
        for k, st in enumerate(spec.stages, start=1):
            first_stage.setdefault(st.task, k)
        last = len(spec.stages)
        runs = [(m, lr) for m in spec.methods for lr in spec.lrs]
        lines += ["", "## Teacher (base model with the demonstration in context) vs student", "",
                  "`after` = the student right after the stage that trained on the task; `final` = after the "
                  f"last stage ({last}: {spec.stages[-1].name}).", "",
                  "| task | kind | n | base model, query only | base model + demonstration (teacher) | "
                  + " | ".join(f"{m.upper()} {lr:g} after / final" for m, lr in runs) + " |",
                  "|---|---|---|---|---|" + "---|" * len(runs)]
        tkeys = list(dict.fromkeys((r["task"], r["kind"]) for r in teacher_rows if r["role"].startswith("teacher")))
        for task, kind in tkeys:
            student = _score(teacher_rows, kind=kind, task=task, role="student (query only)")
            teacher = next(r for r in teacher_rows if r["task"] == task and r["kind"] == kind
                           and r["role"].startswith("teacher"))
            k = first_stage.get(task)
            cells = [f"{_fmt(_score(results, kind=kind, method=m, lr=lr, stage=k, task=task)) if k else '-'} / "
                     f"{_fmt(_score(results, kind=kind, method=m, lr=lr, stage=last, task=task))}" for m, lr in runs]
            lines.append(f"| {task} | {kind} | {teacher['n']} | {_fmt(student)} | {_fmt(float(teacher['score']))} | "
                         + " | ".join(cells) + " |")
    runs = runtimes.get("runs", [])
    if runs:
        lines += ["", "## Runtimes", "", "| method | lr | stage | steps | training wall s (incl. actor start) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['lr']:g} | {r['stage']}: {r['stage_name']} | {r['steps']} | {r['train_s']} |"
                  for r in runs]
    evals = runtimes.get("evals", [])
    if evals:
        lines += ["", f"Evaluation wall s: {', '.join(str(e['seconds']) for e in evals)} "
                      f"(total {sum(e['seconds'] for e in evals):.0f} s)."]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
