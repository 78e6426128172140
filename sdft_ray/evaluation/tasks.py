"""Evaluation tasks: what to generate for, how long, and how to score it; loaded from YAML.

A task file (``configs/eval/*.yaml``) holds ``tasks:``, a list of task mappings (or is such
a list, or is one task mapping), plus optional ``defaults:`` merged under every task::

    defaults: {max_new_tokens: 48}
    tasks:
      - name: fictional_facts
        path: data/fictional_facts/eval.jsonl
        metric: contains
        kind_column: kind

Every field is an :class:`EvalTask` field; a bad value raises
:class:`~sdft_ray.errors.ConfigError` naming the file, the task and the field.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdft_ray.checkpoint import atomic_write_text
from sdft_ray.config import read_yaml
from sdft_ray.errors import ConfigError
from sdft_ray.evaluation.metrics import METRICS, Scorer, get_metric

__all__ = ["EvalTask", "load_tasks", "tasks_from_dicts", "write_task_yaml"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _fail(task: str, name: str, detail: str) -> ConfigError:
    error = ConfigError(f"eval task {task!r}: field {name!r}: {detail}", field=name)
    error.detail = detail  # type: ignore[attr-defined]
    return error


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class EvalTask:
    """One evaluation set and how to score it.

    ``path`` is any file :func:`sdft_ray.data.load_examples` reads (relative paths are tried
    against the working directory, then the repository root). The prompt is read from
    ``prompt_column`` and the reference from ``reference_column``; ``kind_column`` (e.g.
    ``kind`` with values strict/paraphrase/ood) adds one result row per value. ``metric`` names
    a function in :data:`~sdft_ray.evaluation.metrics.METRICS`, called with ``metric_options``.
    With ``num_samples > 1`` every prompt is sampled that many times at ``temperature`` /
    ``top_p`` and pass@k is reported for each ``k`` (default: 1 and ``num_samples``). A
    response is cut at the first of the ``stop`` strings before it is scored.
    """

    name: str
    path: str
    metric: str = "contains"
    metric_options: Mapping[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 64
    num_samples: int = 1
    k: tuple[int, ...] = ()
    system_prompt: str | None = None
    kind_column: str | None = None
    prompt_column: str = "prompt"
    reference_column: str = "answer"
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise _fail("?", "name", f"expected a non-empty string, got {self.name!r}")
        name = self.name
        for key in ("path", "metric", "prompt_column", "reference_column"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise _fail(name, key, f"expected a non-empty string, got {value!r}")
        for key in ("system_prompt", "kind_column"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise _fail(name, key, f"expected a non-empty string or null, got {value!r}")
        if self.metric not in METRICS:
            raise _fail(name, "metric", f"unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        if not isinstance(self.metric_options, Mapping):
            raise _fail(name, "metric_options", f"expected a mapping, got {type(self.metric_options).__name__}")
        try:
            get_metric(self.metric, self.metric_options)
        except ValueError as e:
            raise _fail(name, "metric_options", str(e)) from None
        for key in ("max_new_tokens", "num_samples"):
            if not _positive_int(getattr(self, key)):
                raise _fail(name, key, f"expected a positive integer, got {getattr(self, key)!r}")
        ks = self.k
        if isinstance(ks, int) and not isinstance(ks, bool):
            ks = (ks,)
        if not isinstance(ks, Iterable) or isinstance(ks, (str, Mapping)) or not all(map(_positive_int, ks)):
            raise _fail(name, "k", f"expected a list of positive integers, got {self.k!r}")
        ks = tuple(sorted(set(ks))) or ((1, self.num_samples) if self.num_samples > 1 else ())
        if ks and ks[-1] > self.num_samples:
            raise _fail(name, "k", f"pass@{ks[-1]} needs num_samples >= {ks[-1]}, got num_samples={self.num_samples}")
        object.__setattr__(self, "k", tuple(sorted(set(ks))))
        object.__setattr__(self, "metric_options", dict(self.metric_options))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Iterable) or not all(isinstance(x, str) and x for x in stop):
            raise _fail(name, "stop", f"expected a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        for key, low, high in (("temperature", 0.0, float("inf")), ("top_p", 0.0, 1.0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise _fail(name, key, f"expected a number in ({low}, {high}], got {value!r}")

    def scorer(self) -> Scorer:
        """``score(response, reference)`` with this task's metric options bound."""
        return get_metric(self.metric, self.metric_options)

    def cut(self, response: str) -> str:
        """``response`` up to the first ``stop`` string (all of it when there is none)."""
        for marker in self.stop:
            response = response.split(marker, 1)[0]
        return response

    def resolved_path(self) -> Path:
        """``path`` as given if it exists (or is absolute), else under the repository root."""
        path = Path(self.path).expanduser()
        if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
            return path
        return REPO_ROOT / path


_FIELDS = {f.name for f in dataclasses.fields(EvalTask)}


def _task(entry: Any, where: str) -> EvalTask:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a task mapping, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field; allowed: {', '.join(sorted(_FIELDS))}",
                          field=unknown[0])
    for required in ("name", "path"):
        if required not in entry:
            raise ConfigError(f"{where}.{required}: missing required field", field=required)
    values = dict(entry)
    for key in ("k", "stop"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    try:
        return EvalTask(**values)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e.field}: {getattr(e, 'detail', e)}", field=e.field) from None


def tasks_from_dicts(entries: Sequence[Mapping[str, Any]], defaults: Mapping[str, Any] | None = None,
                     source: str = "tasks") -> list[EvalTask]:
    """Build tasks from mappings (``defaults`` under each); errors read ``<source>[i].<field>: ...``."""
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence):
        raise ConfigError(f"{source}: expected a list of tasks, got {type(entries).__name__}")
    if defaults is not None and not isinstance(defaults, Mapping):
        raise ConfigError(f"{source}: 'defaults' must be a mapping, got {type(defaults).__name__}", field="defaults")
    tasks = []
    for i, entry in enumerate(entries):
        merged = {**(defaults or {}), **entry} if isinstance(entry, Mapping) else entry
        tasks.append(_task(merged, f"{source}[{i}]"))
    return tasks


def _load_file(path: Path) -> list[EvalTask]:
    loaded = read_yaml(path, "eval task file")
    if isinstance(loaded, Mapping) and "tasks" in loaded:
        extra = sorted(set(loaded) - {"tasks", "defaults"})
        if extra:
            raise ConfigError(f"{path}: unknown top-level key {extra[0]!r}; allowed: tasks, defaults", field=extra[0])
        return tasks_from_dicts(loaded["tasks"], loaded.get("defaults"), f"{path}: tasks")
    if isinstance(loaded, Mapping):
        return [_task(loaded, f"{path}: task")]
    if isinstance(loaded, list):
        return tasks_from_dicts(loaded, None, f"{path}: tasks")
    raise ConfigError(f"{path}: expected a mapping with 'tasks' or a list of tasks, got {type(loaded).__name__}")


def load_tasks(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[EvalTask]:
    """Tasks from a YAML file, a directory of ``*.yaml``/``*.yml`` files (sorted), or a list of
    either. Task names must be unique."""
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[Path] = []
    for src in map(Path, sources):
        if src.is_dir():
            files.extend(sorted(p for p in src.iterdir() if p.suffix in (".yaml", ".yml")))
        elif src.is_file():
            files.append(src)
        else:
            raise ConfigError(f"eval task file not found: {src}")
    tasks: list[EvalTask] = []
    seen: dict[str, Path] = {}
    for file in files:
        for task in _load_file(file):
            if task.name in seen:
                raise ConfigError(f"{file}: duplicate task name {task.name!r} (also in {seen[task.name]})",
                                  field="name")
            seen[task.name] = file
            tasks.append(task)
    if not tasks:
        raise ConfigError(f"no eval tasks found in {', '.join(map(str, sources))}")
    return tasks


def write_task_yaml(tasks: Sequence[EvalTask], path: str | os.PathLike[str]) -> Path:
    """Write ``tasks`` as a task file that :func:`load_tasks` reads back to equal tasks."""
    entries = []
    for task in tasks:
        entry: dict[str, Any] = {}
        for f in dataclasses.fields(EvalTask):
            value = getattr(task, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name in ("name", "path") or value != default:
                entry[f.name] = list(value) if isinstance(value, tuple) else value
        entries.append(entry)
    out = Path(path)
    atomic_write_text(out, yaml.safe_dump({"tasks": entries}, sort_keys=False, allow_unicode=True))
    return out
