"""The probe's pure core: records of what was measured, the numbers it reports, and the verdict.

Nothing here calls a model. :mod:`sdft_ray.probe` measures (generates answers, runs the forward
passes) and fills :class:`ProbeRow` s; :func:`summarise` turns rows into every number the probe
prints and :func:`decide` applies the verdict rules (the constants below) to that summary.

Definitions used throughout:

* an answer's *length* is its number of generated tokens, the stop token included; it *finished*
  when it ended on a stop token within ``rollout.max_new_tokens``;
* percentiles are nearest-rank: ``p`` = the ``ceil(p * n)``-th smallest value (so p50 of
  ``[1, 2, 3, 4]`` is 2 and p90 is 4), which is always an observed length;
* *divergence* at response position ``t`` is the configured loss's per-token divergence (GKD
  ``loss.alpha``, full vocabulary) between the teacher and the student on the student's sampled
  response; *shift* at ``t`` is ``KL(teacher with the example's demonstration || teacher with
  another example's demonstration)`` on the same response;
* a position's shift is *small* when it is below :data:`SMALL_SHIFT_FRACTION` of that sequence's
  largest shift (every position is small when the largest shift is 0); divergence at small-shift
  positions is *demonstration-independent*: the teacher differs from the student there because of
  the template (framing), not because of what the demonstration says.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sdft_ray.evaluation.metrics import normalize_text
from sdft_ray.forward import pad_right, response_mask
from sdft_ray.losses import aggregate, response_loss_mask

# ---- the rules -------------------------------------------------------------------------------

#: In-context learning is too weak (with reference answers) when the teacher's greedy accuracy is
#: below this ...
ICL_MIN_TEACHER_ACCURACY = 0.5
#: ... or is not at least this much (absolute) above the student's greedy accuracy.
ICL_MIN_GAIN = 0.20
#: Without reference answers: too weak when fewer than this share of the teacher's greedy answers
#: copy anything of their demonstration (see :func:`copies_demonstration`).
ICL_MIN_COPY_SHARE = 0.5
#: Truncation dominates when fewer than this share of the student's sampled answers finish.
MIN_FINISHED_SHARE = 0.9
#: Framing dominates when more than this share of the teacher-student divergence is
#: demonstration-independent (or, when no shift can be measured because the teacher sees no
#: demonstration, sits in the first ``probe.framing_window`` tokens).
FRAMING_MAX_SHARE = 0.5
#: A shift below this fraction of its sequence's largest shift counts as small.
SMALL_SHIFT_FRACTION = 0.1
#: Demonstration words shorter than this are ignored by :func:`copies_demonstration`.
MIN_COPY_WORD_LEN = 4
#: An answer's opening = its first this many tokens (decoded, special tokens kept).
OPENING_TOKENS = 3
#: How many of the most frequent openings are reported.
TOP_OPENINGS = 5
#: Suggested lengths are rounded up to a multiple of this.
LENGTH_ROUND = 16
#: Terser templates to recommend, in order of preference (the first one not in use).
TERSER_TEMPLATES = ("answer_directly", "context_first", "paper_no_thinking")

OK = "ok"
ICL_TOO_WEAK = "in-context learning too weak"
FRAMING_DOMINATES = "framing dominates"
TRUNCATION_DOMINATES = "truncation dominates"
#: Verdicts in priority order (the first failing rule names the verdict; all findings are listed).
VERDICTS = (ICL_TOO_WEAK, TRUNCATION_DOMINATES, FRAMING_DOMINATES, OK)


# ---- what was measured -------------------------------------------------------------------------


@dataclass
class Answer:
    """One generated answer."""

    token_ids: list[int]
    text: str  # decoded without special tokens, stripped
    finished: bool  # ended on a stop token
    opening: str = ""  # the first OPENING_TOKENS tokens, decoded with special tokens
    correct: float | None = None  # contains(text, reference); None without a reference


@dataclass
class ProbeRow:
    """Everything measured on one example."""

    index: int  # row of the dataset
    source: str
    prompt: str  # the query (the last user turn of a chat)
    demonstration: str | None
    reference: Any  # the reference answer, or None
    other_index: int | None  # the row whose demonstration the shift compares against
    student_greedy: Answer
    student_sampled: Answer
    teacher_greedy: Answer
    teacher_sampled: Answer
    divergence: list[float]  # per position of student_sampled: the configured loss's divergence
    shift: list[float] | None  # per position: KL(teacher true demo || teacher other demo); None without demos


# ---- the numbers reported ------------------------------------------------------------------------


@dataclass
class LengthStats:
    n: int
    finished_share: float
    mean: float
    p50: int
    p90: int
    max: int


@dataclass
class AnswerStats:
    """One role x decoding: accuracy (over rows with a reference) and lengths."""

    accuracy: float | None
    n_references: int
    lengths: LengthStats


@dataclass
class DivergenceStats:
    tokens: int
    total: float
    mean_per_token: float
    loss: float  # the learner's loss on these samples at step 0 (skip mask + aggregation, no IS weights)
    share_first: dict[int, float]  # K -> share of the total divergence at positions < K
    masked_share: float  # share that loss.skip_first_tokens masks (= share_first[skip])
    demonstration_independent_share: float | None  # share at small-shift positions; None without shifts
    first_shift_position: float | None  # median over rows of the first not-small-shift position
    by_position: list[float]  # mean divergence at each position (over rows that reach it)
    shift_by_position: list[float] | None


@dataclass
class Opening:
    text: str
    count: int
    share: float


@dataclass
class ProbeSummary:
    student_greedy: AnswerStats
    student_sampled: AnswerStats
    teacher_greedy: AnswerStats
    teacher_sampled: AnswerStats
    divergence: DivergenceStats
    teacher_openings_greedy: list[Opening]  # the teacher's most favoured openings (its mode)
    teacher_openings_sampled: list[Opening]  # what the student is pulled towards, sample by sample
    teacher_copy_share: float | None  # teacher greedy answers that copy from their demonstration
    student_copy_share: float | None  # the same for the student (who never saw it): the baseline


@dataclass
class Recommendation:
    key: str  # a config key, e.g. "rollout.max_new_tokens"
    value: Any
    reason: str

    def line(self) -> str:
        return f"{self.key}: {self.value}  # {self.reason}"


@dataclass
class Verdict:
    name: str  # one of VERDICTS
    findings: list[str] = field(default_factory=list)  # every failing rule, in priority order
    recommendations: list[Recommendation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.name == OK


# ---- pure summaries ------------------------------------------------------------------------------


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The ``ceil(q * n)``-th smallest value (1-based, at least the first)."""
    if not values:
        raise ValueError("nearest_rank of no values")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def length_stats(answers: Sequence[Answer]) -> LengthStats:
    lengths = [len(a.token_ids) for a in answers]
    if not lengths:
        return LengthStats(0, 0.0, 0.0, 0, 0, 0)
    return LengthStats(n=len(lengths), finished_share=sum(a.finished for a in answers) / len(answers),
                       mean=sum(lengths) / len(lengths), p50=int(nearest_rank(lengths, 0.5)),
                       p90=int(nearest_rank(lengths, 0.9)), max=max(lengths))


def answer_stats(answers: Sequence[Answer]) -> AnswerStats:
    judged = [a.correct for a in answers if a.correct is not None]
    return AnswerStats(accuracy=sum(judged) / len(judged) if judged else None, n_references=len(judged),
                       lengths=length_stats(answers))


def small_shift(shift: Sequence[float]) -> list[bool]:
    """Per position: is the shift below SMALL_SHIFT_FRACTION of this sequence's largest shift?"""
    top = max(shift, default=0.0)
    if top <= 0:
        return [True] * len(shift)
    return [s < SMALL_SHIFT_FRACTION * top for s in shift]


def first_shift_position(shift: Sequence[float]) -> int | None:
    """The first position whose shift is not small (where the demonstration starts to matter)."""
    return next((t for t, small in enumerate(small_shift(shift)) if not small), None)


def divergence_stats(divergences: Sequence[Sequence[float]], shifts: Sequence[Sequence[float]] | None, *,
                     skip: int, window: int, aggregation: str) -> DivergenceStats:
    """Shares of the total divergence by position, and the learner's step-0 loss on these samples."""
    tokens = sum(len(d) for d in divergences)
    total = sum(sum(d) for d in divergences)

    def share(mass: float) -> float:
        return mass / total if total > 0 else 0.0

    share_first = {k: share(sum(sum(d[:k]) for d in divergences)) for k in sorted({skip, window})}
    width = max((len(d) for d in divergences), default=0)
    by_position = [statistics.fmean([d[t] for d in divergences if len(d) > t]) for t in range(width)]
    per_token = pad_right([np.asarray(d, dtype=np.float64) for d in divergences], 0.0, torch.float64, width)
    mask = response_loss_mask(response_mask([len(d) for d in divergences], width), skip)
    loss = float(aggregate(per_token, mask, aggregation)) if divergences else 0.0
    independent = first = shift_profile = None
    if shifts is not None:
        mass = sum(x for d, s in zip(divergences, shifts) for x, small in zip(d, small_shift(s)) if small)
        independent = share(mass)
        firsts = [p for p in map(first_shift_position, shifts) if p is not None]
        first = float(statistics.median(firsts)) if firsts else None
        shift_profile = [statistics.fmean([s[t] for s in shifts if len(s) > t]) for t in range(width)]
    return DivergenceStats(tokens=tokens, total=total, mean_per_token=total / tokens if tokens else 0.0, loss=loss,
                           share_first=share_first, masked_share=share_first[skip],
                           demonstration_independent_share=independent, first_shift_position=first,
                           by_position=by_position, shift_by_position=shift_profile)


def copies_demonstration(answer: str, demonstration: str, query: str) -> bool | None:
    """Does ``answer`` contain a word of the demonstration that the query does not (normalised words
    of at least MIN_COPY_WORD_LEN characters)? None when the demonstration has no such word."""
    query_words = set(normalize_text(query).split())
    informative = {w for w in normalize_text(demonstration).split() if len(w) >= MIN_COPY_WORD_LEN} - query_words
    if not informative:
        return None
    return bool(informative & set(normalize_text(answer).split()))


def copy_share(rows: Sequence[ProbeRow], teacher: bool) -> float | None:
    """Share of greedy answers (teacher's or student's) that copy from their row's demonstration."""
    judged = [copies_demonstration((r.teacher_greedy if teacher else r.student_greedy).text, r.demonstration,
                                   r.prompt) for r in rows if r.demonstration]
    judged = [j for j in judged if j is not None]
    return sum(judged) / len(judged) if judged else None


def top_openings(openings: Sequence[str], top: int = TOP_OPENINGS) -> list[Opening]:
    """The ``top`` most frequent openings with count and share (ties: first seen first)."""
    counts = Counter(openings)
    return [Opening(text, n, n / len(openings)) for text, n in counts.most_common(top)]


def summarise(rows: Sequence[ProbeRow], *, skip: int, window: int, aggregation: str) -> ProbeSummary:
    shifts = [r.shift for r in rows] if rows and all(r.shift is not None for r in rows) else None
    return ProbeSummary(
        student_greedy=answer_stats([r.student_greedy for r in rows]),
        student_sampled=answer_stats([r.student_sampled for r in rows]),
        teacher_greedy=answer_stats([r.teacher_greedy for r in rows]),
        teacher_sampled=answer_stats([r.teacher_sampled for r in rows]),
        divergence=divergence_stats([r.divergence for r in rows], shifts, skip=skip, window=window,
                                    aggregation=aggregation),
        teacher_openings_greedy=top_openings([r.teacher_greedy.opening for r in rows]),
        teacher_openings_sampled=top_openings([r.teacher_sampled.opening for r in rows]),
        teacher_copy_share=copy_share(rows, teacher=True),
        student_copy_share=copy_share(rows, teacher=False),
    )


# ---- the verdict ---------------------------------------------------------------------------------


def round_up(value: float, multiple: int = LENGTH_ROUND) -> int:
    return int(math.ceil(value / multiple) * multiple)


def suggest_max_new_tokens(teacher: LengthStats, current: int) -> int:
    """The teacher's p90 answer length rounded up to LENGTH_ROUND when the teacher's answers finish
    (>= MIN_FINISHED_SHARE) and that is above ``current``; otherwise twice ``current`` (cut-off
    answers do not tell their full length)."""
    if teacher.finished_share >= MIN_FINISHED_SHARE and round_up(teacher.p90) > current:
        return round_up(teacher.p90)
    return 2 * current


def terser_template(current: str) -> str:
    return next(name for name in TERSER_TEMPLATES if name != current)


def decide(summary: ProbeSummary, *, template: str, max_new_tokens: int, skip: int, window: int) -> Verdict:
    """Apply the rules (module constants) in the order of :data:`VERDICTS`; every failing rule adds a
    finding and its recommendations, the first one names the verdict."""
    failing: list[str] = []
    findings: list[str] = []
    recs: list[Recommendation] = []
    sg, tg = summary.student_greedy, summary.teacher_greedy
    if tg.accuracy is not None and sg.accuracy is not None:
        gain = tg.accuracy - sg.accuracy
        if tg.accuracy < ICL_MIN_TEACHER_ACCURACY or gain < ICL_MIN_GAIN:
            failing.append(ICL_TOO_WEAK)
            findings.append(f"teacher greedy accuracy {tg.accuracy:.0%} (student {sg.accuracy:.0%}): needs >= "
                            f"{ICL_MIN_TEACHER_ACCURACY:.0%} and >= {ICL_MIN_GAIN:.0%} points over the student")
    elif summary.teacher_copy_share is not None and summary.teacher_copy_share < ICL_MIN_COPY_SHARE:
        failing.append(ICL_TOO_WEAK)
        findings.append(f"only {summary.teacher_copy_share:.0%} of the teacher's greedy answers use anything of "
                        f"their demonstration (needs >= {ICL_MIN_COPY_SHARE:.0%}; no reference answers)")
    if ICL_TOO_WEAK in failing:
        recs.append(Recommendation("prompts.teacher_template", terser_template(template),
                                   "measure other templates with --set prompts.teacher_template=NAME; "
                                   "if none passes, the model is too small for SDFT on this data"))
    finished = summary.student_sampled.lengths.finished_share
    if finished < MIN_FINISHED_SHARE:
        failing.append(TRUNCATION_DOMINATES)
        findings.append(f"only {finished:.0%} of the student's samples finish within rollout.max_new_tokens = "
                        f"{max_new_tokens} (needs >= {MIN_FINISHED_SHARE:.0%}): the stop token is rarely in the loss")
        recs.append(Recommendation("rollout.max_new_tokens",
                                   suggest_max_new_tokens(summary.teacher_sampled.lengths, max_new_tokens),
                                   "room for the teacher's answers (p90, rounded up) or twice the current limit"))
    div = summary.divergence
    if div.demonstration_independent_share is not None:
        framing, what = div.demonstration_independent_share, "demonstration-independent"
    else:
        framing, what = div.share_first[window], f"in the first {window} tokens"
    if framing > FRAMING_MAX_SHARE:
        failing.append(FRAMING_DOMINATES)
        findings.append(f"{framing:.0%} of the teacher-student divergence is {what} (needs <= {FRAMING_MAX_SHARE:.0%})")
        k = int(div.first_shift_position) if div.first_shift_position is not None else window
        if k > skip:
            recs.append(Recommendation("loss.skip_first_tokens", k,
                                       "mask the positions before the demonstration starts to matter"))
        recs.append(Recommendation("prompts.teacher_template", terser_template(template),
                                   "a template without an invitation to frame the answer"))
    unique: dict[str, Recommendation] = {}
    for rec in recs:
        unique.setdefault(rec.key, rec)
    return Verdict(name=failing[0] if failing else OK, findings=findings, recommendations=list(unique.values()))
