"""Intervals and verdicts against values computed by hand."""

import math

import pandas as pd
import pytest

from disentangle.stats import diff_ci, fmt, mean_ci, spearman_ci, summarise, verdict


def test_mean_ci_known_value():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert m == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)


def test_mean_ci_ignores_nan_and_needs_two_values():
    assert mean_ci([1.0, float("nan"), 3.0])[0] == 2.0
    m, lo, hi = mean_ci([5.0])
    assert m == 5.0 and math.isnan(lo) and math.isnan(hi)


def test_diff_ci_welch_known_value():
    # equal sizes and variances: se = sqrt(1/3 + 1/3), dof = 4
    d, lo, hi = diff_ci([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    half = 2.7764451051977987 * math.sqrt(2 / 3)
    assert d == 1.0 and lo == pytest.approx(1 - half) and hi == pytest.approx(1 + half)


def test_diff_ci_zero_variance_is_exact():
    assert diff_ci([0.5, 0.5], [0.25, 0.25]) == (0.25, 0.25, 0.25)


@pytest.mark.parametrize("low,high,sign,margin,expected", [
    (0.1, 0.3, 1, 0.0, "supported"),
    (-0.3, -0.1, -1, 0.0, "supported"),
    (-0.3, -0.1, 1, 0.0, "not supported"),
    (-0.1, 0.2, 1, 0.0, "inconclusive"),
    (-0.005, 0.004, -1, 0.01, "not supported"),   # inside the equivalence margin
    (0.001, 0.004, 1, 0.01, "not supported"),      # positive but negligible
    (float("nan"), 0.1, 1, 0.0, "inconclusive"),
])
def test_verdict(low, high, sign, margin, expected):
    assert verdict(low, high, sign, margin) == expected


def test_summarise_groups():
    df = pd.DataFrame({"w": [0, 0, 1, 1], "acc": [0.8, 1.0, 0.5, 0.5]})
    s = summarise(df, "w", "acc")
    assert s["mean"].tolist() == [0.9, 0.5]
    assert s["n"].tolist() == [2, 2]
    assert s.loc[1, "ci_low"] == s.loc[1, "ci_high"] == 0.5


def test_spearman_ci_monotone():
    rho, lo, hi = spearman_ci(range(20), [x**3 for x in range(20)])
    assert rho == pytest.approx(1.0) and lo > 0.9
    rho, lo, hi = spearman_ci(range(20), [-x for x in range(20)])
    assert rho == pytest.approx(-1.0) and hi < -0.9


def test_fmt():
    assert fmt(0.5, 0.4, 0.6) == "0.500 [0.400, 0.600]"
    assert fmt(0.5, float("nan"), float("nan")) == "0.500"


@pytest.mark.parametrize("low,high,expected", [(-0.2, 0.05, "supported"), (0.15, 0.4, "not supported"),
                                               (-0.1, 0.3, "inconclusive"), (float("nan"), 0.0, "inconclusive")])
def test_verdict_at_most(low, high, expected):
    from disentangle.stats import verdict_at_most
    assert verdict_at_most(low, high, 0.1) == expected
