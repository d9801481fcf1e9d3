"""The alternatives' verdicts on synthetic per-model tables with known values."""

import math

import numpy as np
import pandas as pd
import pytest

from disentangle.stats import mean_ci
from disentangle.verdicts import alternatives as V

SEEDS = [0, 1, 2, 3, 4]


def models(arm_values: dict[str, dict[str, list[float]]], seeds=SEEDS) -> pd.DataFrame:
    rows = []
    for arm, measures in arm_values.items():
        for i, s in enumerate(seeds):
            rows.append({"model": f"{arm}-{s}", "constraint": arm, "setting": "", "seed": s,
                         **{m: v[i] for m, v in measures.items()}})
    return pd.DataFrame(rows)


def routed(spec_task, spec_role, acc_routed, acc_base=(0.90, 0.92, 0.91, 0.93, 0.90)):
    zero = [0.0] * 5
    return models({"baseline": {"selectivity_task": zero, "selectivity_role": zero, "test_acc": list(acc_base)},
                   "routed_heads": {"selectivity_task": spec_task, "selectivity_role": spec_role, "test_acc": acc_routed}})


def test_both_needs_every_part():
    assert V.both("supported", "supported") == "supported"
    assert V.both("supported", "not supported") == "not supported"
    assert V.both("supported", "inconclusive") == "inconclusive"
    assert V.both("inconclusive", "not supported") == "not supported"


def test_routing_specialises_without_cost_is_supported_with_the_paired_numbers():
    role = [0.20, 0.22, 0.18, 0.21, 0.19]
    table = routed([0.01] * 5, role, [0.90, 0.92, 0.915, 0.93, 0.905])
    r = V.routing_specialises(table, margin=0.01, selectivity_margin=0.05)
    m, lo, hi = mean_ci(role)  # the max of task and role is role; the baseline's is 0
    assert (r["effect"], r["ci_low"], r["ci_high"]) == pytest.approx((m, lo, hi))
    assert r["verdict"] == "supported" and r["group"] == "alternatives"
    assert "by role 0.200" in r["detail"] and "no cost beyond 0.01 supported" in r["detail"]


def test_routing_that_costs_accuracy_or_does_not_specialise_is_not_supported():
    costly = routed([0.3] * 5, [0.3] * 5, [0.80, 0.81, 0.80, 0.82, 0.79])  # ~11 points below the baseline
    assert V.routing_specialises(costly)["verdict"] == "not supported"
    flat = routed([0.001, 0.002, 0.0, 0.001, 0.002], [0.003, 0.001, 0.002, 0.0, 0.001], [0.90, 0.92, 0.91, 0.93, 0.90])
    r = V.routing_specialises(flat)
    assert r["verdict"] == "not supported" and "specialisation not supported" in r["detail"]  # inside the margin
    noisy = routed([0.3] * 5, [0.3] * 5, [0.95, 0.80, 0.99, 0.85, 0.92])  # the cost's interval straddles the margin
    assert V.routing_specialises(noisy)["verdict"] == "inconclusive"


def test_routing_pairs_by_seed_and_is_untestable_without_routed_models():
    table = routed([0.1] * 5, [0.2, 0.3, 0.2, 0.3, 0.2], [0.9] * 5)
    shuffled = table.sample(frac=1.0, random_state=0)
    assert V.routing_specialises(shuffled) == V.routing_specialises(table)  # order does not matter, seeds do
    missing = V.routing_specialises(table[table["constraint"] == "baseline"])
    assert missing["verdict"] == "inconclusive" and "not testable" in missing["detail"] and math.isnan(missing["effect"])


def test_attractors_separate_on_the_mean_chance_adjusted_mi():
    ami = {"ami_kind": [0.6, 0.5, 0.55, 0.6, 0.5], "ami_entity": [0.2, 0.3, 0.25, 0.2, 0.3], "ami_role": [0.0] * 5}
    mean = np.mean(list(ami.values()), axis=0)
    table = models({"hopfield": {**ami, "ami": list(mean), "metastable": [0.1] * 5}})
    r = V.attractors_separate(table, ami_margin=0.05)
    assert (r["effect"], r["ci_low"], r["ci_high"]) == pytest.approx(mean_ci(mean)) and r["verdict"] == "supported"
    assert "kind 0.550" in r["detail"] and "metastable share 0.10" in r["detail"]
    chance = models({"hopfield": {"ami": [0.01, -0.01, 0.0, 0.02, 0.0], "metastable": [0.9] * 5}})
    assert V.attractors_separate(chance)["verdict"] == "not supported"  # inside the margin around chance
    assert V.attractors_separate(models({"baseline": {"ami": [0.0] * 5}}))["verdict"] == "inconclusive"


def test_attractors_against_clustering_the_baseline_states_are_paired_by_seed():
    hop = {"ami": [0.10, 0.12, 0.11, 0.10, 0.12]}
    control = {"control_ami": [0.30, 0.28, 0.31, 0.29, 0.30], "control_ami_kind": [0.5] * 5}
    table = models({"hopfield": hop, "baseline": control})
    r = V.attractors_beat_clustering(table, ami_margin=0.05)
    d = np.array(hop["ami"]) - np.array(control["control_ami"])
    assert (r["effect"], r["ci_low"], r["ci_high"]) == pytest.approx(mean_ci(d))
    assert r["verdict"] == "not supported" and "kind 0.500" in r["detail"]  # the states separate them better
    better = models({"hopfield": {"ami": [0.5] * 5}, "baseline": control})
    assert V.attractors_beat_clustering(better)["verdict"] == "supported"
    alone = V.attractors_beat_clustering(models({"hopfield": hop}))
    assert alone["verdict"] == "inconclusive" and "not testable" in alone["detail"]


def test_entmax_against_the_penalty_needs_sparser_and_more_correct():
    penalty = {"entropy_cls": [0.30, 0.32, 0.31], "support_excess_cls": [0.10, 0.12, 0.11], "topk_precision": [0.5] * 3}
    better = {"entropy_cls": [0.20, 0.21, 0.22, 0.2, 0.2], "support_excess_cls": [0.30, 0.31, 0.29, 0.3, 0.3],
              "topk_precision": [0.8] * 5}
    table = pd.concat([models({"attention_entropy": penalty}, seeds=[0, 1, 2]), models({"entmax15": better})])
    r = V.entmax_vs_penalty(table, "entmax15")
    d = np.array(better["support_excess_cls"][:3]) - np.array(penalty["support_excess_cls"])  # paired over seeds 0-2
    assert (r["effect"], r["ci_low"], r["ci_high"]) == pytest.approx(mean_ci(d)) and r["verdict"] == "supported"
    assert "paired over 3 seeds" in r["measure"] and "top-k precision change +0.300" in r["detail"]
    denser = table.copy()
    denser.loc[denser["constraint"] == "entmax15", "entropy_cls"] = 0.6  # more correct, but not sparser
    assert V.entmax_vs_penalty(denser, "entmax15")["verdict"] == "not supported"
    assert V.entmax_vs_penalty(table, "entmax_alpha")["verdict"] == "inconclusive"  # no such models: untestable


def test_effects_vs_baseline_and_the_rows_in_order():
    table = routed([0.1] * 5, [0.2] * 5, [0.91, 0.93, 0.92, 0.94, 0.91])
    eff = V.effects_vs(table, ["routed_heads"], ["test_acc"])
    assert eff.iloc[0]["effect"] == pytest.approx(0.01) and eff.iloc[0]["n"] == 5
    out = V.rows(table)
    assert [r["claim"].split(":")[0].split(" is ")[0] for r in out] == [
        "routed heads (MoH)", "Hopfield memory", "Hopfield memory", "1.5-entmax attention", "learned-α entmax attention"]
    assert all(r["verdict"] in ("supported", "not supported", "inconclusive") for r in out)
