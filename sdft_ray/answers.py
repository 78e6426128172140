"""Answers before and after training, side by side (``output.show_answers``).

After a run, the base model and the trained student answer the same few questions greedily: the
first training prompts (what the run taught) and the first rows of another question file (what the
model knew before, where forgetting shows). A user sees at once whether the facts went in and
whether the old answers survived, in the terminal and in a job's log; ``<output.dir>/answers.json``
keeps them. Every answer is scored with the ``contains`` metric against its reference column when
the row has one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from sdft_ray.config import RunConfig
from sdft_ray.data import Example, load_examples
from sdft_ray.engines import SamplingSpec
from sdft_ray.evaluation.metrics import contains

ANSWERS_FILE = "answers.json"


@dataclass(frozen=True)
class AnswerPair:
    group: str  # "trained" (a training prompt) or "prior" (a question from show_answers.prior_path)
    question: str
    reference: str | None
    before: str  # the base model's greedy answer
    after: str  # the trained student's greedy answer
    before_correct: bool | None  # contains(answer, reference); None without a reference
    after_correct: bool | None


def _reference(example: Example, column: str) -> str | None:
    value = example.extra.get(column)
    return None if value is None else str(value)


def _greedy_answers(model_folder: str | os.PathLike[str], cfg: RunConfig, prompts: Sequence[Sequence[int]]) -> list[str]:
    from sdft_ray.engines.hf import HFEngine

    engine = HFEngine(str(model_folder), dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                      batch_size=max(1, len(prompts)))
    spec = SamplingSpec(max_new_tokens=cfg.output.show_answers.max_new_tokens, greedy=True)
    gens = engine.generate(list(prompts), spec)
    return [engine.tokenizer.decode([int(t) for t in g.token_ids], skip_special_tokens=True).strip() for g in gens]


def answer_pairs(cfg: RunConfig, base_folder: str | os.PathLike[str],
                 trained_folder: str | os.PathLike[str]) -> list[AnswerPair]:
    """The base model's and the trained model's greedy answers to ``show_answers.trained`` training
    prompts and ``show_answers.prior`` rows of ``show_answers.prior_path``, with the run's prompt
    rendering (system prompt, chat template)."""
    from sdft_ray.models import load_tokenizer
    from sdft_ray.runner import prompt_builder

    show = cfg.output.show_answers
    groups: list[tuple[str, list[Example]]] = []
    if show.trained:
        groups.append(("trained", load_examples(cfg.data.path, columns=cfg.data.columns, split=cfg.data.split,
                                                require_demonstration=False, limit=show.trained)))
    if show.prior:
        groups.append(("prior", load_examples(show.prior_path, columns={"prompt": show.prompt_column},
                                              require_demonstration=False, limit=show.prior)))
    examples = [(group, ex) for group, rows in groups for ex in rows]
    if not examples:
        return []
    builder = prompt_builder(cfg, load_tokenizer(Path(base_folder), cfg.model.trust_remote_code))
    prompts = [builder.student_ids(ex) for _, ex in examples]
    before = _greedy_answers(base_folder, cfg, prompts)
    after = _greedy_answers(trained_folder, cfg, prompts)
    pairs = []
    for (group, ex), b, a in zip(examples, before, after):
        ref = _reference(ex, show.reference_column)
        pairs.append(AnswerPair(group=group, question=ex.query, reference=ref, before=b, after=a,
                                before_correct=None if ref is None else bool(contains(b, ref)),
                                after_correct=None if ref is None else bool(contains(a, ref))))
    return pairs


def write_answers(pairs: Sequence[AnswerPair], run_dir: str | os.PathLike[str]) -> Path:
    path = Path(run_dir) / ANSWERS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([asdict(p) for p in pairs], indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _mark(correct: bool | None) -> str:
    return "" if correct is None else ("  [correct]" if correct else "  [wrong]")


def format_answers(pairs: Sequence[AnswerPair], max_new_tokens: int, width: int = 200) -> str:
    """Plain text (a terminal and a job's log read it alike): per question, the reference and the
    answers before and after training, each cut to ``width`` characters."""

    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 3] + "..."

    lines = [f"Answers before -> after training (greedy, up to {max_new_tokens} new tokens):"]
    for p in pairs:
        ref = "" if p.reference is None else f"  (reference: {p.reference})"
        lines += [f"[{p.group}] {cut(p.question)}{ref}",
                  f"  before: {cut(p.before)}{_mark(p.before_correct)}",
                  f"  after:  {cut(p.after)}{_mark(p.after_correct)}"]
    return "\n".join(lines)


def show_answers(cfg: RunConfig, summary: dict[str, Any]) -> str | None:
    """After ``runner.train``: the before/after text for the run's final checkpoint (written to
    ``answers.json`` too), or None when ``output.show_answers`` asks for nothing or there is no
    checkpoint to read the trained weights from."""
    from sdft_ray.models import resolve_model_path

    show = cfg.output.show_answers
    checkpoint = summary.get("latest_checkpoint")
    if not (show.trained or show.prior) or not checkpoint:
        return None
    base = resolve_model_path(cfg.model.path, cfg.model.cache_dir)
    pairs = answer_pairs(cfg, base, Path(checkpoint) / "student")
    write_answers(pairs, cfg.output.dir)
    return format_answers(pairs, show.max_new_tokens)
