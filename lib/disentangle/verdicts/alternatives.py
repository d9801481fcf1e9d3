"""The alternatives' claims (section 11), each an effect with a 95% interval and a computed verdict.

Every function reads a per-model table (:func:`disentangle.alternatives.per_model`: one row per model with
``constraint``, ``setting``, ``seed`` and its measures) and returns rows of the findings' shape
(:func:`disentangle.verdicts.findings.row`). Only the arms' own settings (``setting == ""``) enter a
verdict; sweeps are shown, not judged. Effects are paired by seed (same seed: same data order and initial
weights) and the rules are the findings' (:func:`disentangle.stats.verdict`, ``verdict_at_most``).

A claim with two parts ("specialises heads *without* costing accuracy", "sparser *and* more correct") is
supported when both parts are, not supported when either is not, inconclusive otherwise (:func:`both`);
the row's effect is its first part's, the other part is in ``detail``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..arms import label
from ..stats import mean_ci, verdict, verdict_at_most
from .findings import row, untestable

GROUP = "alternatives"


def both(*verdicts: str) -> str:
    """The verdict of a claim whose parts all must hold."""
    if any(v == "not supported" for v in verdicts):
        return "not supported"
    if all(v == "supported" for v in verdicts):
        return "supported"
    return "inconclusive"


def paired(models: pd.DataFrame, arm: str, other: str, measure: str) -> np.ndarray:
    """Per seed: measure(arm) − measure(other), both at their own setting; seeds missing from either are left out."""
    own = models[models["setting"].fillna("") == ""] if "setting" in models else models
    a = own[own["constraint"] == arm].set_index("seed")[measure]
    b = own[own["constraint"] == other].set_index("seed")[measure]
    seeds = a.index.intersection(b.index)
    return (a.loc[seeds] - b.loc[seeds]).to_numpy(dtype=float)


def _ci(d: np.ndarray) -> tuple[float, float, float]:
    return mean_ci(d)


def _has(models: pd.DataFrame, arm: str, measure: str) -> bool:
    return arm in set(models["constraint"]) and measure in models and models.loc[models["constraint"] == arm, measure].notna().any()


def effects_vs(models: pd.DataFrame, arms: Sequence[str], measures: Sequence[str], other: str = "baseline") -> pd.DataFrame:
    """Paired change of each measure, arm − ``other`` (mean, interval, n seeds), per arm and measure."""
    rows = []
    for arm in arms:
        for m in measures:
            if not (_has(models, arm, m) and _has(models, other, m)):
                continue
            d = paired(models, arm, other, m)
            e, lo, hi = _ci(d)
            rows.append({"constraint": arm, "metric": m, "effect": e, "ci_low": lo, "ci_high": hi, "n": int(np.isfinite(d).sum())})
    return pd.DataFrame(rows, columns=["constraint", "metric", "effect", "ci_low", "ci_high", "n"])


def routing_specialises(models: pd.DataFrame, margin: float = 0.01, selectivity_margin: float = 0.05) -> dict:
    """Routing specialises heads without costing accuracy.

    Specialisation: a model's ``max(selectivity_task, selectivity_role)`` (mean over its routed heads of how
    much a head's routing frequency depends on the token's task or role, :func:`analysis.selectivity`; 0 for
    the baseline, whose heads every token uses), routed − baseline paired by seed, expected > 0 beyond
    ``selectivity_margin``. No accuracy cost: the paired change in test accuracy must stay above −``margin``
    (``verdict_at_most`` on the cost). Both must hold.
    """
    claim = f"{label('routed_heads')}: routing specialises heads without costing accuracy"
    need = ("selectivity_task", "selectivity_role", "test_acc")
    if not all(_has(models, a, m) for a in ("routed_heads", "baseline") for m in need):
        return untestable(GROUP, claim, "no routed and baseline models with routing statistics")
    models = models.assign(specialisation=models[["selectivity_task", "selectivity_role"]].max(axis=1))
    s, s_lo, s_hi = _ci(paired(models, "routed_heads", "baseline", "specialisation"))
    d_acc = paired(models, "routed_heads", "baseline", "test_acc")
    a, a_lo, a_hi = _ci(d_acc)
    v_spec = verdict(s_lo, s_hi, +1, selectivity_margin)
    v_cost = verdict_at_most(-a_hi, -a_lo, margin)  # the cost (baseline − routed) at most the margin
    by_task, by_role = (float(np.nanmean(paired(models, "routed_heads", "baseline", f"selectivity_{b}"))) for b in ("task", "role"))
    return row(GROUP, claim, s, s_lo, s_hi, both(v_spec, v_cost),
               f"selectivity of the routed heads (max of by task, by role) vs baseline, paired over {len(d_acc)} seeds",
               f"specialisation {v_spec} (margin {selectivity_margin:g}; by task {by_task:.3f}, by role {by_role:.3f}); "
               f"accuracy change {a:+.3f} [{a_lo:+.3f}, {a_hi:+.3f}]: no cost beyond {margin:g} {v_cost}")


def attractors_separate(models: pd.DataFrame, ami_margin: float = 0.05) -> dict:
    """Hopfield attractors separate the story's factors.

    Per Hopfield model: ``ami``, the chance-adjusted mutual information between each entity token's attractor
    and its factor (entity kind, identity, question/story role; 0 = what a random assignment of the same
    attractor sizes gives), mean over the factors. Each model is paired with its own chance level (0 by
    construction); expected > 0 beyond ``ami_margin``.
    """
    claim = f"{label('hopfield')}: attractors separate the story's factors"
    if not _has(models, "hopfield", "ami"):
        return untestable(GROUP, claim, "no Hopfield models with attractor statistics")
    own = models[(models["constraint"] == "hopfield") & (models["setting"].fillna("") == "")]
    m, lo, hi = _ci(own["ami"].to_numpy(dtype=float))
    parts = ", ".join(f"{f} {own[f'ami_{f}'].mean():.3f}" for f in ("kind", "entity", "role") if f"ami_{f}" in own)
    return row(GROUP, claim, m, lo, hi, verdict(lo, hi, +1, ami_margin),
               f"chance-adjusted MI of attractors with the factors (mean over factors), {int(own['ami'].notna().sum())} seeds",
               f"per factor: {parts}; metastable share {own['metastable'].mean():.2f}; margin {ami_margin:g}")


def attractors_beat_clustering(models: pd.DataFrame, ami_margin: float = 0.05) -> dict:
    """Hopfield attractors separate the story's factors better than a plain clustering of the baseline's states.

    Paired by seed: the Hopfield model's ``ami`` (mean over factors) minus the same-seed baseline's
    ``control_ami``, its token states at the same point (after attention, layer-normalised) in as many
    k-means clusters as the memory has patterns plus one (the metastable tokens); expected > 0 beyond
    ``ami_margin``. Without it, "attractors separate the factors" could be the states' doing, not the memory's.
    """
    claim = f"{label('hopfield')}: attractors separate the story's factors better than clustering the baseline's states"
    if not (_has(models, "hopfield", "ami") and _has(models, "baseline", "control_ami")):
        return untestable(GROUP, claim, "no Hopfield models and clustered baseline states to pair")
    # one column to pair: the attractors' score for the Hopfield models, the control's for the baseline
    score = np.where(models["constraint"] == "hopfield", models["ami"], models["control_ami"])
    d = paired(models.assign(score=score), "hopfield", "baseline", "score")
    m, lo, hi = _ci(d)
    base = models[(models["constraint"] == "baseline") & (models["setting"].fillna("") == "")]
    parts = ", ".join(f"{f} {base[f'control_ami_{f}'].mean():.3f}" for f in ("kind", "entity", "role") if f"control_ami_{f}" in base)
    return row(GROUP, claim, m, lo, hi, verdict(lo, hi, +1, ami_margin),
               f"attractors' chance-adjusted MI minus that of k-means clusters of the same-seed baseline's states, paired over {len(d)} seeds",
               f"control per factor: {parts}; margin {ami_margin:g}")


def entmax_vs_penalty(models: pd.DataFrame, arm: str, penalty: str = "attention_entropy", margin: float = 0.01) -> dict:
    """Entmax attention is sparser and more correct than the attention-entropy penalty.

    Paired by seed, ``arm`` (an entmax model) − ``penalty`` (the constraint at its chosen weight): sparser =
    readout-query entropy lower (expected < 0 beyond ``margin``); more correct = support mass above chance
    higher (expected > 0 beyond ``margin``). Both must hold.
    """
    claim = f"{label(arm)} is sparser and more correct than the {label(penalty)} penalty"
    if not all(_has(models, a, m) for a in (arm, penalty) for m in ("entropy_cls", "support_excess_cls")):
        return untestable(GROUP, claim, f"no {arm} and {penalty} models to pair")
    c, c_lo, c_hi = _ci(d := paired(models, arm, penalty, "support_excess_cls"))
    e, e_lo, e_hi = _ci(paired(models, arm, penalty, "entropy_cls"))
    v_sparse, v_correct = verdict(e_lo, e_hi, -1, margin), verdict(c_lo, c_hi, +1, margin)
    precision = paired(models, arm, penalty, "topk_precision") if "topk_precision" in models else np.array([np.nan])
    return row(GROUP, claim, c, c_lo, c_hi, both(v_sparse, v_correct),
               f"change in support mass above chance (readout query) vs the penalty at its chosen weight, paired over {len(d)} seeds",
               f"more correct {v_correct}; sparser {v_sparse}: readout entropy change {e:+.3f} [{e_lo:+.3f}, {e_hi:+.3f}]; "
               f"top-k precision change {np.nanmean(precision):+.3f}; margin {margin:g}")


def rows(models: pd.DataFrame, margin: float = 0.01, selectivity_margin: float = 0.05, ami_margin: float = 0.05) -> list[dict]:
    """The section's findings rows, in the order of the issue: routing, attractors, both entmax arms."""
    return [routing_specialises(models, margin, selectivity_margin), attractors_separate(models, ami_margin),
            attractors_beat_clustering(models, ami_margin),
            *[entmax_vs_penalty(models, a, margin=margin) for a in ("entmax15", "entmax_alpha")]]


__all__ = ["GROUP", "attractors_separate", "both", "effects_vs", "entmax_vs_penalty", "paired", "routing_specialises", "rows"]
