"""The study's fact log-likelihoods: how much probability the base model and every kept phase-1
checkpoint give each trained and control fact (:mod:`sdft_ray.evaluation.knowledge`).

Greedy accuracy says whether a fact became the model's answer; this says whether training moved
the fact's probability at all. Per fact question (the evaluation's strict / paraphrase / ood
questions of trained and control facts, as the student's prompt), the demonstration of the fact
is the teacher-forced answer and the log-probability of the answer's tokens inside it is the
measure. Per model: its change from the base model on trained facts (paired by question) and the
same change on control facts; trained minus control is what the training put into the facts it
saw, beyond learning the demonstrations' phrasing (which lowers both).

Added after the lever study's results (issue 15) as a diagnostic: not part of the
pre-registered decision rule.

Outputs: ``fact_logprob.csv`` (model x question), ``fact_logprob_summary.csv`` (model x kind:
means, intervals, tests) and ``fact_logprob.png``; each model's scores cached under
``<work>/fact_logprob/``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdft_ray.study.profiles import KeptModel, kept_models, weights_stamp
from sdft_ray.study.spec import StudySpec

FACT_CSV = "fact_logprob.csv"
FACT_SUMMARY_CSV = "fact_logprob_summary.csv"
FACT_PNG = "fact_logprob.png"
GROUPS = ("trained", "control")


def fact_questions(tasks: Sequence[Any], train_rows: Sequence[dict[str, Any]], tokenizer: Any
                   ) -> tuple[list[dict[str, Any]], list[Any]]:
    """One row per question of the fact tasks (``tasks``: trained, then control), with its group,
    and its :class:`~sdft_ray.evaluation.knowledge.FactProbe`: the student prompt exactly as the
    evaluation renders it, the fact's training demonstration as the response, the answer's tokens
    as the span."""
    from sdft_ray.evaluation.knowledge import FactProbe, answer_token_span
    from sdft_ray.evaluation.runner import task_prompts
    from sdft_ray.study.design import fact_training_rows

    rows: list[dict[str, Any]] = []
    probes: list[FactProbe] = []
    for group, task in zip(GROUPS, tasks):
        examples, prompts = task_prompts(task, tokenizer)
        facts = fact_training_rows([{**ex.extra} for ex in examples], train_rows)
        for ex, prompt_ids, fact in zip(examples, prompts, facts):
            # the fact as trained (an ood question's reference may be derived from it: "186" years)
            demo, answer = str(fact["demonstration"]), str(fact["answer"])
            try:
                ids, span = answer_token_span(tokenizer, demo, answer)
            except ValueError as e:
                raise ValueError(f"{ex.source}: {e}") from None
            probes.append(FactProbe(tuple(prompt_ids), tuple(ids), span))
            rows.append({"group": group, "kind": str(ex.extra.get(task.kind_column)) if task.kind_column else None,
                         "index": ex.index, "entity": ex.extra.get("entity"), "fact": ex.extra.get("fact"),
                         "answer": answer, "answer_tokens": span[1] - span[0]})
    return rows, probes


def _scores(folder: str, probes: Sequence[Any], cache: Path, dtype: str, batch_size: int) -> list[list[float]]:
    """``answer_token_logprobs`` of the model in ``folder``, cached in ``cache`` by folder and probes."""
    import torch

    from sdft_ray.evaluation.knowledge import answer_token_logprobs
    from sdft_ray.evaluation.runner import resolve_checkpoint
    from sdft_ray.models import load_causal_lm, load_tokenizer

    key = {"model": str(folder), "weights": weights_stamp(folder), "dtype": dtype,
           "probes": hashlib.sha256(json.dumps([list(map(list, (p.prompt_ids, p.response_ids, p.span)))
                                                for p in probes]).encode()).hexdigest()[:16]}
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            return saved["token_logprobs"]
    from sdft_ray.checkpoint import atomic_write_text

    path = resolve_checkpoint(folder)
    model = load_causal_lm(path, dtype).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    try:
        values = answer_token_logprobs(model, probes, int(load_tokenizer(path).pad_token_id), batch_size=batch_size)
    finally:
        del model
    atomic_write_text(cache, json.dumps({"key": key, "token_logprobs": values}))
    return values


MEASURES = ("logprob", "first", "rest")  # the whole answer, its first token, the tokens after it


def _split(token_logprobs: Sequence[float]) -> dict[str, float]:
    return {"logprob": float(sum(token_logprobs)), "first": float(token_logprobs[0]),
            "rest": float(sum(token_logprobs[1:]))}


def summarize(rows: Sequence[dict[str, Any]], base_label: str = "base") -> list[dict[str, Any]]:
    """Per model x kind, for the whole answer (``logprob``), its first token (``first``) and the
    tokens after it (``rest``): per group the mean value and its mean change from the base model
    (95 % t interval; Wilcoxon signed-rank p, paired by question); and the trained change minus
    the control change (Welch interval and p). Kind ``all`` takes each fact's mean over its
    questions first, so that the questions of one fact do not count as independent."""
    from sdft_ray.evaluation.stats import difference_interval, mean_interval, wilcoxon_paired

    base = {(r["group"], r["index"]): r for r in rows if r["model"] == base_label}

    def units(picked: Sequence[dict[str, Any]], kind: str, measure: str) -> tuple[list[float], list[float]]:
        """(model values, base values) per question, or per fact for kind 'all'."""
        if kind != "all":
            return [r[measure] for r in picked], [base[(r["group"], r["index"])][measure] for r in picked]
        facts: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
        for r in picked:
            facts.setdefault((r["entity"], r["fact"]), []).append(r)
        mine = [sum(r[measure] for r in rs) / len(rs) for rs in facts.values()]
        theirs = [sum(base[(r["group"], r["index"])][measure] for r in rs) / len(rs) for rs in facts.values()]
        return mine, theirs

    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for kind in [*dict.fromkeys(r["kind"] for r in mine), "all"]:
            row: dict[str, Any] = {"model": model, "kind": kind}
            for measure in MEASURES:
                deltas = {}
                for group in GROUPS:
                    values, base_values = units([r for r in mine if r["group"] == group and kind in ("all", r["kind"])],
                                                kind, measure)
                    deltas[group] = [a - b for a, b in zip(values, base_values)]
                    name = f"{group}_{measure}"
                    row[f"{group}_n"] = len(values)
                    row[name] = sum(values) / len(values) if values else float("nan")
                    row.update(mean_interval(deltas[group]).as_dict(f"{name}_delta"))
                    row.pop(f"{name}_delta_n")
                    row[f"{name}_delta_p"] = wilcoxon_paired(values, base_values).p_value if values else float("nan")
                diff, p = difference_interval(deltas["trained"], deltas["control"])
                row.update(diff.as_dict(f"{measure}_trained_minus_control"))
                row.pop(f"{measure}_trained_minus_control_n")
                row[f"{measure}_trained_minus_control_p"] = p
            out.append(row)
    return out


def fact_likelihoods(spec: StudySpec, work: str | os.PathLike[str], out: str | os.PathLike[str], tasks: Sequence[Any],
                     base_folder: str, prior_kl: dict[str, float] | None = None, *,
                     echo: Callable[[str], None] = print) -> dict[str, Path]:
    """Score the base model and every kept phase-1 checkpoint; write the CSVs and the plot.
    ``tasks``: the trained and the control fact tasks; ``prior_kl``: run -> mean prior KL (the
    plot's x axis)."""
    from sdft_ray.models import load_tokenizer
    from sdft_ray.study.report import _write
    from sdft_ray.study.run import _safe, read_jsonl

    work, out = Path(work), Path(out)
    dtype = (spec.train.get("model") or {}).get("dtype", "float32")
    question_rows, probes = fact_questions(tasks, read_jsonl(spec.facts.train), load_tokenizer(base_folder))
    rows: list[dict[str, Any]] = []
    models: list[KeptModel] = kept_models(spec, work)
    for kept in models:
        cache = work / "fact_logprob" / f"{_safe(kept.label)}.json"
        if not cache.is_file():
            echo(f"[study] fact log-likelihoods: {kept.label}")
        values = _scores(kept.folder or base_folder, probes, cache, dtype, spec.forgetting.batch_size)
        rows += [{"model": kept.label, "run": kept.run, **q, **_split(v)} for q, v in zip(question_rows, values)]
    base = {(r["group"], r["index"]): r["logprob"] for r in rows if r["model"] == "base"}
    for r in rows:
        r["delta"] = r["logprob"] - base[(r["group"], r["index"])]
    summary = summarize(rows)
    for s in summary:
        run = next(k.run for k in models if k.label == s["model"])
        s["prior_kl"] = (prior_kl or {}).get(run, 0.0 if run == "base" else float("nan"))
    _write(out, FACT_CSV.removesuffix(".csv"), rows,
           ("model", "run", "group", "kind", "index", "entity", "fact", "answer", "answer_tokens", "logprob", "first", "rest",
            "delta"))
    _write(out, FACT_SUMMARY_CSV.removesuffix(".csv"), summary, tuple(summary[0]) if summary else ())
    return {"fact_logprob_csv": out / FACT_CSV, "fact_logprob_summary_csv": out / FACT_SUMMARY_CSV,
            "fact_logprob_png": plot_fact_likelihoods(summary, out / FACT_PNG)}


def plot_fact_likelihoods(summary: Sequence[dict[str, Any]], path: Path, kind: str = "strict") -> Path:
    """Trained-minus-control change of the facts' log-probability (``kind`` questions, 95 %
    Welch interval) against the mean prior KL, one point per model: a continuous frontier."""
    from sdft_ray.study.report import _plt, save_figure

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for s in summary:
        if s["kind"] != kind:
            continue
        y, low, high = (s[f"logprob_trained_minus_control{x}"] for x in ("", "_low", "_high"))
        sft = s["model"].startswith("sft")
        color = "black" if s["model"] == "base" else ("tab:blue" if sft else "tab:red")
        err = None if low != low else [[y - low], [high - y]]  # NaN intervals: no bar
        ax.errorbar([s["prior_kl"]], [y], yerr=err, fmt="s" if sft else "o", color=color, capsize=3)
        ax.annotate(s["model"], (s["prior_kl"], y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("forgetting: mean prior KL(base || model), nats per token")
    ax.set_ylabel(f"log p(answer) change, trained minus control ({kind}), nats")
    ax.set_title("what training put into the trained facts (blue squares SFT, red circles SDFT)", fontsize=9)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
