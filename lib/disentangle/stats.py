"""Intervals over seeds, effect sizes and verdicts: the arithmetic behind every claim in the report.

Seeds are few (3 in the default profile), so intervals use Student's t rather than a normal
approximation or a bootstrap (a bootstrap over 3 values badly under-covers). Effects between two
groups of runs are differences of means with Welch's interval (no equal-variance assumption).

A verdict compares an effect's interval with the direction a claim predicts:

* ``supported``      the whole interval lies on the predicted side of zero;
* ``not supported``  the whole interval lies on the other side, or inside the equivalence margin
                     ``(-margin, +margin)``: any effect is too small to matter;
* ``inconclusive``   anything else (the interval straddles zero and reaches beyond the margin).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

VERDICTS = ("supported", "not supported", "inconclusive")


def _clean(x: Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=float)
    return a[np.isfinite(a)]


def mean_ci(x: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of the mean; NaN bounds with fewer than two finite values."""
    a = _clean(x)
    if len(a) == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if len(a) < 2:
        return m, math.nan, math.nan
    half = sps.t.ppf(0.5 + level / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a))
    return m, m - half, m + half


def diff_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) - mean(b) with Welch's t interval (Welch–Satterthwaite degrees of freedom)."""
    a, b = _clean(a), _clean(b)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan, math.nan
    d = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return d, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, d, d
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = sps.t.ppf(0.5 + level / 2, dof) * se
    return d, d - half, d + half


def verdict(low: float, high: float, expected_sign: int, margin: float = 0.0) -> str:
    """Verdict for an effect interval [low, high] when the claim predicts ``expected_sign`` (+1 or -1)."""
    if expected_sign not in (1, -1):
        raise ValueError(f"expected_sign={expected_sign} must be +1 or -1")
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    lo, hi = (low, high) if expected_sign == 1 else (-high, -low)  # now the claim predicts > 0
    if lo > 0 and not (hi < margin):
        return "supported"
    if hi < 0 or (lo > -margin and hi < margin):
        return "not supported"
    return "inconclusive"


def summarise(df: pd.DataFrame, by: str | list[str], value: str, level: float = 0.95) -> pd.DataFrame:
    """One row per group: ``mean``, ``ci_low``, ``ci_high`` (t interval over the group's rows) and ``n``."""
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for key, g in df.groupby(by, sort=True, dropna=False):
        m, lo, hi = mean_ci(g[value], level)
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), "mean": m, "ci_low": lo, "ci_high": hi, "n": int(np.isfinite(g[value]).sum())})
    return pd.DataFrame(rows)


def fmt(mean: float, low: float, high: float, digits: int = 3) -> str:
    """``0.912 [0.887, 0.937]``; the interval is omitted when undefined."""
    if not math.isfinite(mean):
        return "n/a"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def spearman_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Spearman's rho with a Fisher-z interval (standard error 1.06 / sqrt(n - 3), Fieller et al. 1957)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 4 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan, math.nan, math.nan
    rho = float(sps.spearmanr(x, y).statistic)
    z, half = np.arctanh(np.clip(rho, -0.999999, 0.999999)), sps.norm.ppf(0.5 + level / 2) * 1.06 / math.sqrt(len(x) - 3)
    return rho, float(np.tanh(z - half)), float(np.tanh(z + half))


def verdict_at_most(low: float, high: float, bound: float) -> str:
    """Verdict for a claim that an effect is *at most* ``bound`` (e.g. "no more correct than before"):
    ``supported`` when the whole interval lies below the bound, ``not supported`` when it lies above it,
    ``inconclusive`` when it straddles it or is undefined."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if high < bound:
        return "supported"
    if low > bound:
        return "not supported"
    return "inconclusive"
