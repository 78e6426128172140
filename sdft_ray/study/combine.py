"""One table, one verdict and one frontier over several study output folders.

A study invocation writes its raw rows to its ``--out`` folder (:mod:`sdft_ray.study.report`).
Runs of the same study made in different invocations - another seed later, on another machine,
from another ``--work`` - are combined here from those rows alone: the models are rebuilt from
``results``/``questions``/``prior_kl``/``runs`` and go through the same pooling, decision rule
and plot as a single study's. Folders combine only when their base models answered every
trained-fact question identically (same model, facts and greedy evaluation); a run named in two
folders is an error, and so are folders whose phase 1 used another teacher template or whose
prior KL was measured on other prompts.

    scripts/run_study.py --combine results/levers results/levers_seeds --out results/levers_all
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdft_ray.checkpoint import atomic_write_text
from sdft_ray.errors import ConfigError
from sdft_ray.study.report import (FACTS_TRAINED, TAG_COLUMNS, _setting_table, _verdict_lines, _write, headline,
                                   paired_tests, plot_frontier, setting_summary, settings_of)
from sdft_ray.study.run import ModelRecord, read_jsonl
from sdft_ray.study.verdict import INCONCLUSIVE, Verdict, decide

__all__ = ["combine_results", "load_records"]

def load_records(folder: str | Path) -> tuple[ModelRecord, list[ModelRecord]]:
    """The base model and the phase-1 runs of one study output folder, rebuilt from its rows."""
    folder = Path(folder)
    for name in ("results", "questions", "prior_kl", "runs"):
        if not (folder / f"{name}.jsonl").is_file():
            raise ConfigError(f"--combine: {folder} has no {name}.jsonl (not a study output folder)")
    records: dict[str, ModelRecord] = {}

    def record(row: dict[str, Any]) -> ModelRecord:
        if row["run"] not in records:
            records[row["run"]] = ModelRecord(**{k: row.get(k) for k in TAG_COLUMNS})
        return records[row["run"]]

    for row in read_jsonl(folder / "results.jsonl"):
        record(row).rows.append(row)
    for row in read_jsonl(folder / "questions.jsonl"):
        record(row).samples.append({k: v for k, v in row.items() if k not in TAG_COLUMNS})
    for row in read_jsonl(folder / "prior_kl.jsonl"):
        rec = record(row)
        rec.kl = (rec.kl or []) + [{k: v for k, v in row.items() if k not in TAG_COLUMNS}]
    for row in read_jsonl(folder / "runs.jsonl"):
        if row["run"] in records:
            records[row["run"]].info = {k: row[k] for k in ("steps", "train_s", "eval_s") if k in row}
    if "base" not in records:
        raise ConfigError(f"--combine: {folder} has no base-model rows")
    return records["base"], [r for r in records.values() if r.phase == "phase1"]


def _gate(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "gate.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _base_answers(base: ModelRecord) -> list[tuple[Any, ...]]:
    return sorted((s["kind"], s["index"], s["score"], s.get("response")) for s in base.samples
                  if s["task"] == FACTS_TRAINED)


def combine_results(folders: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Combine the phase-1 runs of ``folders`` (in that order) into ``out``: ``runs`` (one row per
    run, with its ``source`` folder), ``settings`` (arm x lr, seeds pooled), ``tests`` (paired
    tests), ``verdict.json``, ``summary.md`` and ``frontier.png``."""
    if len(folders) < 2:
        raise ConfigError("--combine needs at least two study output folders")
    out = Path(out)
    base, first = load_records(folders[0])
    runs, source = list(first), {r.run: str(folders[0]) for r in first}
    gates = [_gate(folder) for folder in folders]
    gate_passed = all(g.get("passed") for g in gates)
    for folder, gate in zip(folders[1:], gates[1:]):
        other_base, other = load_records(folder)
        if _base_answers(other_base) != _base_answers(base):
            raise ConfigError(f"--combine: the base model's trained-fact answers in {folder} differ from those in "
                              f"{folders[0]}: not the same model, facts or evaluation")
        if sorted(r["index"] for r in other_base.kl or []) != sorted(r["index"] for r in base.kl or []):
            raise ConfigError(f"--combine: {folder} measured the prior KL on other prompts than {folders[0]}")
        if gate.get("chosen") != gates[0].get("chosen"):
            raise ConfigError(f"--combine: {folder} trained with teacher template {gate.get('chosen')!r}, "
                              f"{folders[0]} with {gates[0].get('chosen')!r}")
        for r in other:
            if r.run in source:
                raise ConfigError(f"--combine: run {r.run} is in both {source[r.run]} and {folder}")
            source[r.run] = str(folder)
            runs.append(r)
    order: dict[tuple[Any, Any], int] = {}
    for r in runs:
        order.setdefault((r.arm, r.lr), len(order))
    runs.sort(key=lambda r: order[(r.arm, r.lr)])  # a setting's seeds together, settings in first-seen order
    settings = settings_of(runs, base)
    tests = paired_tests(runs, base)
    try:
        result = decide(gate_passed, settings)
    except ValueError as e:  # e.g. SDFT arms only: report, do not fail after the tables
        result = Verdict(INCONCLUSIVE, f"the decision rule does not apply: {e}")
    out.mkdir(parents=True, exist_ok=True)
    _write(out, "runs", [{**r.tags, "source": source[r.run], **r.info, **headline(r, base)} for r in runs],
           (*TAG_COLUMNS, "source", "steps", "train_s"))
    setting_rows = [{**setting_summary(s), "seeds": [r.seed for r in runs if (r.arm, r.lr) == (s.arm, s.lr)]}
                    for s in settings]
    _write(out, "settings", setting_rows, ("setting", "variant", "lr", "seeds", "strict", "strict_low", "strict_high",
                                           "prior_kl", "prior_kl_low", "prior_kl_high"))
    _write(out, "tests", tests, ("comparison", "a", "b", "measure", "test", "n", "a_only", "b_only", "p_value"))
    atomic_write_text(out / "verdict.json", json.dumps(result.as_dict(), indent=1, default=str))
    paths = {name: out / f"{name}.csv" for name in ("runs", "settings", "tests")}
    paths["verdict"] = out / "verdict.json"
    paths["frontier"] = plot_frontier(runs, base, out / "frontier.png",
                                      f"combined: {', '.join(str(f) for f in folders)}; one point per run; "
                                      "bars: 95 % intervals")
    lines = [f"# Combined study summary ({', '.join(str(f) for f in folders)})", "",
             f"**Verdict: {result.label}** - {result.reason}.", "",
             "Strict accuracy on the trained facts in % with 95 % Wilson intervals, seeds pooled; KL = mean over "
             "prior prompts of the per-token KL(base || model), averaged over seeds, with a 95 % t interval."]
    lines += _setting_table(settings, tests)
    lines += _verdict_lines(result)
    paths["summary"] = out / "summary.md"
    atomic_write_text(paths["summary"], "\n".join(lines) + "\n")
    return paths
