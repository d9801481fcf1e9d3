"""Section 09 (the real bAbI tasks) executed on its own with tiny parameters and a tiny bAbI directory in the
official format: a task whose train file is missing is left out by name while the others are reported, and
the architectural arms of section 11 train next to the baseline and the constraints. Temporary reports and cache."""

import json

import papermill
import pytest

from conftest import REPO

TINY = {
    "profile": "tiny09",
    "seeds": [0, 1],
    "n_jobs": 1,
    "model": {"d_model": 16, "n_heads": 4, "n_layers": 2, "local_layers": 1, "d_ff": 32, "max_len": 64},
    "data": {"tasks": ["where_person"], "n_train": 40, "n_val": 4, "n_test": 20, "n_ood": 10,
             "n_people": 3, "story_min": 2, "story_max": 3, "n_distractors": 0, "ood_story_min": 5, "ood_story_max": 6},
    "train": {"steps": 10, "batch_size": 8, "lr": 0.003, "warmup_steps": 2, "eval_every": 5},
    "sweep_weights": {"orthogonality": [0.3]},
    "babi_tasks": ["qa1", "qa2", "qa3"],
    "babi_max_sentences": 4,
    "babi_steps": 10,
    "babi_alt_arms": ["entmax15", "routed_heads"],
    "babi_alt_settings": {"routed_heads": {"model.routed_top_k": 2, "model.shared_heads": 1}},
    "babi_attention_examples": 0,
}


def tiny_babi(root):
    """qa1 and qa2 complete (24 train, 4 test questions), qa3 with its test file only, like the shared en-10k."""
    people = [("Mary", "bathroom"), ("John", "hallway"), ("Sandra", "garden"), ("Daniel", "kitchen")]
    for task in ("qa1", "qa2", "qa3"):
        lines = []
        for who, place in people * 6:
            lines += [f"1 {who} went to the {place}.", f"2 Daniel moved to the office.", f"3 Where is {who}?\t{place}\t1"]
        if task != "qa3":
            (root / f"{task}_tiny_train.txt").write_text("\n".join(lines) + "\n")
        (root / f"{task}_tiny_test.txt").write_text("\n".join(lines[:12]) + "\n")
    return root


@pytest.mark.slow
def test_the_babi_section_leaves_out_a_task_without_files_and_trains_the_architectures(tmp_path, monkeypatch):
    monkeypatch.setenv("DISENTANGLE_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("DISENTANGLE_CACHE", str(tmp_path / "cache"))
    babi = tmp_path / "babi"
    babi.mkdir()
    papermill.execute_notebook(str(REPO / "notebooks" / "09_babi.ipynb"), str(tmp_path / "09.ipynb"),
                               parameters={**TINY, "babi_dir": str(tiny_babi(babi))}, cwd=str(REPO / "notebooks"),
                               progress_bar=False, kernel_name="python3")
    rec = json.loads((tmp_path / "reports" / "tiny09" / "results" / "09_babi.json").read_text())
    assert list(rec["missing_tasks"]) == ["qa3"] and "qa3_*_train.txt" in rec["missing_tasks"]["qa3"]
    assert rec["settings"]["tasks"] == ["qa1", "qa2"]
    arms = {r["constraint"] for r in rec["error_table"]}
    assert arms == {"baseline", "orthogonality", "entmax15", "routed_heads"}
    assert rec["n_runs"] == 4 * 2  # four arms, two seeds
    tasks = {r["task"] for r in rec["error_table"]}
    assert tasks == {"qa1", "qa2", "mean"}  # qa3 nowhere
    claims = {r["claim"]: r for r in rec["findings"]}
    assert {"on bAbI, 1.5-entmax attention degrades accuracy", "on bAbI, routed heads (MoH) degrades accuracy"} <= set(claims)
    assert all(r["detail"].startswith("registry setting;") for c, r in claims.items() if "orthogonality" not in c)
