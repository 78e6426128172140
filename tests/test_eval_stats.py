"""Intervals and paired tests (sdft_ray/evaluation/stats.py) against hand-worked cases."""

from __future__ import annotations

import math

import pytest

from sdft_ray.evaluation.stats import mcnemar_exact, mean_interval, wilcoxon_paired, wilson_interval

Z95 = 1.959963984540054  # the 97.5 % standard-normal quantile


def test_wilson_7_of_10_by_hand():
    # Wilson: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n) with p = 0.7, n = 10
    p, n, z = 0.7, 10, Z95
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(centre - half, abs=1e-9) and high == pytest.approx(centre + half, abs=1e-9)
    assert low == pytest.approx(0.3968, abs=1e-4) and high == pytest.approx(0.8922, abs=1e-4)


def test_wilson_edges():
    low, high = wilson_interval(0, 20)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(Z95**2 / (20 + Z95**2), rel=1e-9)
    low, high = wilson_interval(20, 20)
    assert high == pytest.approx(1.0, abs=1e-12) and low == pytest.approx(20 / (20 + Z95**2), rel=1e-9)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_mcnemar_6_vs_1_discordant_by_hand():
    # 10 questions: 3 both right, 6 only A right, 1 only B right -> discordant 7, exact two-sided
    # p = 2 * P(X <= 1 | Bin(7, 1/2)) = 2 * (1 + 7) / 128 = 0.125
    a = [1, 1, 1] + [1] * 6 + [0]
    b = [1, 1, 1] + [0] * 6 + [1]
    test = mcnemar_exact([bool(x) for x in a], [bool(x) for x in b])
    assert (test.a_only, test.b_only, test.n) == (6, 1, 10)
    assert test.p_value == pytest.approx(16 / 128, abs=1e-12)
    # symmetric in A and B; 7 vs 0 -> 2 / 128
    assert mcnemar_exact(b, a).p_value == pytest.approx(0.125, abs=1e-12)
    assert mcnemar_exact([True] * 7, [False] * 7).p_value == pytest.approx(2 / 128, abs=1e-12)


def test_mcnemar_without_discordant_pairs_is_one():
    assert mcnemar_exact([True, False], [True, False]).p_value == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_wilcoxon_all_positive_by_hand():
    # 5 pairs, every difference positive and distinct: exact two-sided p = 2 / 2^5 = 0.0625,
    # statistic (the smaller rank sum) 0
    test = wilcoxon_paired([2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert (test.a_only, test.b_only) == (5, 0)
    assert test.statistic == 0.0 and test.p_value == pytest.approx(0.0625, abs=1e-12)
    # differences +1, -2, +3, +4 (ranks 1, 2, 3, 4): W- = 2; exact two-sided p = 2 * P(W <= 2), and the
    # subsets of {1, 2, 3, 4} with rank sum <= 2 are {}, {1}, {2}: p = 2 * 3 / 16
    test = wilcoxon_paired([1.0, 0.0, 3.0, 4.0], [0.0, 2.0, 0.0, 0.0])
    assert test.statistic == 2.0 and test.p_value == pytest.approx(6 / 16, abs=1e-12)


def test_wilcoxon_identical_is_one():
    assert wilcoxon_paired([0.1, 0.2], [0.1, 0.2]).p_value == 1.0


def test_mean_interval_by_hand():
    # values 1, 2, 3: mean 2, sd 1, sem 1/sqrt(3), t_{0.975, 2} = 4.302652729911275
    m = mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert (m.mean, m.n) == (2.0, 3)
    assert m.low == pytest.approx(2 - half, rel=1e-9) and m.high == pytest.approx(2 + half, rel=1e-9)
    assert math.isnan(mean_interval([1.0]).low) and math.isnan(mean_interval([]).mean)
    assert mean_interval([0.5, 0.5]).low == 0.5
