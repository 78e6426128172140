"""Intervals and paired tests for evaluation results (thin wrappers over scipy.stats).

* :func:`wilson_interval` - 95 % Wilson score interval of a proportion (``k`` of ``n``);
* :func:`mean_interval` - a mean with its 95 % Student-t interval (per-prompt KL / NLL);
* :func:`mcnemar_exact` - the exact McNemar test of two paired 0/1 outcomes on the same questions
  (a two-sided binomial test on the discordant pairs);
* :func:`wilcoxon_paired` - the Wilcoxon signed-rank test of paired per-prompt values;
* :func:`difference_interval` - the difference of two independent means with its Welch interval.

Every function returns plain floats (NaN where a quantity is undefined, e.g. an interval of 0
rows) so that results go straight into JSON and CSV rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["MeanInterval", "PairedTest", "difference_interval", "mcnemar_exact", "mean_interval", "wilcoxon_paired", "wilson_interval"]

CONFIDENCE = 0.95


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n``; ``(nan, nan)`` when ``n == 0``."""
    from scipy.stats import binomtest

    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class MeanInterval:
    mean: float
    low: float
    high: float
    n: int

    def as_dict(self, prefix: str) -> dict[str, float | int]:
        return {f"{prefix}": self.mean, f"{prefix}_low": self.low, f"{prefix}_high": self.high, f"{prefix}_n": self.n}


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> MeanInterval:
    """The mean of ``values`` and its Student-t interval (the interval is NaN below 2 values, and
    collapses to the mean when every value is equal)."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return MeanInterval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return MeanInterval(mean, math.nan, math.nan, n)
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    if sem == 0.0:
        return MeanInterval(mean, mean, mean, n)
    half = float(t.ppf(0.5 + confidence / 2, df=n - 1)) * sem
    return MeanInterval(mean, mean - half, mean + half, n)


def difference_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> tuple[MeanInterval, float]:
    """``mean(a) - mean(b)`` of two independent samples with its Welch (unequal variances) t
    interval, and the two-sided Welch p-value (``n`` of the interval: ``len(a) + len(b)``); NaN
    interval and p below 2 values on a side."""
    from scipy.stats import ttest_ind

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    n = int(x.size + y.size)
    if x.size == 0 or y.size == 0:
        return MeanInterval(math.nan, math.nan, math.nan, n), math.nan
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return MeanInterval(diff, math.nan, math.nan, n), math.nan
    if float(x.var(ddof=1)) == 0.0 and float(y.var(ddof=1)) == 0.0:
        return MeanInterval(diff, diff, diff, n), (1.0 if diff == 0.0 else 0.0)
    result = ttest_ind(x, y, equal_var=False)
    ci = result.confidence_interval(confidence)
    return MeanInterval(diff, float(ci.low), float(ci.high), n), float(result.pvalue)


@dataclass(frozen=True)
class PairedTest:
    """One paired comparison of A and B. For McNemar, ``a_only`` / ``b_only`` count the pairs only
    A / only B got right; for Wilcoxon, the number of pairs where A's value is larger / B's is."""

    test: str
    n: int
    a_only: int
    b_only: int
    statistic: float
    p_value: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> PairedTest:
    """Exact McNemar test: two-sided binomial test (p = 1/2) on the discordant pairs of two 0/1
    outcomes of the same items. p = 1 when there is no discordant pair."""
    from scipy.stats import binomtest

    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"mcnemar_exact: paired outcomes need equal 1-D shapes, got {a.shape} and {b.shape}")
    a_only = int((a & ~b).sum())
    b_only = int((~a & b).sum())
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(binomtest(min(a_only, b_only), discordant, 0.5).pvalue)
    return PairedTest("mcnemar_exact", int(a.size), a_only, b_only, float(min(a_only, b_only)), p)


def wilcoxon_paired(a: Sequence[float], b: Sequence[float]) -> PairedTest:
    """Wilcoxon signed-rank test of ``a - b`` (two-sided; zero differences dropped; scipy picks the
    exact distribution for small samples). p = 1 when every difference is zero."""
    from scipy.stats import wilcoxon

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"wilcoxon_paired: paired values need equal 1-D shapes, got {x.shape} and {y.shape}")
    d = x - y
    a_larger, b_larger = int((d > 0).sum()), int((d < 0).sum())
    if a_larger + b_larger == 0:
        return PairedTest("wilcoxon", int(x.size), 0, 0, 0.0, 1.0)
    result = wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
    return PairedTest("wilcoxon", int(x.size), a_larger, b_larger, float(result.statistic), float(result.pvalue))
