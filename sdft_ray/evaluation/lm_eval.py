"""Plug lm-evaluation-harness task YAMLs into :mod:`sdft_ray.evaluation`.

lm-eval-harness describes a task with Jinja templates over the rows of a data set
(``doc_to_text``, ``doc_to_target``, ``doc_to_choice``), generation settings, answer-extraction
filters and metrics. :func:`convert_lm_eval_task` renders such a task over a **local** copy of
its data (nothing is downloaded: ``dataset_path`` is replaced by the ``data`` you pass, any
file :func:`sdft_ray.data.read_records` reads) into one JSONL file with ``prompt`` and
``answer`` columns plus a task file for it (``<name>.yaml``, for ``sdft-ray eval``), and returns the matching :class:`~sdft_ray.evaluation.tasks.EvalTask` s,
one per ``filter_list`` entry (``gsm8k/strict-match``, ``gsm8k/flexible-extract``), ready for
:func:`~sdft_ray.evaluation.evaluate_checkpoint` and the study runner.

What maps to what:

============================  ==================================================================
lm-eval-harness               sdft-ray
============================  ==================================================================
``task``                      ``EvalTask.name`` (``<task>/<filter name>`` for several filters)
``include``                   the included YAML (relative to the file) is merged underneath
``doc_to_text``               ``prompt`` (a Jinja template, or a column name)
``description``               prepended to every prompt
``doc_to_target``             ``answer`` (template, column name or int index into the choices)
``metric_list[].regexes_to_ignore``  removed from the reference (as lm-eval does before matching)
``output_type: generate_until``  generation; metric ``exact_match``, or ``regex`` with the
                              filter's ``regex_pattern`` and ``group_select`` (0 first, -1 last)
``output_type: multiple_choice``  the choices are listed as ``A. ...`` lines under the prompt and
                              the model must *generate* the letter (metric ``multiple_choice``)
``generation_kwargs``         ``max_gen_toks`` -> ``max_new_tokens``; ``until`` -> ``stop``
                              (the response is cut there before scoring); decoding is the
                              evaluator's (greedy by default)
``num_fewshot`` + fewshot rows  the first ``num_fewshot`` rows of ``fewshot_data`` (deterministic;
                              lm-eval samples them) joined with ``fewshot_delimiter``
============================  ==================================================================

Not supported (a :class:`~sdft_ray.errors.ConfigError` names the key): Python hooks
(``!function``), ``process_docs``, log-likelihood output types (``loglikelihood``,
``loglikelihood_rolling``), filters other than ``regex`` / ``take_first`` and metrics other
than ``exact_match`` / ``acc``. Multiple choice is scored generatively here (the letter the
model writes), not by comparing choice log-likelihoods as lm-eval does, so numbers are not
comparable to lm-eval's ``acc``; for leaderboard numbers run lm-eval itself on an exported
checkpoint (``sdft-ray export``; see docs/evaluation.md).
"""

from __future__ import annotations

import ast
import json
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sdft_ray.checkpoint import atomic_write_text
from sdft_ray.config import read_yaml
from sdft_ray.data import read_records
from sdft_ray.errors import ConfigError, DataError
from sdft_ray.evaluation.tasks import EvalTask, write_task_yaml

__all__ = ["convert_lm_eval_task", "load_lm_eval_yaml"]

_UNSUPPORTED_KEYS = ("process_docs", "process_results", "doc_to_decontamination_query", "use_prompt")
_LETTERS = string.ascii_uppercase


class _FunctionTag(str):
    """A ``!function module.name`` value: kept as a marker so the error can name it."""


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))


def load_lm_eval_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The task YAML with its ``include`` chain merged (the including file wins)."""
    path = Path(path)
    loaded = read_yaml(path, "lm-eval task file", _Loader)
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: expected a task mapping, got {type(loaded).__name__}")
    spec = dict(loaded)
    include = spec.pop("include", None)
    if include is not None:
        base = load_lm_eval_yaml(path.parent / str(include))
        spec = {**base, **spec}
    return spec


def _fail(path: Path, key: str, detail: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {detail}", field=key)


def _template(spec: Mapping[str, Any], key: str, path: Path) -> Any:
    value = spec.get(key)
    if isinstance(value, _FunctionTag):
        raise _fail(path, key, f"'!function {value}' is a Python hook of lm-eval and is not run here; "
                               "precompute it as a column of the data and use a Jinja template")
    return value


def _renderer(value: Any, key: str, path: Path, literal: bool = False):
    """A function row -> rendered value for a template, a column name or a constant; with
    ``literal``, a rendered template that reads as a Python literal (``"2"``, ``"['a', 'b']"``)
    becomes that value, as in lm-eval (a column's value is used as it is)."""
    import jinja2

    if value is None:
        raise _fail(path, key, "missing (required)")
    if isinstance(value, (int, list)) and not isinstance(value, bool):
        return lambda row: value
    if not isinstance(value, str):
        raise _fail(path, key, f"expected a template, a column name or a constant, got {type(value).__name__}")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        compiled = env.from_string(value)
    except jinja2.TemplateSyntaxError as e:
        raise _fail(path, key, f"invalid Jinja template: {e}") from None

    def render(row: Mapping[str, Any]) -> Any:
        if value in row:  # a bare column name, as lm-eval allows
            return row[value]
        rendered = compiled.render(**row)
        return _literal(rendered) if literal else rendered

    return render


def _literal(text: Any) -> Any:
    """lm-eval reads rendered ints and lists as Python literals."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text


def _strip(text: str, patterns: Sequence[str]) -> str:
    import re

    for pattern in patterns:
        text = re.sub(pattern, "", text)
    return text


def _regexes_to_ignore(spec: Mapping[str, Any], path: Path) -> list[str]:
    """The ``regexes_to_ignore`` of the first supported metric (an error if there is none)."""
    entries = spec.get("metric_list") or [{"metric": "exact_match"}]
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise _fail(path, "metric_list", "expected a list of mappings")
    names = [str(e.get("metric")) for e in entries]
    known = [n for n in names if n in ("exact_match", "acc")]
    if not known:
        raise _fail(path, "metric_list", f"no supported metric in {names}; supported: exact_match, acc")
    entry = entries[names.index(known[0])]
    ignore = entry.get("regexes_to_ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise _fail(path, "metric_list.regexes_to_ignore", "expected a list of regular expressions")
    return ignore


def _filters(spec: Mapping[str, Any], path: Path) -> list[tuple[str | None, dict[str, Any] | None]]:
    """``[(filter name, regex metric options or None)]``; one ``(None, None)`` without filters."""
    entries = spec.get("filter_list")
    if not entries:
        return [(None, None)]
    out = []
    for i, entry in enumerate(entries):
        where = f"filter_list[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("filter"), list):
            raise _fail(path, where, "expected a mapping with a 'filter' list")
        options = None
        for step in entry["filter"]:
            function = step.get("function") if isinstance(step, Mapping) else None
            if function == "regex":
                group = step.get("group_select", 0)
                if group not in (0, -1):
                    raise _fail(path, f"{where}.group_select", f"only 0 (first) and -1 (last) are supported, got {group!r}")
                options = {"pattern": str(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)")),
                           "which": "first" if group == 0 else "last"}
            elif function != "take_first":
                raise _fail(path, f"{where}.filter", f"filter function {function!r} is not supported; "
                                                      "supported: regex, take_first")
        out.append((str(entry.get("name", f"filter{i}")), options))
    return out


def convert_lm_eval_task(task_yaml: str | os.PathLike[str], data: str | os.PathLike[str],
                         out_dir: str | os.PathLike[str], *, split: str | None = None,
                         fewshot_data: str | os.PathLike[str] | None = None, num_fewshot: int | None = None,
                         limit: int | None = None, name: str | None = None) -> list[EvalTask]:
    """Render an lm-eval-harness task over ``data`` into ``out_dir/<name>.jsonl`` and return its
    :class:`EvalTask` s (one per filter). ``split`` picks a split of a saved ``DatasetDict``
    (default: the YAML's ``test_split``). Errors name the YAML key, or the data file and row."""
    path = Path(task_yaml)
    spec = load_lm_eval_yaml(path)
    for key in _UNSUPPORTED_KEYS:
        if key in spec:
            raise _fail(path, key, "not supported (a Python hook or lm-eval internals); precompute it in the data")
    output_type = spec.get("output_type", "generate_until")
    if output_type not in ("generate_until", "multiple_choice"):
        raise _fail(path, "output_type", f"{output_type!r} is not supported; supported: generate_until, "
                                         "multiple_choice (scored by generating the letter)")
    task_name = name or str(spec.get("task") or path.stem)
    text_of = _renderer(_template(spec, "doc_to_text", path), "doc_to_text", path)
    target_of = _renderer(_template(spec, "doc_to_target", path), "doc_to_target", path, literal=True)
    choices_of = (_renderer(_template(spec, "doc_to_choice", path), "doc_to_choice", path, literal=True)
                  if output_type == "multiple_choice" else None)
    ignore = _regexes_to_ignore(spec, path)  # exact_match and acc both mean "the extracted answer equals the target"
    description = str(spec.get("description") or "")
    target_delimiter = str(spec.get("target_delimiter", " "))
    fewshot_delimiter = str(spec.get("fewshot_delimiter", "\n\n"))
    gen = spec.get("generation_kwargs") or {}
    if not isinstance(gen, Mapping):
        raise _fail(path, "generation_kwargs", "expected a mapping")
    until = gen.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    shots = spec.get("num_fewshot", 0) if num_fewshot is None else num_fewshot
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise _fail(path, "num_fewshot", f"expected a non-negative integer, got {shots!r}")

    max_choices = 0

    def render(where: Mapping[str, Any], row: Mapping[str, Any], with_target: bool) -> tuple[str, Any]:
        nonlocal max_choices
        import jinja2

        try:
            text = str(text_of(row))
            target = target_of(row)
            choices = choices_of(row) if choices_of else None
        except jinja2.UndefinedError as e:
            raise DataError(detail=f"template needs a column the row lacks: {e.message}", **where) from None
        if choices is not None:
            if not isinstance(choices, list) or not 2 <= len(choices) <= len(_LETTERS):
                raise DataError(detail=f"doc_to_choice must give a list of 2-26 choices, got {choices!r}", **where)
            index = choices.index(target) if target in choices else target if isinstance(target, int) else None
            if index is None or not 0 <= index < len(choices):
                raise DataError(detail=f"target {target!r} is neither a choice nor a choice index", **where)
            max_choices = max(max_choices, len(choices))
            text += "\n" + "\n".join(f"{_LETTERS[i]}. {c}" for i, c in enumerate(choices))
            text += "\nAnswer with the letter of the correct choice."
            answer: Any = _LETTERS[index]
            shown = f"{_LETTERS[index]}"
        else:
            if isinstance(target, list):
                answer = [_strip(str(t), ignore).strip() for t in target]
                shown = str(target[0])
            else:
                answer = _strip(str(target), ignore).strip()
                shown = str(target)
        if with_target:
            return text + target_delimiter + shown, answer
        return text, answer

    prefix = description
    if shots:
        if fewshot_data is None:
            raise _fail(path, "num_fewshot", f"{shots} few-shot examples need fewshot_data (a local file of rows)")
        shot_split = spec.get("fewshot_split") if Path(fewshot_data).is_dir() else None
        shot_rows = read_records(fewshot_data, split=shot_split, limit=shots)
        if len(shot_rows) < shots:
            raise DataError(os.fspath(fewshot_data), f"num_fewshot={shots} but only {len(shot_rows)} rows")
        prefix += fewshot_delimiter.join(render(w, r, True)[0] for w, r in shot_rows) + fewshot_delimiter
    data_split = split if split is not None else (spec.get("test_split") if Path(data).is_dir() else None)
    rows = []
    for where, record in read_records(data, split=data_split, limit=limit):
        text, answer = render(where, record, False)
        rows.append({"prompt": prefix + text, "answer": answer})

    file = Path(out_dir) / f"{task_name.replace('/', '_')}.jsonl"
    atomic_write_text(file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    common = dict(path=str(file), max_new_tokens=int(gen.get("max_gen_toks", 256)),
                  stop=tuple(str(s) for s in until), reference_column="answer")
    if output_type == "multiple_choice":
        tasks = [EvalTask(name=task_name, metric="multiple_choice",
                          metric_options={"choices": _LETTERS[:max_choices]}, **common)]
    else:
        filters = _filters(spec, path)
        tasks = [EvalTask(name=task_name if len(filters) == 1 else f"{task_name}/{filter_name}",
                          metric="exact_match" if options is None else "regex", metric_options=options or {},
                          **common)
                 for filter_name, options in filters]
    write_task_yaml(tasks, file.with_suffix(".yaml"))
    return tasks
