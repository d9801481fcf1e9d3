"""Capacity-scaling arithmetic on synthetic run frames with known answers (no training)."""

import math

import numpy as np
import pandas as pd
import pytest

from disentangle.verdicts.capacity import (
    arm_curves,
    capacity_effects,
    outcome_counts,
    per_task_recovery,
    recovery_table,
    reference,
    slope_per_doubling,
    verdict_rows,
)

AXES = {"model.d_ff": ([64, 128, 256], 128), "model.n_layers": ([2, 3, 4], 2)}
# Mean accuracy per arm and axis at each size (noise-free here; seeds add +/- 0.002 around it).
BASE = 0.90
CURVES = {
    "baseline": {"model.d_ff": [0.89, 0.90, 0.91], "model.n_layers": [0.90, 0.91, 0.92]},
    # costs 0.10 at the default and recovers at the largest size
    "orthogonality": {"model.d_ff": [0.75, 0.80, 0.90], "model.n_layers": [0.80, 0.85, 0.91]},
    # costs 0.20 and never recovers (it gets slightly worse)
    "head_usage": {"model.d_ff": [0.71, 0.70, 0.69], "model.n_layers": [0.70, 0.70, 0.70]},
    # costs nothing at the default size
    "attention_entropy": {"model.d_ff": [0.90, 0.90, 0.90], "model.n_layers": [0.90, 0.90, 0.90]},
}
NOISE = {0: -0.002, 1: 0.0, 2: 0.002}


def frame(seeds=(0, 1, 2), arms=tuple(CURVES), tasks=("t1", "t2")) -> pd.DataFrame:
    """Rows as Study.capacity returns them: default-size runs appear once per axis (same runs)."""
    rows = []
    for axis, (sizes, default) in AXES.items():
        for i, size in enumerate(sizes):
            for arm in arms:
                acc = CURVES[arm][axis][i] if size != default else CURVES[arm]["model.d_ff"][1]
                for s in seeds:
                    a = acc + NOISE[s]
                    # t1 follows the arm; t2 is unaffected by the constraint (it always matches the baseline)
                    rows.append({"axis": axis, "size": size, "default_size": default, "constraint": arm,
                                 "weight": 0.0 if arm == "baseline" else 0.3, "seed": s, "status": "finished",
                                 "params": 1000 * size, "test_acc": a,
                                 **({"test_acc/t1": a, "test_acc/t2": BASE + NOISE[s]} if tasks else {})})
    return pd.DataFrame(rows)


def row(table, constraint, axis, task=None):
    sel = (table["constraint"] == constraint) & (table["axis"] == axis)
    if task is not None:
        sel &= table["task"] == task
    (r,) = table[sel].to_dict("records")
    return r


def test_reference_pools_default_runs_and_threshold():
    ref = reference(frame())
    assert ref["ref"] == pytest.approx(BASE)
    assert ref["n"] == 3  # default-size runs de-duplicated over the two axes
    assert ref["threshold"] == pytest.approx(min(ref["ref_low"], BASE - 0.01))


def test_recovery_table_known_answers():
    table = recovery_table(frame())
    orth = row(table, "orthogonality", "model.d_ff")
    assert orth["outcome"] == "recovered" and orth["recovered_at"] == 256
    assert orth["recovered_params"] == 256_000
    assert orth["gap_default"] == pytest.approx(-0.10)
    # acc = 0.75, 0.80, 0.90 at log2 = 6, 7, 8: least-squares slope 0.075 per doubling, identical for every seed
    assert orth["slope"] == pytest.approx(0.075)
    assert row(table, "orthogonality", "model.n_layers")["recovered_at"] == 4
    hu = row(table, "head_usage", "model.d_ff")
    assert hu["outcome"] == "not reached" and hu["recovered_at"] == "not reached"
    assert math.isnan(hu["recovered_params"]) and hu["slope"] < 0
    ae = row(table, "attention_entropy", "model.d_ff")
    assert ae["outcome"] == "no cost" and ae["recovered_at"] == 64  # matches even at the smallest size
    assert set(table["constraint"]) == {"orthogonality", "head_usage", "attention_entropy"}
    assert (table["n_failed"] == 0).all() and (table["n_seeds"] == 3).all()


def test_slope_uses_log2_of_non_power_of_two_sizes():
    acc = pd.DataFrame({2: [0.5], 3: [0.5 + 0.1 * math.log2(1.5)], 4: [0.6]}, index=[0])
    m, lo, hi, n = slope_per_doubling(acc)
    assert m == pytest.approx(0.1) and n == 1 and math.isnan(lo)


def test_effects_supported_not_supported_and_nothing_to_recover():
    eff = capacity_effects(frame())
    pooled = row(eff, "all constraints", "model.d_ff")
    # per seed: mean of the gains of the two costly arms: (0.90-0.80 + 0.69-0.70)/2 = 0.045
    assert pooled["effect"] == pytest.approx(0.045)
    assert "head usage" in pooled["arms"] and "attention entropy" not in pooled["arms"]
    assert "nothing to recover: attention entropy" in pooled["detail"]
    orth = row(eff, "orthogonality", "model.d_ff")
    assert orth["effect"] == pytest.approx(0.10) and orth["verdict"] == "supported"
    assert orth["baseline_effect"] == pytest.approx(0.01)
    assert row(eff, "head_usage", "model.d_ff")["verdict"] == "not supported"
    ae = row(eff, "attention_entropy", "model.d_ff")
    assert ae["verdict"] == "inconclusive" and "nothing to recover" in ae["detail"]
    for r in verdict_rows(eff, pooled_only=False):
        assert {"claim", "verdict", "effect", "ci_low", "ci_high", "measure", "detail"} <= set(r)
        assert r["verdict"] in ("supported", "not supported", "inconclusive")
    assert len(verdict_rows(eff)) == len(AXES)


def test_nothing_to_recover_when_no_constraint_costs():
    eff = capacity_effects(frame(arms=("baseline", "attention_entropy")))
    pooled = row(eff, "all constraints", "model.d_ff")
    assert pooled["verdict"] == "inconclusive" and "nothing to recover" in pooled["detail"]
    assert math.isnan(pooled["effect"])


def test_no_constrained_arm_at_all():
    eff = capacity_effects(frame(arms=("baseline",)))
    assert list(eff["constraint"]) == ["all constraints"] * len(AXES)
    assert (eff["verdict"] == "inconclusive").all()
    assert recovery_table(frame(arms=("baseline",))).empty


def test_a_costly_arm_the_grid_did_not_grow_is_not_grown_not_unrecovered():
    cap = frame()
    # what Study.capacity(arms="costliest") gives: head usage only at the default size
    cap = cap[~((cap["constraint"] == "head_usage") & (cap["size"] != cap["default_size"]))]
    table = recovery_table(cap, ["t1", "t2"])
    hu = row(table, "head_usage", "model.d_ff", "all")
    assert hu["outcome"] == "not grown" and hu["recovered_at"] == "not grown"
    assert hu["gap_default"] < 0 and math.isnan(hu["acc_largest"]) and math.isnan(hu["slope"])
    assert row(table, "orthogonality", "model.d_ff", "all")["outcome"] == "recovered"  # the others unchanged
    assert per_task_recovery(cap, ["t1", "t2"]).query("constraint == 'head_usage'")["recovers"].isna().all()
    eff = capacity_effects(cap)
    pooled = row(eff, "all constraints", "model.d_ff")
    # only orthogonality's gain is pooled now: 0.90 - 0.80
    assert pooled["effect"] == pytest.approx(0.10) and pooled["arms"] == "orthogonality"
    assert "not grown in this grid: head usage" in pooled["detail"]
    hu_eff = row(eff, "head_usage", "model.d_ff")
    assert hu_eff["verdict"] == "inconclusive" and "not grown" in hu_eff["detail"] and hu_eff["outcome"] == "not grown"
    counts = outcome_counts(per_task_recovery(cap, ["t1", "t2"]))
    # t2 is unaffected by the constraints (no cost there), so only t1 has head usage's untested cells
    assert counts.loc["t1", "not grown"] == len(AXES) and counts.loc["t2", "not grown"] == 0


def test_diverged_runs_are_counted_not_fatal():
    cap = frame()
    bad = (cap["constraint"] == "orthogonality") & (cap["axis"] == "model.d_ff") & (cap["size"] == 256) & (cap["seed"] == 1)
    cap.loc[bad, ["test_acc", "test_acc/t1", "test_acc/t2"]] = np.nan
    cap.loc[bad, "status"] = "diverged"
    table = recovery_table(cap, ["t1", "t2"])
    orth = row(table, "orthogonality", "model.d_ff", "all")
    assert orth["n_failed"] == 1 and orth["recovered_at"] == 256  # the two other seeds still recover
    # seed 1's slope uses its two remaining sizes (0.75 -> 0.80: 0.05 per doubling); the others 0.075
    assert orth["slope"] == pytest.approx((0.075 + 0.05 + 0.075) / 3)
    eff = capacity_effects(cap)
    assert row(eff, "orthogonality", "model.d_ff")["n_seeds"] == 2
    assert row(eff, "orthogonality", "model.d_ff")["n_failed"] == 1
    curves = arm_curves(cap)
    pt = curves[(curves["constraint"] == "orthogonality") & (curves["axis"] == "model.d_ff") & (curves["size"] == 256)]
    assert pt["n"].item() == 2 and pt["n_failed"].item() == 1


def test_every_run_of_an_arm_diverged():
    cap = frame()
    cap.loc[cap["constraint"] == "head_usage", "test_acc"] = np.nan
    table = recovery_table(cap)
    hu = row(table, "head_usage", "model.d_ff")
    # no finished run: neither a cost nor a recovery can be told, so it is not "not reached" (issue 20, case 1)
    assert hu["outcome"] == "no finished run" and math.isnan(hu["slope"]) and hu["n_failed"] == 9
    assert row(capacity_effects(cap), "head_usage", "model.d_ff")["verdict"] == "inconclusive"


def test_single_seed_gives_means_without_intervals():
    cap = frame(seeds=(0,))
    table = recovery_table(cap)
    orth = row(table, "orthogonality", "model.d_ff")
    assert orth["recovered_at"] == 256 and math.isnan(orth["acc_default_low"]) and math.isnan(orth["slope_low"])
    eff = capacity_effects(cap)
    r = row(eff, "orthogonality", "model.d_ff")
    assert r["effect"] == pytest.approx(0.10) and math.isnan(r["ci_low"]) and r["verdict"] == "inconclusive"
    assert "one seed" in r["measure"]


def test_per_task_recovery():
    per = per_task_recovery(frame(), ["t1", "t2"])
    assert set(per["task"]) == {"t1", "t2"}
    assert row(per, "orthogonality", "model.d_ff", "t1")["recovers"] is True
    assert row(per, "head_usage", "model.d_ff", "t1")["recovers"] is False
    assert row(per, "head_usage", "model.d_ff", "t2")["outcome"] == "no cost"  # t2 never pays


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="default_size"):
        recovery_table(frame().drop(columns="default_size"))
    with pytest.raises(ValueError, match="test_acc/t3"):
        recovery_table(frame(), ["t3"])
