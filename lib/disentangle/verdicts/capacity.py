"""Capacity scaling: does a bigger model win back the accuracy a constraint costs?

Everything here is a pure function of the runs frame returned by ``Study.capacity(axes)``: one row per
(axis, size, arm, seed) with the columns ``axis`` (a dotted model field, e.g. ``model.d_ff``), ``size``,
``default_size``, ``constraint`` ("baseline" or a constraint name), ``weight``, ``seed``, ``status``,
``params`` and the accuracy metrics (``test_acc``, ``test_acc/<task>``).

Definitions (``acc`` is the metric asked for; means and 95% Student-t intervals are over seeds,
``stats.mean_ci``):

* **Default-size runs.** Every axis's default-size runs are the same configs (same hash, same cached
  runs), so for each arm they are pooled over axes and de-duplicated by seed. Sizes are compared with
  these runs even on an axis whose size list leaves the default out.
* **Reference.** ``ref`` = the baseline at the default size, with its interval ``[ref_low, ref_high]``.
* **Matches.** An arm at a size *matches* the reference when its mean accuracy reaches

      threshold = min(ref_low, ref - margin)          (margin = 0.01 by default)

  i.e. its mean is a plausible value of the baseline's own mean (inside or above the baseline's 95%
  interval), and never held to more than the ``margin`` used by the verdicts' equivalence band (so a
  very stable baseline, or a single seed with no interval, does not make the rule absurdly strict).
  The rule reads the constrained arm's *mean*, not its interval: a rule such as "the arm's upper bound
  reaches the baseline" would reward noisy arms (the fewer the seeds or the less stable the training,
  the easier the match). Requiring the baseline's mean itself would call about half of the baseline's
  own re-runs "not matching".
* **Outcome** of an arm on an axis: ``no cost`` when it matches at the default size (the constraint cost
  nothing there: nothing to recover); ``recovered`` when it does not match at the default size but
  matches at a larger one; ``not grown`` when it does not match at the default size and the grid trained it
  at no other size of that axis (``Study.capacity(arms="costly" | "costliest")``: untested, not a failure);
  ``not reached`` otherwise. ``recovered_at`` is the smallest matching size
  (for ``no cost``, the smallest matching size up to the default; for ``recovered``, the smallest
  matching size above it; sizes below the default are not searched when the default does not match:
  a smaller model matching while the default does not is noise, not recovery).
* **Gap closed per doubling.** For each seed with at least two sizes of finite accuracy, the least-
  squares slope ``b_s`` of ``acc_s(size) - ref`` against ``log2(size)``; reported as ``mean_ci`` of the
  ``b_s``. Subtracting the constant ``ref`` leaves the slope unchanged: it is the accuracy gained per
  doubling of the size. ``log2`` needs no power-of-two sizes (n_layers 2, 3, 4 sit at 1, 1.58, 2: the
  slope is still per doubling). The baseline's own slope is given alongside for reference.
* **Capacity effect** (``capacity_effects``): for an arm, per seed, ``acc(largest size) - acc(default
  size)`` (paired: same seed), then ``mean_ci`` over seeds. For the pooled claim "more <axis> recovers
  accuracy lost to constraints", per seed the mean of these gains over the constrained arms that cost
  accuracy at the default size and were grown (outcome neither ``no cost`` nor ``not grown``), then
  ``mean_ci`` over seeds. Verdict:
  ``stats.verdict(low, high, expected_sign=+1, margin)``; when no constrained arm cost accuracy at the
  default size the verdict is ``inconclusive`` with the reason "nothing to recover".

Runs that diverged or failed have NaN accuracy: they are left out of every mean and slope (a seed's
slope uses its remaining sizes) and counted (``n_failed``). One seed gives means with NaN intervals
(and hence inconclusive verdicts); constraints absent from the grid simply have no rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..arms import label
from ..stats import mean_ci, verdict

BASELINE = "baseline"
AXIS_LABELS = {
    "model.d_ff": "FFN width (d_ff)",
    "model.d_model": "model width (d_model)",
    "model.n_layers": "depth (n_layers)",
    "model.n_heads": "heads (n_heads)",
}
NOT_REACHED = "not reached"
NOT_GROWN = "not grown"
# The arm, or the baseline it is compared with, has no finished run at the default size (all diverged or
# failed): neither a cost nor a recovery can be told, so it is not counted as "not reached".
NO_FINISHED = "no finished run"
OUTCOMES = ("no cost", "recovered", "not reached", "not grown", NO_FINISHED)
REQUIRED = ("axis", "size", "default_size", "constraint", "seed")


def axis_label(axis: str) -> str:
    """``model.d_ff`` -> ``FFN width (d_ff)``; unknown axes keep their field name."""
    return AXIS_LABELS.get(axis, axis.split(".", 1)[-1])


def _none_finished(cap: pd.DataFrame) -> bool:
    return "status" in cap and not (cap["status"] == "finished").any()


def _with_metrics(cap: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """``cap`` with NaN columns for metrics no run recorded because no run finished (a diverged run records no
    test metric per task); a metric missing from a frame with finished runs is a wrong frame, not NaN."""
    missing = [m for m in metrics if m not in cap.columns]
    if missing and _none_finished(cap):
        return cap.reindex(columns=[*cap.columns, *missing])
    return cap


def _check(cap: pd.DataFrame, metric: str) -> None:
    missing = [c for c in (*REQUIRED, metric) if c not in cap.columns]
    if missing:
        raise ValueError(f"capacity runs frame lacks columns {missing} (have: {list(cap.columns)[:12]} ...); "
                         "pass the runs frame of Study.capacity(axes)")


def _unfinished_words(cap: pd.DataFrame, axis: str | None = None) -> str:
    """"; 3 of 12 runs did not finish (diverged or failed), left out" for the axis (or the whole grid)."""
    if "status" not in cap:
        return ""
    runs = cap if axis is None else cap[cap["axis"] == axis]
    runs = runs.drop_duplicates("run_id") if "run_id" in runs else runs
    out = int((runs["status"] != "finished").sum())
    if not out:
        return ""
    kinds = ", ".join(f"{n} {s}" for s, n in runs.loc[runs["status"] != "finished", "status"].value_counts().items())
    return f"; {out} of {len(runs)} runs did not finish ({kinds}) and are left out"


def _finite(x) -> np.ndarray:
    return pd.to_numeric(pd.Series(x), errors="coerce").to_numpy(dtype=float)


def _arms(cap: pd.DataFrame) -> list[str]:
    """Constrained arms in order of appearance (the baseline excluded)."""
    return [a for a in dict.fromkeys(cap["constraint"]) if a != BASELINE]


def _axes(cap: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(cap["axis"]))


def default_runs(cap: pd.DataFrame, arm: str) -> pd.DataFrame:
    """The arm's default-size runs, pooled over axes and de-duplicated by seed (one row per seed)."""
    rows = cap[(cap["constraint"] == arm) & (cap["size"] == cap["default_size"])]
    return rows.drop_duplicates("seed").set_index("seed")


def _default_size(cap: pd.DataFrame, axis: str):
    values = cap.loc[cap["axis"] == axis, "default_size"].dropna().unique()
    if len(values) != 1:
        raise ValueError(f"axis {axis!r} has default sizes {list(values)}; expected exactly one")
    return _py(values[0])


def seed_values(cap: pd.DataFrame, arm: str, axis: str, size, metric: str) -> pd.Series:
    """metric per seed for (arm, axis, size); the default size reads the pooled default-size runs."""
    if size == _default_size(cap, axis):
        runs = default_runs(cap, arm)
    else:
        runs = cap[(cap["constraint"] == arm) & (cap["axis"] == axis) & (cap["size"] == size)].drop_duplicates("seed").set_index("seed")
    return pd.Series(_finite(runs[metric]), index=runs.index, dtype=float)


def _py(x):
    """numpy scalars as plain Python values (JSON-friendly)."""
    return x.item() if hasattr(x, "item") else x


def _n_failed(values: pd.Series) -> int:
    return int((~np.isfinite(values.to_numpy(dtype=float))).sum())


def reference(cap: pd.DataFrame, metric: str = "test_acc", margin: float = 0.01) -> dict:
    """The baseline at the default size: ``ref``, ``ref_low``, ``ref_high``, ``threshold``, ``n``.

    ``threshold = min(ref_low, ref - margin)`` (``ref - margin`` alone when the interval is undefined);
    NaN when no baseline run at the default size finished.
    """
    _check(cap, metric)
    values = _finite(default_runs(cap, BASELINE)[metric])
    m, lo, hi = mean_ci(values)
    threshold = min(lo, m - margin) if math.isfinite(lo) else m - margin
    return {"ref": m, "ref_low": lo, "ref_high": hi, "threshold": threshold, "n": int(np.isfinite(values).sum())}


def matches(mean: float, threshold: float) -> bool:
    """Does an arm's mean accuracy match the reference? (``mean >= threshold``; False when either is NaN)."""
    return bool(math.isfinite(mean) and math.isfinite(threshold) and mean >= threshold)


def slope_per_doubling(acc_by_size: pd.DataFrame) -> tuple[float, float, float, int]:
    """Least-squares slope of accuracy on log2(size), fitted per seed, then ``mean_ci`` over seeds.

    ``acc_by_size``: index = seed, columns = sizes, values = accuracy (NaN for diverged runs, which are
    dropped from that seed's fit). A seed needs two sizes of finite accuracy. Returns
    ``(mean, low, high, n_seeds_fitted)``.
    """
    slopes = []
    for _, row in acc_by_size.iterrows():
        x = np.log2(np.asarray(row.index, dtype=float))
        y = row.to_numpy(dtype=float)
        keep = np.isfinite(y)
        if keep.sum() < 2 or np.ptp(x[keep]) == 0:
            continue
        slopes.append(float(np.polyfit(x[keep], y[keep], 1)[0]))
    return (*mean_ci(slopes), len(slopes))


def arm_curves(cap: pd.DataFrame, metric: str = "test_acc") -> pd.DataFrame:
    """Per axis, arm and size: ``params``, ``mean``, ``ci_low``, ``ci_high``, ``n`` (finite) and ``n_failed``."""
    _check(cap, metric)
    rows = []
    for axis in _axes(cap):
        sub = cap[cap["axis"] == axis]
        for arm in [BASELINE, *_arms(cap)]:
            for size in sorted(map(_py, sub["size"].unique())):
                v = seed_values(cap, arm, axis, size, metric)
                if v.empty:
                    continue
                m, lo, hi = mean_ci(v)
                params = sub.loc[sub["size"] == size, "params"] if "params" in sub else pd.Series(dtype=float)
                rows.append({"axis": axis, "constraint": arm, "size": size,
                             "params": float(np.nanmedian(_finite(params))) if len(params) else math.nan,
                             "mean": m, "ci_low": lo, "ci_high": hi, "n": int(np.isfinite(v).sum()),
                             "n_failed": _n_failed(v)})
    return pd.DataFrame(rows)


def _grown(cap: pd.DataFrame, arm: str, axis: str) -> bool:
    """Whether the grid trained ``arm`` at any size of ``axis`` other than the default (finished or not)."""
    on = cap[(cap["axis"] == axis) & (cap["constraint"] == arm)]
    return bool((on["size"].map(_py) != _py(_default_size(cap, axis))).any())


def _recovery_rows(cap: pd.DataFrame, metric: str, margin: float) -> list[dict]:
    ref = reference(cap, metric, margin)
    rows = []
    for axis in _axes(cap):
        d = _default_size(cap, axis)
        sizes = sorted({*map(_py, cap.loc[cap["axis"] == axis, "size"].tolist()), d})
        largest = max(sizes)
        params = cap[cap["axis"] == axis].groupby("size")["params"].median() if "params" in cap else pd.Series(dtype=float)
        tables = {arm: pd.DataFrame({s: seed_values(cap, arm, axis, s, metric) for s in sizes})
                  for arm in [BASELINE, *_arms(cap)]}
        base_slope = slope_per_doubling(tables[BASELINE])[0] if len(tables[BASELINE]) else math.nan
        for arm in _arms(cap):
            table = tables[arm]
            if table.empty:
                continue
            weights = cap.loc[cap["constraint"] == arm, "weight"] if "weight" in cap else pd.Series([math.nan])
            means = {s: mean_ci(table[s])[0] for s in sizes}
            ok = {s: matches(means[s], ref["threshold"]) for s in sizes}
            if not (math.isfinite(means[d]) and math.isfinite(ref["threshold"])):
                outcome, at = NO_FINISHED, NO_FINISHED
            elif ok[d]:
                outcome, at = "no cost", min(s for s in sizes if s <= d and ok[s])
            elif not _grown(cap, arm, axis):
                outcome, at = NOT_GROWN, NOT_GROWN
            elif any(ok[s] for s in sizes if s > d):
                outcome, at = "recovered", min(s for s in sizes if s > d and ok[s])
            else:
                outcome, at = NOT_REACHED, NOT_REACHED
            m_d, lo_d, hi_d = mean_ci(table[d])
            m_l, lo_l, hi_l = mean_ci(table[largest])
            slope, s_lo, s_hi, n_fit = slope_per_doubling(table)
            rows.append({
                "constraint": arm, "weight": float(weights.iloc[0]) if len(weights) else math.nan,
                "axis": axis, "default_size": d, "largest_size": largest,
                "ref": ref["ref"], "ref_low": ref["ref_low"], "ref_high": ref["ref_high"], "threshold": ref["threshold"],
                "acc_default": m_d, "acc_default_low": lo_d, "acc_default_high": hi_d,
                "acc_largest": m_l, "acc_largest_low": lo_l, "acc_largest_high": hi_l,
                "gap_default": m_d - ref["ref"], "gap_largest": m_l - ref["ref"],
                "outcome": outcome, "recovered_at": at,
                "recovered_params": float(params.get(at, math.nan)) if at not in (NOT_REACHED, NOT_GROWN, NO_FINISHED) and len(params) else math.nan,
                "slope": slope, "slope_low": s_lo, "slope_high": s_hi, "baseline_slope": base_slope,
                "n_seeds": int(table.notna().any(axis=1).sum()), "n_failed": int(table.isna().to_numpy().sum()),
            })
    return rows


def recovery_table(cap: pd.DataFrame, tasks: Sequence[str] | None = None, metric: str = "test_acc",
                   margin: float = 0.01) -> pd.DataFrame:
    """One row per (constraint, axis) — and per task when ``tasks`` is given — with the recovery.

    Columns: ``task`` ("all" for ``metric``, else the task of ``<metric>/<task>``), ``constraint``,
    ``weight``, ``axis``, ``default_size``, ``largest_size``; the reference ``ref`` [``ref_low``,
    ``ref_high``] and the match ``threshold`` (module docstring); ``acc_default`` and ``acc_largest``
    with their intervals; ``gap_default`` / ``gap_largest`` (arm mean minus ``ref``); ``outcome``
    (``no cost`` / ``recovered`` / ``not reached``); ``recovered_at`` (a size, or "not reached") and
    ``recovered_params`` (parameter count there); the gap closed per doubling ``slope`` [``slope_low``,
    ``slope_high``] and the baseline's own ``baseline_slope``; ``n_seeds`` and ``n_failed`` (runs of the
    arm on that axis with NaN accuracy: diverged or failed).
    """
    _check(cap, metric)
    metrics = [("all", metric)] + [(t, f"{metric}/{t}") for t in (tasks or [])]
    cap = _with_metrics(cap, [m for _, m in metrics])
    missing = [m for _, m in metrics if m not in cap.columns]
    if missing:
        raise ValueError(f"capacity runs frame lacks metric columns {missing}")
    rows = [{"task": task, **r} for task, m in metrics for r in _recovery_rows(cap, m, margin)]
    columns = ["task", "constraint", "weight", "axis", "default_size", "largest_size", "ref", "ref_low", "ref_high",
               "threshold", "acc_default", "acc_default_low", "acc_default_high", "acc_largest", "acc_largest_low",
               "acc_largest_high", "gap_default", "gap_largest", "outcome", "recovered_at", "recovered_params",
               "slope", "slope_low", "slope_high", "baseline_slope", "n_seeds", "n_failed"]
    return pd.DataFrame(rows, columns=columns)


def per_task_recovery(cap: pd.DataFrame, tasks: Sequence[str], metric: str = "test_acc", margin: float = 0.01) -> pd.DataFrame:
    """Per task, constraint and axis: accuracy at the default and the largest size (with intervals) against
    the task's own baseline at the default size, and whether it recovers (same rule as ``recovery_table``;
    column ``recovers`` is True for ``recovered``, False for ``not reached``, and NaN for ``no cost``)."""
    table = recovery_table(cap, tasks, metric, margin)
    table = table[table["task"] != "all"].reset_index(drop=True)
    table["recovers"] = table["outcome"].map({"recovered": True, NOT_REACHED: False, "no cost": np.nan, NOT_GROWN: np.nan,
                                              NO_FINISHED: np.nan})
    return table


def _gains(cap: pd.DataFrame, arm: str, axis: str, largest, metric: str) -> pd.Series:
    """Per seed: acc(arm, largest size) - acc(arm, default size); NaN where either run has no accuracy."""
    d = _default_size(cap, axis)
    hi, lo = seed_values(cap, arm, axis, largest, metric), seed_values(cap, arm, axis, d, metric)
    return hi.sub(lo)  # aligned on seed; a seed missing on either side gives NaN


def _ci_words(n: int) -> str:
    if n == 0:
        return "mean and 95% t-interval over seeds (no finished pair of runs here)"
    return "one seed: no interval" if n == 1 else f"mean and 95% t-interval over {n} seeds"


def capacity_effects(cap: pd.DataFrame, metric: str = "test_acc", margin: float = 0.01,
                     match_margin: float | None = None) -> pd.DataFrame:
    """Verdicts for "more <axis> recovers accuracy lost to constraints": per axis, one pooled row
    (``constraint`` = "all constraints") and one row per constraint (formulas in the module docstring).

    Every row has the findings keys ``claim``, ``verdict``, ``effect``, ``ci_low``, ``ci_high``,
    ``measure``, ``detail``, plus ``axis``, ``constraint``, ``default_size``, ``largest_size``,
    ``n_seeds``, ``n_failed``, ``baseline_effect`` [``baseline_low``, ``baseline_high``] (the baseline's
    own gain over the same sizes), ``cost_default`` (arm mean minus the baseline at the default size,
    mean over the pooled arms for the pooled row) and ``outcome``/``arms`` (which arms were pooled).
    ``margin`` is the verdict's equivalence margin; ``match_margin`` (default ``margin``) the match rule's.
    """
    cap = _with_metrics(cap, [metric])
    _check(cap, metric)
    match_margin = margin if match_margin is None else match_margin
    ref = reference(cap, metric, match_margin)
    word = metric.replace("test_acc/", "").replace("test_acc", "test accuracy")
    rows = []
    for axis in _axes(cap):
        d = _default_size(cap, axis)
        sizes = sorted({*map(_py, cap.loc[cap["axis"] == axis, "size"].tolist()), d})
        largest = max(sizes)
        name, short = axis_label(axis), axis.split(".", 1)[-1]
        base_gain = _gains(cap, BASELINE, axis, largest, metric) if largest != d else pd.Series(dtype=float)
        b, b_lo, b_hi = mean_ci(base_gain)
        common = {"axis": axis, "default_size": d, "largest_size": largest,
                  "baseline_effect": b, "baseline_low": b_lo, "baseline_high": b_hi}
        base_words = f"the baseline itself changes by {b:+.3f} over the same sizes" if math.isfinite(b) else \
            "the baseline's change over the same sizes is unknown"
        per_arm, gains = [], {}
        for arm in _arms(cap):
            m_d = mean_ci(seed_values(cap, arm, axis, d, metric))[0]
            cost = m_d - ref["ref"]
            no_cost = matches(m_d, ref["threshold"])
            g = _gains(cap, arm, axis, largest, metric) if largest != d else pd.Series(dtype=float)
            e, lo, hi = mean_ci(g)
            n, n_failed = int(np.isfinite(g.to_numpy(dtype=float)).sum()), _n_failed(g)
            claim = f"More {name} recovers accuracy lost to {label(arm)}"
            measure = (f"{word} of {label(arm)} at {short}={largest} minus at the default {short}={d}, "
                       f"paired by seed; {_ci_words(n)}")
            if largest == d:
                v, why = "inconclusive", f"no {short} above the default {d} in the grid"
            elif not math.isfinite(m_d):
                v, why = "inconclusive", "no finished run at the default size"
            elif not math.isfinite(ref["ref"]):
                v, why = "inconclusive", "no finished baseline run at the default size: its cost is unknown"
            elif no_cost:
                v, why = "inconclusive", (f"nothing to recover: at the default size it already matches the baseline "
                                          f"({m_d:.3f} vs {ref['ref']:.3f})")
            elif not _grown(cap, arm, axis):
                v, why = "inconclusive", (f"not grown in this grid (capacity_arms): it costs {cost:+.3f} at the default "
                                          f"size, but only other constraints were trained at other sizes")
            else:
                v, why = verdict(lo, hi, +1, margin), f"costs {cost:+.3f} at the default size"
                gains[arm] = g
            detail = (f"{why}; {base_words}" + (f"; {n_failed} seed(s) without a finished pair of runs" if n_failed else "")
                      + _unfinished_words(cap[cap["constraint"].isin([arm, BASELINE])], axis))
            per_arm.append({"claim": claim, "verdict": v, "effect": e, "ci_low": lo, "ci_high": hi, "measure": measure,
                            "detail": detail, **common, "constraint": arm, "n_seeds": n, "n_failed": n_failed,
                            "cost_default": cost, "outcome": "no cost" if no_cost else "cost" if arm in gains else
                            NO_FINISHED if not (math.isfinite(m_d) and math.isfinite(ref["ref"])) else NOT_GROWN,
                            "arms": arm})
        # pooled over the arms that cost accuracy at the default size
        claim = f"More {name} recovers accuracy lost to constraints"
        if gains:
            per_seed = pd.DataFrame(gains)
            pooled = per_seed.mean(axis=1, skipna=True)  # per seed, mean over the costly arms it has
            e, lo, hi = mean_ci(pooled)
            n = int(np.isfinite(pooled.to_numpy(dtype=float)).sum())
            n_failed = int(per_seed.isna().to_numpy().sum())
            names = ", ".join(label(a) for a in gains)
            v = verdict(lo, hi, +1, margin)
            cost = float(np.mean([r["cost_default"] for r in per_arm if r["constraint"] in gains]))
            skipped = [label(r["constraint"]) for r in per_arm if r["outcome"] == "no cost"]
            ungrown = [label(r["constraint"]) for r in per_arm if r["outcome"] == NOT_GROWN]
            unknown = [label(r["constraint"]) for r in per_arm if r["outcome"] == NO_FINISHED]
            detail = (f"pooled over {len(gains)} constraint(s) that cost accuracy at the default size ({names}; mean cost "
                      f"{cost:+.3f})" + (f"; left out, nothing to recover: {', '.join(skipped)}" if skipped else "")
                      + (f"; left out, costly but not grown in this grid: {', '.join(ungrown)}" if ungrown else "")
                      + (f"; left out, no finished run to tell their cost: {', '.join(unknown)}" if unknown else "")
                      + f"; {base_words}" + (f"; {n_failed} constraint-seed pair(s) without finished runs" if n_failed else "")
                      + _unfinished_words(cap, axis))
        else:
            e = lo = hi = cost = math.nan
            n = n_failed = 0
            names = ""
            v = "inconclusive"
            if not _arms(cap):
                detail = "no constrained arms in the grid"
            elif largest == d:
                detail = f"no {short} above the default {d} in the grid"
            elif not math.isfinite(ref["ref"]):
                detail = "no finished baseline run at the default size: no constraint's cost can be told"
            elif any(r["outcome"] == NO_FINISHED for r in per_arm) and not any(r["outcome"] == NOT_GROWN for r in per_arm):
                detail = "no constraint that costs accuracy at the default size could be told: " + ", ".join(
                    label(r["constraint"]) for r in per_arm if r["outcome"] == NO_FINISHED) + " have no finished run there"
            elif any(r["outcome"] == NOT_GROWN for r in per_arm):
                detail = "no constraint that costs accuracy at the default size was grown in this grid (capacity_arms)"
            else:
                detail = "nothing to recover: no constraint costs accuracy at the default size"
            detail += f"; {base_words}" + _unfinished_words(cap, axis)
        measure = (f"{word} at {short}={largest} minus at the default {short}={d}, paired by seed and averaged over "
                   f"the constraints that cost accuracy at the default size; {_ci_words(n)}")
        rows.append({"claim": claim, "verdict": v, "effect": e, "ci_low": lo, "ci_high": hi, "measure": measure,
                     "detail": detail, **common, "constraint": "all constraints", "n_seeds": n, "n_failed": n_failed,
                     "cost_default": cost, "outcome": "cost" if gains else "no cost", "arms": names})
        rows += per_arm
    return pd.DataFrame(rows)


def verdict_rows(effects: pd.DataFrame, pooled_only: bool = True) -> list[dict]:
    """Rows of ``capacity_effects`` as plain dicts for ``Recorder``/08_findings: the keys ``claim``,
    ``verdict``, ``effect``, ``ci_low``, ``ci_high``, ``measure``, ``detail`` (plus ``axis`` and
    ``constraint``); only the pooled per-axis claims unless ``pooled_only`` is False."""
    keys = ["claim", "verdict", "effect", "ci_low", "ci_high", "measure", "detail", "axis", "constraint"]
    rows = effects[effects["constraint"] == "all constraints"] if pooled_only else effects
    out = []
    for r in rows[keys].to_dict("records"):
        out.append({k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()})
    return out


# ------------------------------------------------------------------------------------- display helpers


def _recovered_words(r: dict) -> str:
    at = r["recovered_at"]
    p = r.get("recovered_params")
    params = f"{p / 1e3:.3g}k params" if isinstance(p, float) and math.isfinite(p) else ""
    if r["outcome"] == "no cost":
        return f"no cost (matches from {at}" + (f", {params})" if params else ")")
    if r["outcome"] == NOT_GROWN:
        return "not grown (costly; capacity_arms)"
    if r["outcome"] == NO_FINISHED:
        return "no finished run (diverged or failed)"
    return (f"{at} ({params})" if params else f"{at}") if r["outcome"] == "recovered" else NOT_REACHED


def format_recovery(table: pd.DataFrame) -> pd.DataFrame:
    """``recovery_table`` rows as readable strings (mean [95% interval]), indexed by task, constraint, axis."""
    from ..stats import fmt

    rows = []
    for r in table.to_dict("records"):
        rows.append({
            "task": r["task"], "constraint": label(r["constraint"]), "axis": r["axis"].split(".", 1)[-1],
            "weight": f"{r['weight']:g}",
            "at default size": f"{r['default_size']}: " + fmt(r["acc_default"], r["acc_default_low"], r["acc_default_high"]),
            "at largest size": f"{r['largest_size']}: " + fmt(r["acc_largest"], r["acc_largest_low"], r["acc_largest_high"]),
            "matches baseline at": _recovered_words(r),
            "gap closed per doubling": fmt(r["slope"], r["slope_low"], r["slope_high"]),
            "baseline per doubling": fmt(r["baseline_slope"], math.nan, math.nan),
            "diverged or failed runs": r["n_failed"],
        })
    return pd.DataFrame(rows).set_index(["task", "constraint", "axis"])


def format_effects(effects: pd.DataFrame) -> pd.DataFrame:
    """``capacity_effects`` rows as readable strings, indexed by claim."""
    from ..stats import fmt

    return pd.DataFrame({
        "claim": effects["claim"],
        "verdict": effects["verdict"],
        "gain [95% CI]": [fmt(r.effect, r.ci_low, r.ci_high) for r in effects.itertuples()],
        "baseline's own gain": [fmt(r.baseline_effect, r.baseline_low, r.baseline_high) for r in effects.itertuples()],
        "detail": effects["detail"],
    }).set_index("claim")


def outcome_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Per task: how many (constraint, axis) cells had each of :data:`OUTCOMES` (``cells``: all of them), and
    which cells are ``recovered`` / ``not reached`` (``"constraint/axis"`` lists)."""
    rows = []
    for task, g in table.groupby("task", sort=False):
        cell = [f"{label(r.constraint)} / {r.axis.split('.', 1)[-1]}" for r in g.itertuples()]
        row = {"task": task, **{o: int((g["outcome"] == o).sum()) for o in OUTCOMES}}
        row["recovered in"] = [c for c, o in zip(cell, g["outcome"]) if o == "recovered"]
        row["not reached in"] = [c for c, o in zip(cell, g["outcome"]) if o == NOT_REACHED]
        row["cells"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows, columns=["task", *OUTCOMES, "recovered in", "not reached in", "cells"]).set_index("task")
