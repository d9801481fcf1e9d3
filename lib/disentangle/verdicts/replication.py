"""The replication's claims (section 10), each an effect with a 95% interval and a computed verdict.

Rows have the findings' shape (:func:`disentangle.verdicts.findings.row`) under the group ``replication``.
The rules are the findings' (:func:`disentangle.stats.verdict`): a published difference "exceeds seed noise"
when our interval of the same difference lies wholly on the published side of zero (``supported``); it is
``not supported`` when our interval lies on the other side or inside ``±margin``; ``inconclusive`` otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .. import replication as rep
from ..stats import mean_ci, verdict
from .alternatives import both
from .findings import row, untestable

GROUP = "replication"


def _protocol_text(protocol: str) -> str:
    return "as published" if protocol == "published" else "trained to convergence"


def difference_rows(contrasts: pd.DataFrame, margin: float) -> list[dict]:
    """One row per published comparison and protocol: does the published difference exceed seed noise?"""
    rows = []
    for c in contrasts.itertuples():
        sign = 1 if c.published >= 0 else -1
        claim = (f"{c.name} − {c.other} ({_protocol_text(c.protocol)}): the published difference "
                 f"({c.published:+.3f}) exceeds seed noise")
        measure = f"test accuracy on qa1, {c.how} (published: one seed)"
        rows.append(row(GROUP, claim, c.effect, c.ci_low, c.ci_high, verdict(c.ci_low, c.ci_high, sign, margin), measure,
                        f"{c.kind}; the published sign is {'+' if sign > 0 else '−'}; margin ±{margin:g}"))
    return rows


def published_inside_rows(table: pd.DataFrame) -> list[dict]:
    """Per protocol: are the published single-seed accuracies what one seed of this setup gives (each inside
    our 95% prediction interval of one seed)? Supported when all are, not supported when one is not."""
    rows = []
    for protocol, g in table[table["published"].notna()].groupby("protocol", sort=False):
        claim = f"the published accuracies are what one seed gives ({_protocol_text(protocol)})"
        g = g[g["published_in_pi"].notna()]
        if g.empty:
            rows.append(untestable(GROUP, claim, "fewer than 2 seeds per configuration"))
            continue
        inside = g["published_in_pi"].astype(bool)
        gap = (g["published"] - g["mean"]).to_numpy(float)
        e, lo, hi = mean_ci(gap)
        v = "supported" if inside.all() else "not supported"
        outside = ", ".join(g.loc[~inside, "name"]) or "none"
        rows.append(row(GROUP, claim, e, lo, hi, v, "published − our mean test accuracy, mean over configurations",
                        f"{int(inside.sum())} of {len(g)} inside the 95% prediction interval of one seed; outside: {outside}"))
    return rows


def mi_rows(models: pd.DataFrame, margin: float, protocol: str = "published") -> list[dict]:
    """The MI sign: does the published MI term (alone, at 0.05) lower post-hoc MI between the last layer's
    heads against vanilla, paired by seed, by both fresh estimators? And this project's InfoNCE constraint at
    the same weight? Both estimators must agree (:func:`~disentangle.verdicts.alternatives.both`)."""
    rows = []
    for name, who in (("mi_published", "the published MI term"), ("mi_project", "this project's MI constraint (InfoNCE)")):
        claim = f"{who} lowers the dependence between heads ({_protocol_text(protocol)}, weight 0.05)"
        have = set(models.loc[models["protocol"] == protocol, "name"]) if not models.empty else set()
        if not {name, "vanilla"} <= have:
            rows.append(untestable(GROUP, claim, f"no {name} and vanilla models"))
            continue
        parts, texts = [], []
        for method in ("infonce", "club"):
            d = rep.paired(models, name, "vanilla", method, protocol)
            e, lo, hi = mean_ci(d)
            parts.append((e, lo, hi, verdict(lo, hi, -1, margin)))
            texts.append(f"{method}: {e:+.3f} [{lo:+.3f}, {hi:+.3f}] nats → {parts[-1][3]}")
        e, lo, hi, _ = parts[0]
        rows.append(row(GROUP, claim, e, lo, hi, both(*(p[3] for p in parts)),
                        f"post-hoc InfoNCE MI between last-layer heads, {name} − vanilla, paired over {len(d)} seeds",
                        "; ".join(texts) + f"; margin ±{margin:g} nats; both estimators must agree"))
    return rows


def rows(contrasts: pd.DataFrame, table: pd.DataFrame, models: pd.DataFrame, margin: float = 0.01,
         mi_margin: float = 0.02) -> list[dict]:
    """Every replication claim: published differences (both protocols), published numbers inside our intervals,
    and the MI sign."""
    return [*difference_rows(contrasts, margin), *published_inside_rows(table), *mi_rows(models, mi_margin)]


def survival(contrasts: pd.DataFrame, margin: float = 0.01) -> pd.DataFrame:
    """Per published comparison: its verdict as published and once trained, side by side."""
    out = []
    for (name, other), g in contrasts.groupby(["name", "other"], sort=False):
        r = {"comparison": f"{name} − {other}", "published": float(g["published"].iloc[0])}
        for c in g.itertuples():
            sign = 1 if c.published >= 0 else -1
            r[c.protocol] = f"{c.effect:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]" if math.isfinite(c.ci_low) else f"{c.effect:+.3f}"
            r[f"{c.protocol} verdict"] = verdict(c.ci_low, c.ci_high, sign, margin)
        out.append(r)
    return pd.DataFrame(out)


__all__ = ["GROUP", "difference_rows", "mi_rows", "published_inside_rows", "rows", "survival"]
_ = np  # numpy kept for callers' arrays
