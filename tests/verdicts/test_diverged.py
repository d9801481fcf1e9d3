"""Runs that diverged, given to the verdicts (issue 20, case 1): partly diverged arms are left out of every
effect, n counts only finished runs and the detail names the runs left out; with nothing finished every
verdict is inconclusive and says why. Synthetic frames (no training), as train.run_grid writes diverged
rows: status "diverged", test_acc NaN, no per-task test metrics."""

import math

import numpy as np
import pandas as pd
import pytest

from disentangle.report import summary
from disentangle.study import excluded_text, unfinished
from disentangle.verdicts import babi as br
from disentangle.verdicts import capacity, findings

from test_babi_verdicts import TASKS as BABI_TASKS, synthetic_runs as babi_runs
from test_capacity import frame as capacity_frame
from test_findings import TASKS, chosen, sweep_runs


def diverge(runs: pd.DataFrame, where: pd.Series) -> pd.DataFrame:
    runs = runs.copy()
    runs.loc[where, "status"] = "diverged"
    runs.loc[where, [c for c in runs if c.startswith("test_acc")]] = np.nan
    return runs


def with_status(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.assign(status="finished", constraint=np.where(runs["weight"] == 0, "baseline", runs["sweep"]))


def test_a_diverged_seed_is_left_out_of_the_accuracy_cost_and_counted():
    runs = with_status(sweep_runs("orthogonality", {"where_person": 0.2, "coreference": 0.2}))
    full = findings.degrade(runs, chosen("orthogonality"))[0]
    part = findings.degrade(diverge(runs, (runs["weight"] == 1.0) & (runs["seed"] == 2)), chosen("orthogonality"))[0]
    assert "paired over 3 seeds" in full["measure"] and full["detail"] == ""
    assert "paired over 2 seeds" in part["measure"]
    assert "1 run that did not finish left out (orthogonality: 1 of 3 diverged)" in part["detail"]
    d = runs.set_index(["weight", "seed"])["test_acc"]
    assert part["effect"] == pytest.approx(np.mean([d[1.0, s] - d[0.0, s] for s in (0, 1)]))  # the two finished pairs


def test_every_run_diverged_gives_inconclusive_verdicts_that_say_so():
    runs = with_status(sweep_runs("orthogonality", {"where_person": 0.2, "coreference": 0.2}))
    runs = diverge(runs, runs["seed"] >= 0).drop(columns=[f"test_acc/{t}" for t in TASKS])  # as run_grid writes them
    (cost,) = findings.degrade(runs, chosen("orthogonality"))
    assert cost["verdict"] == "inconclusive" and math.isnan(cost["effect"])
    assert "6 runs that did not finish left out" in cost["detail"] and "no seed with both runs finished" in cost["detail"]
    where = {r["claim"]: r for r in findings.where_it_hurts(runs, chosen("orthogonality", "head_usage"), TASKS, None)}
    orth = where["orthogonality hurts coreference (two heads read one entity) most"]
    assert orth["verdict"] == "inconclusive" and "no seed with both runs finished" in orth["detail"]
    usage = where["head usage hurts the task that leans most on rarely used heads most"]
    assert "needs a finished baseline model" in usage["detail"]
    empty = pd.DataFrame()  # head_frames when no model finished
    sparse = findings.sparse_not_correct(empty, pd.DataFrame(columns=["sparsity", "correctness"]))
    assert [r["verdict"] for r in sparse] == ["inconclusive"] * 2
    assert all("no finished model" in r["detail"] for r in sparse)
    assert findings.rare_head_task(empty, empty) is None


def test_capacity_leaves_diverged_seeds_out_and_names_them():
    cap = capacity_frame().assign(run_id=lambda f: [f"{a}|{c}|{s}|{'d' if z == d else z}" for a, c, s, z, d in
                                                     zip(f["axis"], f["constraint"], f["seed"], f["size"], f["default_size"])])
    largest = (cap["constraint"] == "orthogonality") & (cap["axis"] == "model.d_ff") & (cap["size"] == 256)
    cap = diverge(cap, largest & (cap["seed"] == 0))
    effects = capacity.capacity_effects(cap)
    orth = effects[(effects["constraint"] == "orthogonality") & (effects["axis"] == "model.d_ff")].iloc[0]
    assert orth["n_seeds"] == 2 and orth["n_failed"] == 1
    assert "1 of" in orth["detail"] and "runs did not finish (1 diverged) and are left out" in orth["detail"]
    pooled = effects[(effects["constraint"] == "all constraints") & (effects["axis"] == "model.d_ff")].iloc[0]
    assert "(1 diverged) and are left out" in pooled["detail"]
    other = effects[(effects["constraint"] == "orthogonality") & (effects["axis"] == "model.n_layers")].iloc[0]
    assert "did not finish" not in other["detail"]  # only the axis whose runs diverged says so


def test_capacity_with_nothing_finished_is_no_finished_run_not_not_reached():
    cap = capacity_frame()
    cap = diverge(cap, cap["seed"] >= 0).drop(columns=["test_acc/t1", "test_acc/t2"])  # no per-task metrics at all
    table = capacity.recovery_table(cap, ["t1", "t2"])
    assert set(table["outcome"]) == {capacity.NO_FINISHED}
    counts = capacity.outcome_counts(table)
    assert (counts[capacity.NO_FINISHED] == counts["cells"]).all() and (counts["not reached"] == 0).all()
    effects = capacity.capacity_effects(cap)
    assert set(effects["verdict"]) == {"inconclusive"}
    pooled = effects[effects["constraint"] == "all constraints"]
    assert pooled["detail"].str.contains("no finished baseline run at the default size").all()
    assert not pooled["detail"].str.contains("nothing to recover").any()  # not "no constraint costs anything"
    with pytest.raises(ValueError, match="lacks metric columns"):  # a finished frame without them is a wrong frame
        capacity.recovery_table(capacity_frame(tasks=()), ["t1"])


def test_babi_costs_leave_diverged_runs_out_and_say_so():
    runs = babi_runs()
    runs = diverge(runs, (runs["constraint"] == "baseline") & (runs["seed"] == 0))
    (r,) = br.accuracy_costs(runs, BABI_TASKS).to_dict("records")
    assert r["n"] == 2 and r["effect"] == pytest.approx(-0.1)
    (found,) = br.verdict_rows(pd.DataFrame([r]), BABI_TASKS, "1k")
    assert "2 paired seeds" in found["detail"] and "1 run that did not finish left out (baseline: 1 of 3 diverged)" in found["detail"]
    errors = br.error_table(runs, BABI_TASKS)
    refs = br.reference_table(BABI_TASKS, "1k")
    assert "The baseline's mean test error" in br.error_summary(errors, runs, BABI_TASKS, refs)
    none = diverge(runs, runs["seed"] >= 0)
    text = br.error_summary(br.error_table(none, BABI_TASKS), none, BABI_TASKS, refs)
    assert text.startswith("No baseline run finished (3 diverged)") and "orthogonality (w=0.3): n/a." in text


def test_excluded_text_names_arms_and_statuses():
    runs = pd.DataFrame({"constraint": ["baseline", "baseline", "head_usage", "head_usage"], "weight": [0, 0, 0.3, 0.3],
                         "status": ["finished", "diverged", "failed", "diverged"]})
    assert excluded_text(runs.assign(status="finished")) == ""
    assert excluded_text(runs) == ("**3 of 4 runs did not finish** (baseline: 1 of 2 diverged; head usage (w=0.3): "
                                   "1 of 2 diverged, 1 of 2 failed) and are left out of every table, figure and verdict below.")
    assert excluded_text(runs.assign(status="diverged"), if_none="nothing to show").startswith("**None of the 4 runs finished**")
    assert excluded_text(runs.assign(status="diverged"), if_none="nothing to show").endswith(": nothing to show.")
    assert list(unfinished(runs)["runs"]) == [2, 2]


def test_the_index_summary_draws_arms_with_no_finished_run_as_absent():
    # As read back from results/07_interpretability.json: NaN was written as null.
    table = [{"constraint": "baseline", "weight": 0.0, "n": 0, "excluded": 2, "test_acc": None, "test_acc_ci_low": None,
              "test_acc_ci_high": None, "support_excess_cls": None, "support_excess_cls_ci_low": None,
              "support_excess_cls_ci_high": None}]
    counts = summary.verdict_counts([{"verdict": "inconclusive"}])
    fig = summary.figure(table, counts)
    assert "no arm has a finished run to draw" in [t.get_text() for t in fig.axes[0].texts]
    assert "baseline: accuracy n/a, support mass above chance n/a (2 runs that did not finish left out)" in \
        summary.alt_text(table, counts)
