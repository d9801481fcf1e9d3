"""Verdicts follow the data: planted effects are found, absent ones are not, untestable claims say so."""

import math

import numpy as np
import pandas as pd
import pytest

from disentangle.verdicts import findings

TASKS = ["where_person", "coreference"]


def sweep_runs(constraint: str, drops: dict[str, float], noise: float = 0.005, seeds=(0, 1, 2)) -> pd.DataFrame:
    """Baseline accuracy 0.9 on every task; at weight 1.0 each task drops by ``drops[task]`` (+ small noise)."""
    rng = np.random.default_rng(0)
    rows = []
    for w in (0.0, 1.0):
        for s in seeds:
            per_task = {t: 0.9 - (drops[t] if w else 0.0) + rng.normal(0, noise) for t in TASKS}
            rows.append({"sweep": constraint, "weight": w, "seed": s, "test_acc": float(np.mean(list(per_task.values()))),
                         **{f"test_acc/{t}": v for t, v in per_task.items()}})
    return pd.DataFrame(rows)


def chosen(*constraints: str) -> pd.DataFrame:
    return pd.DataFrame({"constraint": list(constraints), "weight": [1.0] * len(constraints)})


def test_a_planted_cost_is_supported_and_no_cost_is_not():
    sweeps = pd.concat([sweep_runs("orthogonality", {"where_person": 0.2, "coreference": 0.2}),
                        sweep_runs("head_usage", {"where_person": 0.0, "coreference": 0.0}, noise=0.001)])
    rows = {r["claim"]: r for r in findings.degrade(sweeps, chosen("orthogonality", "head_usage"))}
    orth, usage = rows["orthogonality degrades accuracy"], rows["head usage degrades accuracy"]
    assert orth["verdict"] == "supported" and orth["effect"] == pytest.approx(-0.2, abs=0.02)
    assert orth["ci_low"] < orth["effect"] < orth["ci_high"]
    assert usage["verdict"] == "not supported"  # inside the equivalence margin


def test_noise_makes_it_inconclusive():
    sweeps = sweep_runs("orthogonality", {"where_person": 0.02, "coreference": 0.02}, noise=0.05)
    (r,) = findings.degrade(sweeps, chosen("orthogonality"))
    assert r["verdict"] == "inconclusive"


def test_where_it_hurts_follows_the_task_gap():
    hurts_coref = sweep_runs("orthogonality", {"where_person": 0.0, "coreference": 0.15})
    hurts_lookup = sweep_runs("mutual_information", {"where_person": 0.15, "coreference": 0.0})
    rows = findings.where_it_hurts(pd.concat([hurts_coref, hurts_lookup]), chosen("orthogonality", "mutual_information"),
                                   TASKS, rare_task=None)
    by = {r["claim"].split(" hurts")[0]: r for r in rows}
    assert by["orthogonality"]["verdict"] == "supported" and by["orthogonality"]["effect"] == pytest.approx(-0.15, abs=0.02)
    assert by["mutual information"]["verdict"] == "not supported"
    # attention entropy names counting/majority, which this profile does not train; head usage had no target
    assert by["attention entropy"]["verdict"] == "inconclusive" and "not testable" in by["attention entropy"]["detail"]
    assert "not testable" in by["head usage"]["detail"]


def test_rare_head_task_is_computed_from_usage_and_importance():
    usage = pd.DataFrame({"model": "m", "constraint": "baseline", "task": "all", "layer": 1, "head": [0, 1, 2, 3],
                          "usage_share": [0.6, 0.3, 0.05, 0.05]})
    importance = pd.DataFrame({"model": "m", "constraint": "baseline", "layer": 1,
                               "head": [0, 1, 2, 3] * 2, "task": ["where_person"] * 4 + ["coreference"] * 4,
                               "importance": [0.3, 0.1, 0.0, 0.01, 0.3, 0.1, 0.2, 0.0]})
    assert findings.rare_head_task(importance, usage) == "coreference"  # head 2 is rare and coreference needs it


def rare_frames(coref_need):
    """Three baseline models, 4 heads, heads 2-3 rare; model i's coreference leans on rare head 2 by
    coref_need[i], where_person on it by 0.1."""
    usage, importance = [], []
    for i, need in enumerate(coref_need):
        usage += [{"model": f"m{i}", "constraint": "baseline", "task": "all", "layer": 1, "head": h, "usage_share": u}
                  for h, u in enumerate([0.6, 0.3, 0.05, 0.05])]
        for task, on_rare in (("where_person", 0.1), ("coreference", need)):
            importance += [{"model": f"m{i}", "constraint": "baseline", "layer": 1, "head": h, "task": task, "importance": v}
                           for h, v in enumerate([0.3, 0.1, on_rare, 0.0])]
    return pd.DataFrame(importance), pd.DataFrame(usage)


def test_the_rare_head_task_carries_its_margin_and_an_undecided_choice_is_carried_into_the_verdict():
    decided = findings.rare_head_choice(*rare_frames([0.3, 0.35, 0.4]))
    assert decided["task"] == "coreference" and decided["runner_up"] == "where_person" and decided["decided"]
    assert decided["margin"] == pytest.approx(0.25) and decided["n"] == 3 and decided["ci_low"] > 0
    undecided = findings.rare_head_choice(*rare_frames([0.5, 0.0, 0.2]))  # mean 0.233 > 0.1, but one model disagrees
    assert undecided["task"] == "coreference" and not undecided["decided"] and undecided["ci_low"] < 0
    hurts_coref = sweep_runs("head_usage", {"where_person": 0.0, "coreference": 0.15})
    rows = {True: None, False: None}
    for is_decided, choice in ((True, decided), (False, undecided)):
        rows[is_decided] = [r for r in findings.where_it_hurts(hurts_coref, chosen("head_usage"), TASKS, choice)
                            if r["claim"].startswith("head usage")][0]
    assert rows[True]["verdict"] == "supported" and "margin of +0.250" in rows[True]["detail"]
    # undecided: for the runner-up the same data says "not supported", so the claim's verdict cannot stand
    assert rows[False]["verdict"] == "inconclusive" and "depends on an undecided choice" in rows[False]["detail"]
    assert rows[False]["effect"] == rows[True]["effect"]  # the effect is still shown, for the task chosen


def test_sparse_not_correct_reads_the_spearman_row_and_the_paired_model_change():
    spearman = pd.DataFrame([{"sparsity": "1 - entropy_cls", "correctness": "support_excess_cls", "constraint": "all",
                              "rho": -0.3, "ci_low": -0.5, "ci_high": -0.05, "n": 40}])
    metrics = []
    for arm, entropy, excess in [("baseline", 0.8, 0.30), ("attention_entropy", 0.3, 0.25)]:
        for s in range(3):
            metrics.append({"model": f"{arm}{s}", "constraint": arm, "seed": s, "task": "all", "layer": 1, "head": 0,
                            "entropy": entropy + 0.01 * s, "support_excess_cls": excess + 0.01 * s, "topk_precision": 0.4})
    rows = findings.sparse_not_correct(pd.DataFrame(metrics), spearman)
    assert rows[0]["verdict"] == "supported" and rows[0]["effect"] == -0.3
    assert rows[1]["verdict"] == "supported" and rows[1]["effect"] == pytest.approx(-0.05)
    # if the constrained heads became more correct, the same code says so
    flipped = pd.DataFrame(metrics).assign(support_excess_cls=lambda d: np.where(d.constraint == "baseline", 0.1, 0.5))
    assert findings.sparse_not_correct(flipped, spearman)[1]["verdict"] == "not supported"
    # and a positive correlation over heads refutes (a)
    positive = spearman.assign(rho=0.5, ci_low=0.3, ci_high=0.7)
    assert findings.sparse_not_correct(pd.DataFrame(metrics), positive)[0]["verdict"] == "not supported"
    # a missing correlation is reported, not silently dropped
    assert "not testable" in findings.sparse_not_correct(pd.DataFrame(metrics), spearman.iloc[0:0])[0]["detail"]


def test_table_has_the_columns_the_index_reads():
    t = findings.table([findings.untestable("g", "c", "why")])
    assert list(t.columns) == ["group", "claim", "verdict", "effect", "ci_low", "ci_high", "measure", "detail"]
    assert math.isnan(t.loc[0, "effect"])


def test_effects_are_shown_signed_with_their_interval():
    from disentangle.verdicts.findings import effect_text, shown

    assert effect_text(0.0684, -0.5996, 0.7346) == "+0.068 [-0.600, +0.735]"
    assert effect_text(-0.09, float("nan"), 1.0) == "-0.090"  # one seed: no interval
    assert effect_text(None, None, None) == "n/a" == effect_text(float("nan"), 0.0, 1.0)
    row = {"group": "g", "claim": "c", "verdict": "inconclusive", "effect": 0.5, "ci_low": 0.25, "ci_high": 0.75,
           "measure": "m", "detail": ""}
    assert shown([row]).to_dict("records") == [{"group": "g", "claim": "c", "verdict": "inconclusive",
                                                "effect": "+0.500 [+0.250, +0.750]", "measure": "m", "detail": ""}]
