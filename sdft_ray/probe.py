"""``sdft-ray probe``: does the teacher teach what it should, before a single step is trained?

On ``probe.num_examples`` examples of the configured data (a seeded choice, ``schedule.seed``),
in this process and without Ray, with the weights that teach at step 0 (the base model for
``sdft``: the EMA starts at the student; ``teacher.model_path`` for ``opd``):

1. the student's answer (query only) and the teacher's (query + demonstration through
   ``prompts.teacher_template``), greedy and sampled (the rollout's temperature/top_p and
   ``rollout.max_new_tokens``); accuracies (``contains`` metric) when the data has a reference
   column (``probe.reference_column``); the share that finish and their lengths;
2. on the student's sampled answers: the configured loss's per-position divergence between teacher
   and student (:func:`sdft_ray.losses.full_vocab_divergence`, what the learner optimises), and the
   teacher's *shift* per position: ``KL(teacher with this example's demonstration || teacher with
   the next example's demonstration)`` (the next example in a cyclic order: a fixed derangement);
3. the teacher's most frequent openings.

:mod:`sdft_ray.probe_summary` turns that into the reported numbers and the verdict (ok / in-context
learning too weak / framing dominates / truncation dominates) with recommended config changes.
:func:`run_probe` is the entry point (also for other tools: pass ``model_folder`` = a trained
checkpoint to see the divergence profile after training); :func:`gate_run` is ``probe.gate``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdft_ray.checkpoint import atomic_write_text
from sdft_ray.config import RunConfig
from sdft_ray.data import load_examples
from sdft_ray.engines import Generation, SamplingSpec
from sdft_ray.errors import ConfigError, DataError
from sdft_ray.evaluation.metrics import contains
from sdft_ray.forward import micro_batches, response_logits
from sdft_ray.losses import divergence_from_logprobs, full_vocab_divergence
from sdft_ray.probe_summary import (
    OPENING_TOKENS,
    Answer,
    ProbeRow,
    ProbeSummary,
    Verdict,
    decide,
    summarise,
)

log = logging.getLogger("sdft_ray")

__all__ = ["ProbeReport", "choose_rows", "gate_run", "print_report", "run_probe"]


@dataclass
class ProbeReport:
    settings: dict[str, Any]  # what was probed: model, teacher, template, limits, loss
    summary: ProbeSummary
    verdict: Verdict
    rows: list[ProbeRow]
    seconds: float
    path: str | None = None  # where the JSON was written

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choose_rows(n_rows: int, n: int, seed: int) -> list[int]:
    """``min(n, n_rows)`` distinct row numbers, sorted, drawn with ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_rows, size=min(n, n_rows), replace=False))


class _Models:
    """The student engine and the teacher engine (the same object when the weights are the same)."""

    def __init__(self, cfg: RunConfig, student_folder: Path, teacher_folder: Path):
        from sdft_ray.engines.hf import HFEngine

        kw = dict(dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                  batch_size=cfg.rollout.batch_size)
        self.student = HFEngine(str(student_folder), **kw)
        same = Path(teacher_folder).resolve() == Path(student_folder).resolve()
        self.teacher = self.student if same else HFEngine(str(teacher_folder), **kw)
        self.tokenizer = self.student.tokenizer
        self.pad_id = self.student.pad_id


def _generate(engine, prompts: Sequence[Sequence[int]], spec: SamplingSpec, label: str,
              echo: Callable[[str], None]) -> list[Generation]:
    """Generate in chunks of the engine's batch size, echoing progress after each."""
    out: list[Generation] = []
    start = time.perf_counter()
    for chunk, rows in enumerate(micro_batches(len(prompts), engine.batch_size)):
        out.extend(engine.generate([prompts[i] for i in rows], dataclasses.replace(spec, seed=spec.seed * 1000 + chunk)))
        echo(f"probe: {label} {len(out)}/{len(prompts)} ({time.perf_counter() - start:.0f} s)")
    return out


def _answer(gen: Generation, tokenizer, reference: Any) -> Answer:
    ids = [int(t) for t in gen.token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return Answer(token_ids=ids, text=text, finished=bool(gen.finished),
                  opening=tokenizer.decode(ids[:OPENING_TOKENS], skip_special_tokens=False),
                  correct=None if reference is None else contains(text, reference))


@torch.no_grad()
def _per_position(models: _Models, student_prompts, teacher_prompts, other_prompts, responses, alpha: float,
                  micro_batch_size: int, echo) -> tuple[list[list[float]], list[list[float]] | None]:
    """Per response position: the loss's divergence (teacher vs student) and the demonstration shift
    (teacher with the true vs another demonstration); ``other_prompts`` None = no shift."""
    n = len(responses)
    divergence: list[list[float]] = [[] for _ in range(n)]
    shift: list[list[float]] | None = None if other_prompts is None else [[] for _ in range(n)]
    done = 0
    for rows in micro_batches(n, micro_batch_size, [len(r) for r in responses]):
        resp = [np.asarray(responses[r], dtype=np.int64) for r in rows]
        pick = lambda prompts: [np.asarray(prompts[r], dtype=np.int64) for r in rows]  # noqa: E731
        student_logits, _, mask = response_logits(models.student.model, pick(student_prompts), resp, models.pad_id)
        teacher_logits, _, _ = response_logits(models.teacher.model, pick(teacher_prompts), resp, models.pad_id)
        teacher_logp = teacher_logits.float().log_softmax(-1)  # as the teacher actor sends it
        del teacher_logits
        values = full_vocab_divergence(student_logits, teacher_logp, alpha)
        del student_logits
        other_values = None
        if shift is not None:
            other_logits, _, _ = response_logits(models.teacher.model, pick(other_prompts), resp, models.pad_id)
            other_logp = other_logits.float().log_softmax(-1)
            del other_logits
            other_values = divergence_from_logprobs(other_logp, teacher_logp, 0.0)  # KL(true || other)
            del other_logp
        for j, r in enumerate(rows):
            t = len(responses[r])
            divergence[r] = values[j, :t].double().cpu().tolist()
            if shift is not None:
                shift[r] = other_values[j, :t].double().cpu().tolist()
        done += len(rows)
        echo(f"probe: divergence and shift {done}/{n}")
    return divergence, shift


def _check_variant(cfg: RunConfig):
    from sdft_ray.variants import Variant, get_variant

    variant = get_variant(cfg)
    if not variant.uses_rollout:
        raise ConfigError(f"algorithm.variant {cfg.algorithm.variant!r} has no teacher and no rollout: "
                          "the probe checks a distillation teacher", field="algorithm.variant")
    if type(variant).teacher_prompts is not Variant.teacher_prompts:
        raise ConfigError(f"algorithm.variant {cfg.algorithm.variant!r} builds the teacher's context from the "
                          "student's own attempt: the probe supports variants whose teacher prompt is known "
                          "before the rollout (sdft, opd)", field="algorithm.variant")
    return variant


def run_probe(cfg: RunConfig, *, num_examples: int | None = None, model_folder: str | Path | None = None,
              teacher_folder: str | Path | None = None, out: str | Path | None = None,
              echo: Callable[[str], None] = print) -> ProbeReport:
    """Measure, summarise, decide and write the JSON report (``out``, else ``probe.out``, else
    ``<output.dir>/probe.json``). ``model_folder`` (an HF folder or a checkpoint) replaces the
    student's weights, ``teacher_folder`` the teacher's (default: what teaches at step 0 given the
    student: the student itself for sdft, ``teacher.model_path`` for opd)."""
    from sdft_ray.evaluation.runner import resolve_checkpoint
    from sdft_ray.models import load_tokenizer, resolve_model_path
    from sdft_ray.prompts import fill_template, resolve_template
    from sdft_ray.runner import prompt_builder

    start = time.perf_counter()
    variant = _check_variant(cfg)
    n_wanted = num_examples or cfg.probe.num_examples
    if n_wanted < 2:
        raise ConfigError(f"probe.num_examples must be >= 2 (the shift needs another example), got {n_wanted}",
                          field="probe.num_examples")
    student_folder = (resolve_checkpoint(model_folder) if model_folder is not None
                      else resolve_model_path(cfg.model.path, cfg.model.cache_dir))
    teacher_path = Path(teacher_folder) if teacher_folder is not None else variant.teacher_model(student_folder)
    tokenizer = load_tokenizer(student_folder, cfg.model.trust_remote_code)
    examples = load_examples(cfg.data.path, columns=cfg.data.columns, split=cfg.data.split, limit=cfg.data.limit,
                             require_demonstration=variant.requires_demonstration)
    chosen = [examples[i] for i in choose_rows(len(examples), n_wanted, cfg.schedule.seed)]
    builder = prompt_builder(cfg, tokenizer)
    tokenized, _ = variant.tokenize(builder, chosen)
    if len(tokenized) < 2:
        raise ConfigError(f"data.path {cfg.data.path}: fewer than 2 examples left to probe after the length policy",
                          field="data.path")
    by_index = {ex.index: ex for ex in chosen}
    kept = [by_index[t.index] for t in tokenized]
    n = len(kept)
    column = cfg.probe.reference_column
    references = [ex.extra.get(column) if column else None for ex in kept]
    for ex, ref in zip(kept, references):  # a bad reference fails before any model loads
        try:
            if ref is not None:
                contains("", ref)
        except TypeError as exc:
            file, _, row = ex.source.rpartition(":")
            raise DataError(file, f"probe.reference_column: not a reference answer for the contains metric ({exc})",
                            row=int(row) if row.isdigit() else None, field=column) from None
    others = [kept[(j + 1) % n] for j in range(n)]  # a cyclic shift: nobody keeps its own demonstration
    with_shift = variant.requires_demonstration and all(ex.demonstration for ex in kept)
    other_prompts = [builder.teacher_ids(ex, other.demonstration) for ex, other in zip(kept, others)] \
        if with_shift else None
    echo(f"probe: {n} examples of {cfg.data.path}; student {student_folder}; teacher {teacher_path}")

    models = _Models(cfg, student_folder, teacher_path)
    r = cfg.rollout
    greedy = SamplingSpec(max_new_tokens=r.max_new_tokens, greedy=True, seed=cfg.schedule.seed)
    sampled = SamplingSpec(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                           seed=cfg.schedule.seed)
    student_prompts = [t.prompt_ids for t in tokenized]
    teacher_prompts = [t.teacher_prompt_ids for t in tokenized]

    def answers(engine, prompts, spec, label) -> list[Answer]:
        gens = _generate(engine, prompts, spec, label, echo)
        return [_answer(g, models.tokenizer, ref) for g, ref in zip(gens, references)]

    student_greedy = answers(models.student, student_prompts, greedy, "student greedy")
    student_sampled = answers(models.student, student_prompts, sampled, "student sampled")
    teacher_greedy = answers(models.teacher, teacher_prompts, greedy, "teacher greedy")
    teacher_sampled = answers(models.teacher, teacher_prompts, sampled, "teacher sampled")
    divergence, shift = _per_position(models, student_prompts, teacher_prompts, other_prompts,
                                      [a.token_ids for a in student_sampled], cfg.loss.alpha,
                                      cfg.teacher.micro_batch_size, echo)
    rows = [ProbeRow(index=ex.index, source=ex.source, prompt=ex.query, demonstration=ex.demonstration,
                     reference=references[j], other_index=others[j].index if with_shift else None,
                     student_greedy=student_greedy[j], student_sampled=student_sampled[j],
                     teacher_greedy=teacher_greedy[j], teacher_sampled=teacher_sampled[j],
                     divergence=divergence[j], shift=None if shift is None else shift[j])
            for j, ex in enumerate(kept)]
    del models  # free the weights (and GPU memory) before training starts in this process
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    skip, window = cfg.loss.skip_first_tokens, cfg.probe.framing_window
    summary = summarise(rows, skip=skip, window=window, aggregation=cfg.loss.aggregation)
    verdict = decide(summary, template=cfg.prompts.teacher_template, max_new_tokens=r.max_new_tokens, skip=skip,
                     window=window)
    settings = {
        "variant": cfg.algorithm.variant, "student": str(student_folder), "teacher": str(teacher_path),
        "data": cfg.data.path, "num_examples": n, "rows": [ex.index for ex in kept], "seed": cfg.schedule.seed,
        "teacher_template": cfg.prompts.teacher_template,
        "teacher_template_text": resolve_template(cfg.prompts.teacher_template),
        "example_teacher_turn": fill_template(resolve_template(cfg.prompts.teacher_template), kept[0].query,
                                              kept[0].demonstration or "") if with_shift else None,
        "max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p,
        "loss_alpha": cfg.loss.alpha, "skip_first_tokens": skip, "framing_window": window,
        "aggregation": cfg.loss.aggregation, "reference_column": column,
        "references": sum(ref is not None for ref in references),
    }
    report = ProbeReport(settings=settings, summary=summary, verdict=verdict, rows=rows,
                         seconds=time.perf_counter() - start)
    path = Path(out or cfg.probe.out or Path(cfg.output.dir) / "probe.json")
    report.path = str(path)
    atomic_write_text(path, json.dumps(report.to_dict(), indent=1, default=str) + "\n")
    echo(f"probe: done in {report.seconds:.0f} s; report {path}")
    return report


# ---- output ----------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def print_report(report: ProbeReport, console=None) -> None:
    """Rich tables: answers, divergence by position, the teacher's openings, then the verdict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s, st = report.summary, report.settings
    table = Table(title=f"probe: {st['num_examples']} examples, template {st['teacher_template']!r}, "
                        f"max_new_tokens {st['max_new_tokens']}")
    for column in ("answers", "accuracy", "finished", "mean len", "p50", "p90", "max"):
        table.add_column(column, justify="left" if column == "answers" else "right")
    for name in ("student_greedy", "student_sampled", "teacher_greedy", "teacher_sampled"):
        a = getattr(s, name)
        table.add_row(name.replace("_", " "), _pct(a.accuracy), _pct(a.lengths.finished_share),
                      f"{a.lengths.mean:.1f}", str(a.lengths.p50), str(a.lengths.p90), str(a.lengths.max))
    console.print(table)
    if st["references"] == 0:
        console.print(f"no reference answers (column {st['reference_column']!r}); answers that use their "
                      f"demonstration: teacher {_pct(s.teacher_copy_share)}, student {_pct(s.student_copy_share)}")
    d = s.divergence
    div = Table(title=f"teacher-student divergence on the student's samples (loss.alpha {st['loss_alpha']})")
    div.add_column("measure")
    div.add_column("value", justify="right")
    div.add_row("mean per token (nats)", f"{d.mean_per_token:.4f}")
    div.add_row(f"loss at step 0 ({st['aggregation']}, first {st['skip_first_tokens']} masked)", f"{d.loss:.4f}")
    for k, share in d.share_first.items():
        label = f"share in the first {k} tokens" + (" (masked by loss.skip_first_tokens)"
                                                     if k == st["skip_first_tokens"] else "")
        div.add_row(label, _pct(share))
    div.add_row("share where the demonstration shift is small (framing)", _pct(d.demonstration_independent_share))
    div.add_row("first position the demonstration matters (median)",
                "-" if d.first_shift_position is None else f"{d.first_shift_position:g}")
    console.print(div)
    profile = " ".join(f"{x:.2f}" for x in d.by_position[:16])
    console.print(f"mean divergence by position (first 16): {profile}")
    if d.shift_by_position is not None:
        console.print(f"mean demonstration shift by position:   {' '.join(f'{x:.2f}' for x in d.shift_by_position[:16])}")
    openings = Table(title="the teacher's most frequent openings (first 3 tokens)")
    for column in ("answers", "opening", "count", "share"):
        openings.add_column(column, justify="right" if column in ("count", "share") else "left")
    for label, top in (("greedy", s.teacher_openings_greedy), ("sampled", s.teacher_openings_sampled)):
        for o in top:
            openings.add_row(label, repr(o.text), str(o.count), _pct(o.share))
    console.print(openings)
    v = report.verdict
    console.print(f"[bold]verdict: {v.name}[/bold]")
    for finding in v.findings:
        console.print(f"  - {finding}")
    if v.recommendations:
        console.print("recommended config changes:")
        for rec in v.recommendations:
            console.print(f"  {rec.line()}", markup=False)
    console.print(f"report: {report.path} ({report.seconds:.0f} s)")


def gate_run(cfg: RunConfig) -> ProbeReport | None:
    """``probe.gate``: off -> nothing; warn -> run the probe and log its verdict; error -> also raise a
    ConfigError naming probe.gate unless the verdict is ok."""
    gate = cfg.probe.gate
    if gate == "off":
        return None
    report = run_probe(cfg, echo=log.info)
    v = report.verdict
    recommended = "; ".join(rec.line() for rec in v.recommendations) or "none"
    if v.ok:
        log.info("probe verdict: ok (report %s)", report.path)
        return report
    detail = f"{' / '.join(v.findings)}; recommended: {recommended}; report {report.path}"
    if gate == "warn":
        log.warning("probe verdict: %s: %s", v.name, detail)
        return report
    raise ConfigError(f"probe.gate is 'error' and the probe's verdict is {v.name!r}: {detail} "
                      "(set probe.gate: warn to train anyway)", field="probe.gate")
