"""The index page's summary: every arm on the plane of test accuracy against attention correctness.

Section 07 records the table (:func:`arm_table`, under ``arm_summary``) from the same models it analyses
(the baseline and each constraint at its chosen weight; the alternatives join as arms once they exist);
the runner draws it (:func:`figure`) next to the verdict counts of the findings it lists. Nothing here
is typed in: a different study gives a different picture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .. import arms as registry
from ..stats import mean_ci

ACCURACY, CORRECTNESS = "test_acc", "support_excess_cls"
VERDICTS = ("supported", "not supported", "inconclusive")


def arm_table(arm_runs: Sequence[tuple[str, float, int, object]], levels: pd.DataFrame | None) -> pd.DataFrame:
    """One row per arm: ``constraint``, ``weight``, ``n`` (finished seeds), test accuracy and support mass
    above chance (mean over the arm's models of their global heads), each with its 95% t-interval over seeds.

    arm_runs: ``study.arm_results`` rows ``(arm, weight, seed, RunResult)``; levels: ``analysis.model_level``
    of the per-head metrics by ``constraint`` (it holds ``support_excess_cls`` and its interval); None when no
    model finished. ``excluded`` counts the arm's runs that did not finish (diverged or failed), left out.
    """
    rows = []
    for arm in dict.fromkeys(a for a, *_ in arm_runs):
        runs = [(w, r) for a, w, _, r in arm_runs if a == arm]
        acc = [r.metrics.get(ACCURACY, math.nan) for _, r in runs if r.status == "finished"]
        m, lo, hi = mean_ci(acc)
        level = levels[levels["constraint"] == arm] if levels is not None and len(levels) else []
        c = level.iloc[0] if len(level) else {}
        rows.append({"constraint": arm, "weight": float(runs[0][0]), "n": len(acc), "excluded": len(runs) - len(acc),
                     ACCURACY: m, f"{ACCURACY}_ci_low": lo, f"{ACCURACY}_ci_high": hi,
                     CORRECTNESS: float(c.get(CORRECTNESS, math.nan)),
                     f"{CORRECTNESS}_ci_low": float(c.get(f"{CORRECTNESS}_ci_low", math.nan)),
                     f"{CORRECTNESS}_ci_high": float(c.get(f"{CORRECTNESS}_ci_high", math.nan))})
    return pd.DataFrame(rows)


def verdict_counts(findings: Sequence[Mapping]) -> dict[str, int]:
    """How many findings rows have each verdict (every verdict listed, zeros included)."""
    counts = {v: 0 for v in VERDICTS}
    for r in findings:
        counts[str(r.get("verdict"))] = counts.get(str(r.get("verdict")), 0) + 1
    return counts


def _num(v) -> float:
    """A recorded number as a float: the results JSON stores NaN (an arm with no finished run) as null."""
    return math.nan if v is None else float(v)


def _interval(row: Mapping, col: str) -> tuple[float, float]:
    """Distances from the mean to the interval's ends; 0 where the interval is undefined (one seed)."""
    m, lo, hi = (_num(row.get(k)) for k in (col, f"{col}_ci_low", f"{col}_ci_high"))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return 0.0, 0.0
    return m - lo, hi - m


def plane(ax, table: Sequence[Mapping]):
    """Each arm a point (mean over seeds) with 95% intervals on both axes: test accuracy (x) against support
    mass above chance (y, 0 = attention no better than uniform), on ``ax``."""
    for row in table:
        arm = str(row["constraint"])
        x, y = _num(row[ACCURACY]), _num(row[CORRECTNESS])
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        name = registry.label(arm, None if arm == registry.BASELINE else float(row["weight"]))
        ax.errorbar(x, y, xerr=np.array(_interval(row, ACCURACY))[:, None], yerr=np.array(_interval(row, CORRECTNESS))[:, None],
                    fmt="o", color=registry.colour(arm), ms=7, capsize=3, lw=1.2, label=f"{name} (n={int(row['n'])})")
    if not ax.get_legend_handles_labels()[0]:  # every arm diverged or failed: say so rather than an empty plane
        ax.text(0.5, 0.5, "no arm has a finished run to draw", transform=ax.transAxes, ha="center", va="center")
    ax.axhline(0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("test accuracy")
    ax.set_ylabel("support mass above chance")
    ax.set_title("Each arm: mean over seeds, 95% intervals", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    return ax


def figure(table: Sequence[Mapping], counts: Mapping[str, int]) -> Figure:
    """Left: :func:`plane`. Right: the verdict counts."""
    from .plots import VERDICT_COLOURS

    fig = Figure(figsize=(9.0, 3.6))
    ax, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.4, 1]})
    plane(ax, table)
    names = list(counts)
    values = [counts[v] for v in names]
    bars.barh(range(len(names)), values, color=[VERDICT_COLOURS.get(v, "#9e9e9e") for v in names])
    for i, v in enumerate(values):
        bars.text(v, i, f" {v}", va="center", fontsize=9)
    bars.set_yticks(range(len(names)), names)
    bars.invert_yaxis()
    bars.set_xlim(0, max([1, *values]) * 1.25)
    bars.set_xticks([])
    bars.set_title(f"Verdicts ({sum(values)} findings)", fontsize=10)
    for side in ("top", "right", "bottom"):
        bars.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def alt_text(table: Sequence[Mapping], counts: Mapping[str, int]) -> str:
    """What the figure shows, in words and with its numbers, for readers who cannot see it."""
    def num(v: float, spec: str) -> str:
        return format(v, spec) if math.isfinite(v) else "n/a"

    def left_out(r: Mapping) -> str:
        n = int(r.get("excluded") or 0)  # runs that diverged or failed: not drawn, said so
        return f" ({n} run{'s' if n > 1 else ''} that did not finish left out)" if n else ""

    points = "; ".join(
        f"{registry.label(str(r['constraint']), None if r['constraint'] == registry.BASELINE else float(r['weight']))}: "
        f"accuracy {num(_num(r[ACCURACY]), '.3f')}, support mass above chance {num(_num(r[CORRECTNESS]), '+.3f')}"
        f"{left_out(r)}" for r in table)
    verdicts = ", ".join(f"{n} {v}" for v, n in counts.items())
    return (f"Scatter of test accuracy (x) against attention correctness, the readout query's attention mass on "
            f"supporting tokens above chance (y), one point per arm with 95% intervals over seeds: {points}. "
            f"Beside it, verdict counts of the findings: {verdicts}.")
