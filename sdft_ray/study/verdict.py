"""The study's pre-registered decision rules (pure functions; docs/study.md states them in words).

A *setting* is one arm at one learning rate, over all its seeds. Its trained-facts strict
outcomes are pooled over the seeds (seed-major, the same question order in every seed) and
paired with the base model's outcome on the same question; its per-prompt prior KL is the mean
over seeds of KL(base || model) on each prior prompt, so two settings pair prompt by prompt.

* :func:`best_setting` - phase 2 starts from the setting with the highest trained-facts strict
  accuracy (averaged over seeds), ties broken by the lower mean prior KL.
* :func:`decide` - the verdict: ``supports`` / ``refutes`` / ``inconclusive`` /
  ``not applicable`` (see its docstring for the rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sdft_ray.evaluation.stats import mcnemar_exact, wilcoxon_paired

__all__ = ["ALPHA", "Setting", "Verdict", "best_setting", "decide"]

ALPHA = 0.05
SUPPORTS, REFUTES, INCONCLUSIVE, NOT_APPLICABLE = "supports", "refutes", "inconclusive", "not applicable"


@dataclass(frozen=True)
class Setting:
    arm: str
    variant: str
    lr: float
    strict: tuple[bool, ...]  # trained-facts strict outcomes, pooled over seeds
    base_strict: tuple[bool, ...]  # the base model on the same questions, same order
    prior_kl: tuple[float, ...]  # per prior prompt, mean over seeds

    def __post_init__(self) -> None:
        if len(self.strict) != len(self.base_strict) or not self.strict:
            raise ValueError(f"{self.name}: {len(self.strict)} outcomes vs {len(self.base_strict)} base outcomes")

    @property
    def name(self) -> str:
        return f"{self.arm} lr={self.lr:g}"

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.strict))

    @property
    def base_accuracy(self) -> float:
        return float(np.mean(self.base_strict))

    @property
    def mean_kl(self) -> float:
        return float(np.mean(self.prior_kl))


def best_setting(settings: Sequence[Setting]) -> Setting:
    """Highest strict accuracy; ties -> lower mean prior KL; then the first given."""
    if not settings:
        raise ValueError("best_setting: no settings")
    return min(enumerate(settings), key=lambda p: (-p[1].accuracy, p[1].mean_kl, p[0]))[1]


@dataclass
class Verdict:
    label: str
    reason: str
    checks: list[dict[str, Any]] = field(default_factory=list)  # one per SDFT setting

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.label, "reason": self.reason, "checks": self.checks}


def _learns(s: Setting, alpha: float) -> tuple[bool, float]:
    p = mcnemar_exact(s.strict, s.base_strict).p_value
    return (p < alpha and s.accuracy > s.base_accuracy), p


def _dominating(s: Setting, sft: Sequence[Setting]) -> list[Setting]:
    return [o for o in sft if o.accuracy >= s.accuracy and o.mean_kl <= s.mean_kl]


def _comparator(s: Setting, sft: Sequence[Setting]) -> Setting | None:
    """The SFT setting with the closest strict accuracy at or above ``s``'s (ties: lower KL)."""
    above = [o for o in sft if o.accuracy >= s.accuracy]
    return min(above, key=lambda o: (o.accuracy, o.mean_kl)) if above else None


def decide(gate_passed: bool, settings: Sequence[Setting], *, sft_variant: str = "sft", sdft_variant: str = "sdft",
           alpha: float = ALPHA) -> Verdict:
    """The verdict by the rule fixed before the study ran:

    * **not applicable** - no teacher template passed the Phase-0 gate;
    * **supports** (the claim at this scale) - some SDFT setting (a) learns: its strict accuracy
      on trained facts is above the base model's with exact McNemar p < ``alpha`` (pooled over
      seeds), (b) is not dominated: no SFT setting has strict accuracy >= it *and* mean prior
      KL <= it, and (c) when SFT settings with strict accuracy >= it exist, its per-prompt prior
      KL is lower than that of the one with the closest accuracy (ties: lower KL) by a paired
      Wilcoxon test p < ``alpha``;
    * **refutes** (at this scale) - every SDFT setting is dominated, or none learns;
    * **inconclusive** - anything else.
    """
    sft = [s for s in settings if s.variant == sft_variant]
    sdft = [s for s in settings if s.variant == sdft_variant]
    if not gate_passed:
        return Verdict(NOT_APPLICABLE, "no teacher template passed the Phase-0 gate: in-context learning too weak "
                                       "at this size")
    if not sft or not sdft:
        raise ValueError(f"decide: need settings of both {sft_variant!r} and {sdft_variant!r}, got "
                         f"{sorted({s.variant for s in settings})}")
    checks = []
    for s in sdft:
        learns, p_learn = _learns(s, alpha)
        dominating = _dominating(s, sft)
        comparator = _comparator(s, sft)
        check: dict[str, Any] = {"setting": s.name, "accuracy": s.accuracy, "base_accuracy": s.base_accuracy,
                                 "mean_kl": s.mean_kl, "learns": learns, "p_vs_base": p_learn,
                                 "dominated_by": [o.name for o in dominating],
                                 "comparator": comparator.name if comparator else None}
        kl_lower = True
        if comparator is not None:
            test = wilcoxon_paired(s.prior_kl, comparator.prior_kl)
            kl_lower = test.p_value < alpha and s.mean_kl < comparator.mean_kl
            check.update(p_kl_vs_comparator=test.p_value, comparator_mean_kl=comparator.mean_kl)
        check["kl_lower"] = kl_lower
        check["supports"] = learns and not dominating and kl_lower
        checks.append(check)
    winners = [c["setting"] for c in checks if c["supports"]]
    if winners:
        return Verdict(SUPPORTS, f"{', '.join(winners)}: learns the trained facts (McNemar vs base p < {alpha}), "
                                 "is not dominated by any SFT setting and forgets less than the closest SFT setting "
                                 f"at or above its accuracy (Wilcoxon p < {alpha})", checks)
    if all(c["dominated_by"] for c in checks):
        return Verdict(REFUTES, "every SDFT setting is dominated by an SFT setting (>= strict accuracy and <= mean "
                                "prior KL)", checks)
    if not any(c["learns"] for c in checks):
        return Verdict(REFUTES, f"no SDFT setting learns the trained facts (strict accuracy not above the base model "
                                f"with McNemar p < {alpha})", checks)
    return Verdict(INCONCLUSIVE, "an SDFT setting learns or is undominated, but none learns, is undominated and "
                                 "forgets significantly less than its SFT comparator", checks)


# ---- Phase 0: the teacher check ------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    """The demonstration-conditioned teacher with one template, against the Phase-0 gate."""

    label: str
    strict: float
    paraphrase: float
    overall: float  # every fact question, all kinds
    finished: float  # share of answers ending within the rollout length
    passes: bool


def check_gate(label: str, rows: Sequence[dict[str, Any]], *, strict: float, paraphrase: float,
               finished: float) -> GateResult:
    """Gate one template from its evaluation rows (``kind`` all / strict / paraphrase / ...,
    ``score``, ``finished_fraction``): strict accuracy >= ``strict``, paraphrase accuracy >=
    ``paraphrase`` and a finished share (over all its answers) >= ``finished``."""
    by_kind = {r["kind"]: r for r in rows}
    for kind in ("all", "strict", "paraphrase"):
        if kind not in by_kind:
            raise ValueError(f"check_gate({label}): no {kind!r} row in {sorted(by_kind)}")
    s, p = float(by_kind["strict"]["score"]), float(by_kind["paraphrase"]["score"])
    f = float(by_kind["all"]["finished_fraction"])
    return GateResult(label, s, p, float(by_kind["all"]["score"]), f,
                      s >= strict and p >= paraphrase and f >= finished)


def choose_template(results: Sequence[GateResult]) -> tuple[GateResult, bool]:
    """The template phase 1 uses, and whether any template passed: among the passing templates
    (all of them when none passes) the best overall teacher accuracy; ties -> the higher
    finished share, then the first listed."""
    if not results:
        raise ValueError("choose_template: no templates")
    passing = [r for r in results if r.passes]
    pool = passing or list(results)
    best = min(enumerate(pool), key=lambda p: (-p[1].overall, -p[1].finished, p[0]))[1]
    return best, bool(passing)
