"""The study's claims, each turned into an effect with a 95% interval and a computed verdict.

Every function takes frames of runs (or of per-head metrics) and returns rows::

    {"group", "claim", "verdict", "effect", "ci_low", "ci_high", "measure", "detail"}

Nothing here knows what the answer "should" be: the same code on other results gives other verdicts.
Effects between a constraint and the baseline are **paired by seed** (the same seed fixes the data order
and the initial weights, so per-seed differences remove that variance); the interval is a t-interval of
the per-seed differences. Verdict rules are in :mod:`disentangle.stats` (``verdict``: sign claims with an
equivalence margin; ``verdict_at_most``: "no more than" claims).

The claims (the README's question, one verdict row each):

1. constraints degrade accuracy (per constraint, at its chosen weight);
2. more FFN width, d_model, layers or heads win it back (:mod:`disentangle.verdicts.capacity`);
3. sparser attention is not more correct attention (over heads; and for the entropy constraint itself);
4. where each constraint should hurt most (orthogonality and MI: coreference, where two heads must read
   the same entity; attention entropy: tasks that aggregate many tokens; head usage: the task that leans
   most on rarely used heads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..stats import mean_ci, verdict, verdict_at_most
from ..arms import label

VERDICT_ORDER = ("supported", "not supported", "inconclusive")
AGGREGATION_TASKS = ("counting", "majority")
LOOKUP_TASKS = ("where_person", "where_object", "coreference", "deduction")


def row(group: str, claim: str, effect: float, low: float, high: float, verdict_: str, measure: str, detail: str = "") -> dict:
    return {"group": group, "claim": claim, "verdict": verdict_, "effect": effect, "ci_low": low, "ci_high": high,
            "measure": measure, "detail": detail}


def untestable(group: str, claim: str, why: str) -> dict:
    return row(group, claim, math.nan, math.nan, math.nan, "inconclusive", "not measured", f"not testable here: {why}")


def left_out(runs: pd.DataFrame) -> str:
    """"3 runs that did not finish left out (baseline: 2 of 2 diverged; ...)", or "" when every run of ``runs``
    finished: a verdict says which runs it could not use (a diverged run has no test accuracy)."""
    from ..study import unfinished

    if "status" not in runs or (runs["status"] == "finished").all():
        return ""
    table = unfinished(runs)
    statuses = [c for c in table.columns if c not in ("constraint", "weight", "runs")]
    parts = [f"{label(r['constraint'])}: " + ", ".join(f"{r[s]} of {r['runs']} {s}" for s in statuses if r[s])
             for r in table.to_dict("records")]
    n = int(table[statuses].to_numpy().sum())
    return f"{n} run{'s' if n > 1 else ''} that did not finish left out ({'; '.join(parts)})"


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def paired_differences(runs: pd.DataFrame, arm: pd.Series, base: pd.Series, metric: str | Sequence[str]) -> np.ndarray:
    """Per seed: metric(arm) − metric(baseline); several metrics are averaged first (per seed)."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    a = runs[arm].set_index("seed")[metrics].mean(axis=1)
    b = runs[base].set_index("seed")[metrics].mean(axis=1)
    seeds = a.index.intersection(b.index)
    return (a.loc[seeds] - b.loc[seeds]).to_numpy(dtype=float)


# ----------------------------------------------------------------------------- 1. accuracy costs


def degrade(sweeps: pd.DataFrame, chosen: pd.DataFrame, margin: float = 0.01) -> list[dict]:
    """Claim 1: each constraint, at its chosen weight, lowers mean test accuracy (paired by seed).

    sweeps: Study.sweeps() runs (``sweep``, ``weight``, ``seed``, ``test_acc``); chosen: Study.chosen_weights().
    Verdict: expected sign −1, equivalence margin ``margin`` (accuracy points as a fraction).
    """
    out = []
    for r in chosen.itertuples():
        runs = sweeps[sweeps["sweep"] == r.constraint]
        compared = runs[runs["weight"].isin([r.weight, 0])]
        d = paired_differences(runs, runs["weight"] == r.weight, runs["weight"] == 0, "test_acc")
        m, lo, hi = mean_ci(d)
        n = int(np.isfinite(d).sum())  # seeds where both runs finished
        out.append(row("accuracy cost", f"{label(r.constraint)} degrades accuracy", m, lo, hi, verdict(lo, hi, -1, margin),
                       f"change in mean test accuracy at weight {r.weight:g} vs baseline, paired over {n} seeds",
                       _join(left_out(compared), "no seed with both runs finished" if n == 0 else "")))
    return out


# ------------------------------------------------------------------------ 3. sparse vs correct


def sparse_not_correct(metrics: pd.DataFrame, spearman: pd.DataFrame, bound: float = 0.1, margin: float = 0.01) -> list[dict]:
    """Claim 3, twice.

    (a) Over every global head of every model (baseline and constraints at their chosen weights): the
        Spearman correlation between sparsity (1 − entropy of the readout row) and correctness (support
        mass above chance). "Sparser is not more correct" is supported when the correlation's interval
        lies below ``bound`` (even a weak positive association is excluded), not supported when it lies
        above it. ``spearman``: analysis.sparsity_vs_correctness(...) rows.
    (b) The attention-entropy constraint itself, at its chosen weight, against the baseline (model level:
        each model's heads averaged, paired by seed): it must make attention sparser (entropy interval
        below 0) and then its support mass above chance must not rise by more than ``margin``.
    """
    out = []
    over_heads = "sparser attention is not more correct (over heads)"
    claim = "the attention-entropy constraint makes attention sparser but not more correct"
    if metrics.empty:  # head_frames of a study whose models all diverged or failed
        why = "no finished model to measure attention on (every run diverged or failed)"
        return [untestable("sparse vs correct", over_heads, why), untestable("sparse vs correct", claim, why)]
    primary = spearman[(spearman["sparsity"] == "1 - entropy_cls") & (spearman["correctness"] == "support_excess_cls")]
    for pooled_by in ("group", "constraint"):  # with a `by=` grouping, the pooled row is labelled "all"
        if pooled_by in primary:
            primary = primary[primary[pooled_by] == "all"]
    if len(primary):
        s = primary.iloc[0]
        out.append(row("sparse vs correct", over_heads, s["rho"], s["ci_low"], s["ci_high"],
                       verdict_at_most(s["ci_low"], s["ci_high"], bound),
                       f"Spearman rho between 1 − readout entropy and support mass above chance, {int(s['n'])} heads",
                       f"'not more correct' = interval below rho = {bound:g}"))
    else:
        out.append(untestable("sparse vs correct", over_heads, "no pooled readout-entropy correlation in the input"))
    per_model = (metrics[metrics["task"] == "all"]
                 .groupby(["model", "constraint", "seed"])[["entropy", "support_excess_cls", "topk_precision"]]
                 .mean().reset_index())
    for needed, what in (("attention_entropy", "attention-entropy"), ("baseline", "baseline")):
        if needed not in set(per_model["constraint"]):
            out.append(untestable("sparse vs correct", claim, f"no finished {what} model"))
            return out
    arm, base = per_model["constraint"] == "attention_entropy", per_model["constraint"] == "baseline"
    d_entropy = mean_ci(paired_differences(per_model, arm, base, "entropy"))
    d_correct = mean_ci(paired_differences(per_model, arm, base, "support_excess_cls"))
    precision = per_model.loc[arm, "topk_precision"].mean()
    if not d_entropy[2] < 0:
        v, why = "inconclusive", "attention did not become measurably sparser"
    else:
        v, why = verdict_at_most(d_correct[1], d_correct[2], margin), f"entropy changed by {d_entropy[0]:+.3f}"
    out.append(row("sparse vs correct", claim, d_correct[0], d_correct[1], d_correct[2], v,
                   "change in support mass above chance (readout query, mean over global heads) vs baseline, paired by seed",
                   f"{why}; top-k precision of the constrained heads {precision:.2f}"))
    return out


# --------------------------------------------------------------------- 4. where each one hurts


def _task_gap(runs: pd.DataFrame, weight: float, hurt: Sequence[str], other: Sequence[str]) -> np.ndarray:
    """Per seed: [Δacc on the ``hurt`` tasks] − [Δacc on the ``other`` tasks], Δ = constrained − baseline."""
    arm, base = runs["weight"] == weight, runs["weight"] == 0
    return (paired_differences(runs, arm, base, [f"test_acc/{t}" for t in hurt])
            - paired_differences(runs, arm, base, [f"test_acc/{t}" for t in other]))


def rare_head_task(importance: pd.DataFrame, usage: pd.DataFrame) -> str | None:
    """The task that leans most on rarely used heads in the baseline (see :func:`rare_head_choice`)."""
    choice = rare_head_choice(importance, usage)
    return choice["task"] if choice else None


def rare_head_choice(importance: pd.DataFrame, usage: pd.DataFrame) -> dict | None:
    """The task that leans most on rarely used heads in the baseline, and how surely.

    Per baseline model: heads whose usage share is below the layer average (1/H) are "rare"; a task's
    reliance on them = the sum of their ablation importance for that task. Averaged over models; the task
    with the largest reliance is chosen (None with fewer than two tasks). Its margin: the paired per-model
    difference between its reliance and the runner-up's, mean and 95% interval; ``decided`` when the
    interval lies above 0. An undecided choice (the same code chose another task on a second machine) is
    carried into the verdict that rests on it (:func:`where_it_hurts`).
    """
    if importance.empty or usage.empty:  # no finished model
        return None
    imp = importance[(importance["constraint"] == "baseline") & (importance["task"] != "all")]
    use = usage[(usage["constraint"] == "baseline") & (usage["task"] == "all")].copy()
    if imp.empty or imp["task"].nunique() < 2:
        return None
    n_heads = use.groupby(["model", "layer"])["head"].transform("count")
    use["rare"] = use["usage_share"] < 1.0 / n_heads
    merged = imp.merge(use[["model", "layer", "head", "rare"]], on=["model", "layer", "head"])
    tasks = sorted(imp["task"].unique())
    per_model = (merged[merged["rare"]].groupby(["model", "task"])["importance"].sum().unstack("task")
                 .reindex(index=sorted(imp["model"].unique()), columns=tasks).fillna(0.0))  # no rare head: relies on none
    reliance = per_model.mean().sort_values(ascending=False, kind="stable")
    if not len(reliance):
        return None
    task, runner_up = str(reliance.index[0]), str(reliance.index[1])
    m, lo, hi = mean_ci(per_model[task] - per_model[runner_up])
    return {"task": task, "runner_up": runner_up, "reliance": float(reliance.iloc[0]), "runner_up_reliance": float(reliance.iloc[1]),
            "margin": m, "ci_low": lo, "ci_high": hi, "n": len(per_model), "decided": bool(np.isfinite(lo) and lo > 0)}


def where_it_hurts(sweeps: pd.DataFrame, chosen: pd.DataFrame, tasks: Sequence[str], rare_task: str | dict | None,
                   margin: float = 0.01) -> list[dict]:
    """Claim 4: each constraint costs more accuracy on the tasks its hypothesis names than on the others.

    Effect per seed = Δacc(named tasks) − Δacc(other tasks) (Δ = constrained − baseline at the chosen
    weight); the claim predicts a negative effect (verdict, expected sign −1, equivalence ``margin``).
    ``rare_task``: the task head usage is expected to hurt, or :func:`rare_head_choice`'s dict. When that
    choice is not decided, the verdict stands only if the runner-up task gets the same verdict; otherwise the
    row is inconclusive and says why (the claim's task is itself in doubt).
    """
    choice = rare_task if isinstance(rare_task, dict) else None
    rare_task = choice["task"] if choice else rare_task
    weights = dict(zip(chosen["constraint"], chosen["weight"]))
    hypotheses = {
        "orthogonality": (["coreference"], [t for t in LOOKUP_TASKS if t != "coreference"], "coreference (two heads read one entity)"),
        "mutual_information": (["coreference"], [t for t in LOOKUP_TASKS if t != "coreference"], "coreference (two heads read one entity)"),
        "attention_entropy": (list(AGGREGATION_TASKS), list(LOOKUP_TASKS), "aggregation tasks (counting, majority)"),
        "head_usage": ([rare_task] if rare_task else [], [t for t in tasks if t != rare_task], f"{rare_task} (leans most on rarely used heads)" if rare_task
                       else "the task that leans most on rarely used heads"),
    }
    out = []
    for c, (hurt, other, what) in hypotheses.items():
        claim = f"{label(c)} hurts {what} most"
        hurt, other = [t for t in hurt if t in tasks], [t for t in other if t in tasks]
        if c not in weights:
            out.append(untestable("where it hurts", claim, f"no chosen weight for {c}"))
            continue
        if c == "head_usage" and rare_task is None:
            out.append(untestable("where it hurts", claim, "no task leaning on rarely used heads was found (it needs a "
                                  "finished baseline model and two tasks)"))
            continue
        if not hurt or not other:
            missing = "the named tasks" if not hurt else "tasks to compare with"
            out.append(untestable("where it hurts", claim, f"this profile trains {', '.join(tasks)}: {missing} missing"))
            continue
        runs = sweeps[sweeps["sweep"] == c]
        # A diverged run records no per-task accuracy: NaN, so its seed drops out of the pairs.
        runs = runs.reindex(columns=[*runs.columns, *[f"test_acc/{t}" for t in tasks if f"test_acc/{t}" not in runs]])
        gap = _task_gap(runs, weights[c], hurt, other)
        m, lo, hi = mean_ci(gap)
        n = int(np.isfinite(gap).sum())
        v, doubt = verdict(lo, hi, -1, margin), ""
        if c == "head_usage" and choice is not None:
            doubt = (f"the task was chosen by a margin of {choice['margin']:+.3f} [{choice['ci_low']:+.3f}, {choice['ci_high']:+.3f}] "
                     f"in rare-head reliance over {choice['runner_up']} ({choice['n']} baseline models)")
            if not choice["decided"] and choice["runner_up"] in tasks:
                alt_hurt, alt_other = [choice["runner_up"]], [t for t in tasks if t != choice["runner_up"]]
                a_m, a_lo, a_hi = mean_ci(_task_gap(runs, weights[c], alt_hurt, alt_other))
                alt = verdict(a_lo, a_hi, -1, margin)
                doubt += (f", not decided; for {choice['runner_up']} the verdict would be {alt} "
                          f"({a_m:+.3f} [{a_lo:+.3f}, {a_hi:+.3f}])")
                if alt != v:
                    v = "inconclusive"
                    doubt += ": the verdict depends on an undecided choice"
        out.append(row("where it hurts", claim, m, lo, hi, v,
                       f"accuracy change on {'+'.join(hurt)} minus on {'+'.join(other)} at weight {weights[c]:g}, paired over {n} seeds",
                       _join(doubt, left_out(runs[runs["weight"].isin([weights[c], 0])]), "no seed with both runs finished" if n == 0 else "")))
    return out


def table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["group", "claim", "verdict", "effect", "ci_low", "ci_high", "measure", "detail"])


def effect_text(effect: float | None, low: float | None, high: float | None) -> str:
    """``+0.068 [-0.600, +0.735]``: signed (effects are changes), three decimals, the interval omitted when
    undefined, ``n/a`` when not measured. The one format of effects in the findings tables, here and on the
    index page."""
    def finite(v) -> bool:
        return v is not None and math.isfinite(v)

    if not finite(effect):
        return "n/a"
    if not (finite(low) and finite(high)):
        return f"{effect:+.3f}"
    return f"{effect:+.3f} [{low:+.3f}, {high:+.3f}]"


def shown(rows: list[dict]) -> pd.DataFrame:
    """:func:`table` as the report shows it: the effect and its interval as one text column."""
    t = table(rows)
    t["effect"] = [effect_text(r.effect, r.ci_low, r.ci_high) for r in t.itertuples()]
    return t[["group", "claim", "verdict", "effect", "measure", "detail"]]
