"""Section 10 (the replication) executed on its own with tiny parameters on the real bAbI en files: the runs
as published and converged, the tables, the MI sign and the findings rows. Temporary reports and cache."""

import json

import papermill
import pytest

from conftest import REPO

TINY = {
    "profile": "tiny10",
    "n_jobs": 1,
    "rep_published": ["vanilla", "ortho_mi"],
    "rep_seeds": [0, 1],
    "rep_mi_seeds": [0, 1],
    "rep_converged": ["vanilla", "ortho_mi"],
    "rep_converged_seeds": [0, 1],
    "rep_val": 100,
    "rep_max_epochs": 2,
    "rep_patience": 1,
    "rep_epochs": 1,
    "rep_overrides": {"model.d_model": 16, "model.n_heads": 4, "model.d_ff": 32},
    "rep_mi_steps": 20,
}


@pytest.mark.slow
def test_the_replication_section_records_its_tables_and_findings(tmp_path, monkeypatch, babi_en):
    monkeypatch.setenv("DISENTANGLE_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("DISENTANGLE_CACHE", str(tmp_path / "cache"))
    papermill.execute_notebook(str(REPO / "notebooks" / "10_replication.ipynb"), str(tmp_path / "10.ipynb"),
                               parameters={**TINY, "babi_dir": str(babi_en)}, cwd=str(REPO / "notebooks"),
                               progress_bar=False, kernel_name="python3")
    rec = json.loads((tmp_path / "reports" / "tiny10" / "results" / "10_replication.json").read_text())
    assert rec["skipped"] is None and rec["settings"]["faithful"] is False

    runs = rec["runs"]
    assert len(runs) == 2 * 2 + 2 * 2 + 2 * 2 and all(r["status"] == "finished" for r in runs)
    assert {r["steps"] for r in runs if r["protocol"] == "published"} == {16}  # 1 epoch of 1000 questions in batches of 64
    assert all(r["steps"] <= 2 * 15 and r["steps"] % 15 == 0 for r in runs if r["protocol"] == "converged")  # 900 left: 15 a epoch

    acc = {(r["protocol"], r["name"]): r for r in rec["accuracy"]}
    assert set(acc) == {(p, n) for p in ("published", "converged") for n in ("vanilla", "ortho_mi")}
    for r in acc.values():
        assert r["n"] == 2 and 0 <= r["mean"] <= 1 and r["published"] in (0.370, 0.375)
        if r["ci_low"] is not None and r["ci_high"] > r["ci_low"]:
            assert r["pi_low"] < r["ci_low"] <= r["mean"] <= r["ci_high"] < r["pi_high"]  # one seed is wider than the mean

    published = {r["name"]: r["test_acc"] for r in runs if r["protocol"] == "published" and r["seed"] == 0}
    contrast = next(c for c in rec["contrasts"] if c["protocol"] == "published" and c["name"] == "ortho_mi")
    seeds = {(r["name"], r["seed"]): r["test_acc"] for r in runs if r["protocol"] == "published"}
    assert contrast["effect"] == pytest.approx(sum(seeds[("ortho_mi", s)] - seeds[("vanilla", s)] for s in (0, 1)) / 2)
    assert contrast["published"] == pytest.approx(0.005) and published

    mi = {r["name"]: r for r in rec["mi"]}
    assert set(mi) == {"vanilla", "mi_published", "mi_project"}
    models = [m for m in rec["models"] if m["protocol"] == "published" and m["name"] in mi]
    assert len(models) == 6 and all(m["infonce"] is not None for m in models)
    assert all(0 <= m["support_share"] <= m["support_share"] + 1 and 0 <= m["support_mass"] <= 1 for m in rec["models"])
    assert len(rec["heatmap"]["heads_mass"]) == 4 and rec["heatmap"]["head_mass"] == rec["heatmap"]["heads_mass"][0]

    survival = {r["comparison"]: r for r in rec["survival"]}
    assert set(survival) == {"ortho_mi − vanilla"} and {"published verdict", "converged verdict"} <= set(survival["ortho_mi − vanilla"])

    findings = rec["findings"]
    assert {f["group"] for f in findings} == {"replication"}
    assert all(f["verdict"] in ("supported", "not supported", "inconclusive") for f in findings)
    claims = [f["claim"] for f in findings]
    assert sum("exceeds seed noise" in c for c in claims) == 2  # ortho_mi − vanilla, as published and converged
    assert any(c.startswith("the published MI term lowers the dependence between heads") for c in claims)
    assert sum(c.startswith("the published accuracies are what one seed gives") for c in claims) == 2
