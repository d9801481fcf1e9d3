"""Section 11 (the alternatives) executed on its own with tiny parameters: every arm trains, each table is
recorded, the sweep path runs and the findings rows come out with verdicts. Temporary reports and cache."""

import json

import papermill
import pytest

from conftest import REPO

TINY = {
    "profile": "tiny11",
    "seeds": [0, 1],
    "n_jobs": 1,
    "model": {"d_model": 16, "n_heads": 4, "n_layers": 2, "local_layers": 1, "d_ff": 32, "max_len": 128},
    "data": {"tasks": ["where_person", "coreference"], "n_train": 60, "n_val": 20, "n_test": 40, "n_ood": 10,
             "n_people": 3, "story_min": 2, "story_max": 3, "n_distractors": 0, "ood_story_min": 5, "ood_story_max": 6},
    "train": {"steps": 30, "batch_size": 16, "lr": 0.003, "warmup_steps": 5, "eval_every": 15},
    "sweep_weights": {"attention_entropy": [1.0]},
    "alt_seeds": [0, 1, 2],
    "alt_settings": {"routed_heads": {"model.routed_top_k": 2, "model.shared_heads": 1}, "hopfield": {"model.hopfield_patterns": 8}},
    "alt_sweeps": {"hopfield": {"model.hopfield_beta": [4.0]}},
    "probe_factors": ["answer", "task"],
}


@pytest.mark.slow
def test_the_alternatives_section_records_every_table_and_its_findings(tmp_path, monkeypatch):
    monkeypatch.setenv("DISENTANGLE_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("DISENTANGLE_CACHE", str(tmp_path / "cache"))
    papermill.execute_notebook(str(REPO / "notebooks" / "11_alternatives.ipynb"), str(tmp_path / "11.ipynb"),
                               parameters=TINY, cwd=str(REPO / "notebooks"), progress_bar=False, kernel_name="python3")
    rec = json.loads((tmp_path / "reports" / "tiny11" / "results" / "11_alternatives.json").read_text())
    arms = ["routed_heads", "hopfield", "entmax15", "entmax_alpha"]
    status = {(r["constraint"], r["setting"]): r.get("finished", 0) for r in rec["status"]}
    assert status == {**{(a, ""): 3 for a in ["baseline", *arms]}, ("hopfield", "hopfield_beta=4"): 3}

    accuracy = {(r["constraint"], r["task"]): r for r in rec["accuracy"]}
    assert all(accuracy[(a, t)]["n"] == 3 and 0 <= accuracy[(a, t)]["test"] <= 1
               for a in ["baseline", *arms] for t in ["all", "where_person", "coreference"])
    changes = {(r["constraint"], r["metric"]): r for r in rec["accuracy_changes"]}
    for a in arms:  # paired by seed: the change is the mean of per-seed differences over the 3 shared seeds
        c = changes[(a, "test_acc")]
        assert c["n"] == 3 and c["effect"] == pytest.approx(accuracy[(a, "all")]["test"] - accuracy[("baseline", "all")]["test"])

    measures = {r["constraint"]: r for r in rec["measures"]}
    assert set(measures) == {"baseline", "attention_entropy", *arms}
    # the entropy penalty: its sections' 2 seeds plus the alternatives' third, so entmax pairs with it on all 3
    assert measures["attention_entropy"]["n"] == 3 and measures["hopfield"]["n"] == 3
    assert measures["baseline"]["zero_share"] == 0 and measures["entmax15"]["zero_share"] >= 0  # softmax never gives a 0
    assert all(0 <= measures[a]["topk_precision"] <= 1 for a in measures)

    heads = rec["routing_heads"]
    assert len(heads) == 4  # one global layer, 4 heads
    assert [h["shared"] for h in heads] == [True, False, False, False]
    assert all(h["frequency all"] == 1.0 for h in heads if h["shared"])
    assert sum(h["frequency all"] for h in heads if not h["shared"]) == pytest.approx(2.0)  # top 2 of 3 routed, every token
    assert 0 <= rec["selectivity"][0]["selectivity_role"] <= 1

    attractors = {r["setting"]: r for r in rec["attractors"]}
    assert set(attractors) == {"", "hopfield_beta=4"}
    assert all(-1 <= attractors[s][f"ami_{f}"] <= 1 and 0 < attractors[s][f"purity_{f}"] <= 1
               for s in attractors for f in ["kind", "entity", "role"])
    assert [r["setting"] for r in rec["sweeps"]] == ["", "hopfield_beta=4"] and rec["sweeps"][0]["value"] == pytest.approx(0.25)
    control = rec["attractor_control"][0]  # the baseline's states in M + 1 = 9 clusters, over its 3 seeds
    assert control["n_clusters"] == 9 and control["n"] == 3 and -1 <= control["control_ami"] <= 1

    alphas = rec["alphas"]
    assert len(alphas) == 4 and all(1 < a["min"] <= a["max"] < 2 for a in alphas)
    assert {r["constraint"] for r in rec["arm_summary"]} == set(arms)
    assert {r["constraint"] for r in rec["plane"]} == {"baseline", "attention_entropy", *arms}

    findings = rec["findings"]
    assert [f["group"] for f in findings] == ["alternatives"] * 5
    assert all(f["verdict"] in ("supported", "not supported", "inconclusive") for f in findings)
    assert "better than clustering the baseline's states" in findings[2]["claim"] and "paired over 3 seeds" in findings[2]["measure"]
    assert "paired over 3 seeds" in findings[0]["measure"] and "paired over 3 seeds" in findings[3]["measure"]
