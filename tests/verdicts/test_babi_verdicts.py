"""Section 09's library: reference numbers, the skip decision, error tables, findings, support mass."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from disentangle.verdicts import babi as br
from disentangle.config import ConfigError, run_hash
from disentangle.study import Study, constraint_of
from disentangle.train import run

TASKS = ["qa1", "qa2"]


# ------------------------------------------------------------------------------------ references


@pytest.mark.parametrize("ref", br.REFERENCES, ids=lambda r: r.key)
def test_reference_columns_are_complete_and_in_range(ref):
    assert set(ref.errors) == set(br.BABI_TASKS)  # every column claims all 20 tasks
    assert all(0.0 <= v <= 100.0 for v in ref.errors.values())
    assert ref.size in br.SIZES
    assert ref.source and ref.verified


@pytest.mark.parametrize("ref", br.REFERENCES, ids=lambda r: r.key)
def test_reference_columns_reproduce_their_published_mean_and_failures(ref):
    # A transcription check: the printed averages are rounded to 2 decimals from 1-decimal values.
    assert np.mean(list(ref.errors.values())) == pytest.approx(ref.published_mean, abs=0.006)
    if ref.published_failed is not None:
        assert sum(v > 5 for v in ref.errors.values()) == ref.published_failed


def test_appendix_columns_are_table_1s_dynamic_halting_row_and_memn2n_entry():
    avg = br.PUBLISHED_AVERAGES.set_index(["model", "size", "setting"])["mean_error"]
    for ref in br.UT_REFERENCES:
        if "best of 10" in ref.setting:
            setting = ref.setting.split(",")[0]
            assert avg[("UT w/ dynamic halting", ref.size, setting)] == ref.published_mean
    memn2n = br.reference("memn2n_pe_ls_rn_joint_1k")
    assert avg[("MemN2N (Sukhbaatar et al.)", "1k", "train joint")] == memn2n.published_mean


def test_shown_references_exist_for_their_size():
    for size, keys in br.SHOWN_REFERENCES.items():
        assert all(br.reference(k).size == size for k in keys)
    with pytest.raises(KeyError):
        br.reference("no_such_column")


def test_reference_table_mean_is_over_the_requested_tasks():
    table = br.reference_table(["qa2", "qa19"], "1k", keys=["memn2n_pe_ls_rn_joint_1k"])
    col = table.columns[0]
    assert table.loc["qa2", col] == 11.4 and table.loc["qa19", col] == 88.0
    assert table.loc["mean", col] == pytest.approx((11.4 + 88.0) / 2)
    with pytest.raises(ValueError, match="size"):
        br.reference_table(["qa1"], "5k")


# ---------------------------------------------------------------------------------- skip / detect


def write(path, name, lines):
    (path / name).write_text("\n".join(lines) + "\n")


@pytest.fixture
def tiny_babi(tmp_path):
    """qa1 and qa2 in the official format, 6 train and 2 test questions each."""
    for task in ("qa1", "qa2"):
        train = []
        for i, (who, place) in enumerate([("Mary", "bathroom"), ("John", "hallway"), ("Sandra", "garden")] * 2):
            train += [f"1 {who} went to the {place}.", f"2 Where is {who}?\t{place}\t1"]
        write(tmp_path, f"{task}_tiny_train.txt", train)
        write(tmp_path, f"{task}_tiny_test.txt", ["1 John went to the garden.", "2 Where is John?\tgarden\t1",
                                                  "1 Mary went to the hallway.", "2 Where is Mary?\thallway\t1"])  # fmt: skip
    return tmp_path


def test_empty_babi_dir_skips_with_a_message_saying_how_to_set_it():
    for empty in ("", "  ", None):
        message = br.skip_reason(empty, ["qa1"])
        assert "skipped" in message and "babi_dir" in message
        assert "--babi-dir" in message and "params/<profile>.yaml" in message


def test_missing_directory_or_files_skip_and_good_data_runs(tiny_babi, tmp_path):
    assert "not found" in br.skip_reason(str(tmp_path / "missing"), ["qa1"])
    assert "no such directory" in br.skip_reason("no/such/relative/dir", ["qa1"])
    assert "qa7_*_train.txt" in br.skip_reason(str(tiny_babi), ["qa7"])
    assert br.skip_reason(str(tiny_babi), ["qa1", "qa2"]) is None
    # some tasks without files (the shared en-10k has no qa3 train file): the others run, the missing are named
    assert br.skip_reason(str(tiny_babi), ["qa1", "qa7"]) is None
    missing = br.missing_tasks(str(tiny_babi), ["qa1", "qa7"])
    assert list(missing) == ["qa7"] and "expected one file qa7_*_train.txt" in missing["qa7"]
    assert "qa7_*_train.txt" in br.babi_dir_problem(str(tiny_babi), ["qa1", "qa7"])  # a directory the user named: all


def test_bad_task_ids_are_an_error_not_a_skip(tiny_babi):
    with pytest.raises(ConfigError, match=r"\['qa21'\] are not bAbI task ids"):
        br.skip_reason(str(tiny_babi), ["qa1", "qa21"])
    with pytest.raises(ConfigError, match="empty"):
        br.skip_reason(str(tiny_babi), [])


def test_dataset_size_counts_training_questions(tiny_babi, babi_root_dirs):
    assert br.questions_per_task(str(tiny_babi), ["qa1"]) == {"qa1": 6}
    assert br.dataset_size(str(tiny_babi), ["qa1", "qa2"]) == "1k"
    for name, expected in (("en", "1k"), ("en-10k", "10k")):
        if name in babi_root_dirs:
            assert br.dataset_size(str(babi_root_dirs[name]), ["qa1", "qa13"]) == expected


@pytest.fixture
def babi_root_dirs():
    from conftest import babi_root

    return {p.name: p for p in babi_root().glob("en*") if p.is_dir()}


# ---------------------------------------------------------------------------------------- tables


def synthetic_runs() -> pd.DataFrame:
    """Baseline and one constraint, 3 seeds, known accuracies on qa1 and qa2."""
    rows = []
    base = {"qa1": [0.90, 0.80, 0.70], "qa2": [0.60, 0.60, 0.60]}
    arm = {"qa1": [0.80, 0.70, 0.60], "qa2": [0.50, 0.50, 0.50]}
    for name, weight, acc in (("baseline", 0.0, base), ("orthogonality", 0.3, arm)):
        for i, seed in enumerate((0, 1, 2)):
            rows.append({"constraint": name, "weight": weight, "seed": seed, "status": "finished",
                         "test_acc/qa1": acc["qa1"][i], "test_acc/qa2": acc["qa2"][i],
                         "chance/qa1": 0.2, "chance/qa2": 0.25})  # fmt: skip
    return pd.DataFrame(rows)


def test_error_table_known_values():
    table = br.error_table(synthetic_runs(), TASKS).set_index(["constraint", "task"])
    t = sps.t.ppf(0.975, 2)
    qa1 = table.loc[("baseline", "qa1")]
    assert qa1["error"] == pytest.approx(20.0)  # errors 10, 20, 30
    assert qa1["ci_low"] == pytest.approx(max(0.0, 20.0 - t * 10 / math.sqrt(3)))  # clipped at 0
    assert qa1["ci_high"] == pytest.approx(20.0 + t * 10 / math.sqrt(3))
    qa2 = table.loc[("baseline", "qa2")]
    assert (qa2["error"], qa2["ci_low"], qa2["ci_high"]) == pytest.approx((40.0, 40.0, 40.0))
    mean = table.loc[("baseline", "mean")]  # per-run means 25, 30, 35
    assert mean["error"] == pytest.approx(30.0)
    assert mean["ci_high"] - mean["error"] == pytest.approx(t * 5 / math.sqrt(3))
    assert table.loc[("orthogonality", "mean"), "error"] == pytest.approx(40.0)
    assert (table["n"] == 3).all()
    assert list(dict.fromkeys(table.index.get_level_values(0))) == ["baseline", "orthogonality"]


def test_error_table_clips_to_the_possible_range_and_keeps_diverged_runs_as_nan():
    runs = synthetic_runs()
    runs.loc[runs["seed"] == 2, "test_acc/qa1"] = np.nan  # e.g. diverged
    runs.loc[runs["seed"] == 2, "status"] = "diverged"
    table = br.error_table(runs, TASKS).set_index(["constraint", "task"])
    assert table.loc[("baseline", "qa1"), "n"] == 2 and table.loc[("baseline", "qa2"), "n"] == 3
    assert table.loc[("baseline", "mean"), "n"] == 2  # a run missing a task has no mean
    assert (table["ci_low"].dropna() >= 0).all() and (table["ci_high"].dropna() <= 100).all()


def test_comparison_table_shows_arms_and_published_columns():
    errors = br.error_table(synthetic_runs(), TASKS)
    shown = br.comparison_table(errors, TASKS, "1k")
    assert list(shown.index) == ["qa1", "qa2", "mean"]
    assert shown.loc["qa2", "baseline"] == "40.0 [40.0, 40.0]"
    assert "orthogonality (w=0.3)" in shown.columns
    memn2n = [c for c in shown.columns if c.startswith("published: MemN2N")]
    assert shown.loc["qa2", memn2n[0]] == "11.4"
    assert shown.loc["mean", memn2n[0]] == "5.7"
    assert not any(c.startswith("published") for c in br.comparison_table(errors, TASKS, None).columns)
    chance = br.chance_errors(synthetic_runs(), TASKS)
    assert chance.to_dict() == pytest.approx({"qa1": 80.0, "qa2": 75.0, "mean": 77.5})


def test_accuracy_costs_and_findings_known_values():
    costs = br.accuracy_costs(synthetic_runs(), TASKS)
    assert len(costs) == 1
    r = costs.iloc[0]
    assert (r["constraint"], r["weight"], r["n"]) == ("orthogonality", 0.3, 3)
    assert (r["effect"], r["ci_low"], r["ci_high"]) == pytest.approx((-0.1, -0.1, -0.1))  # every seed loses 0.1
    found = br.verdict_rows(costs, TASKS, "1k")
    assert found[0]["verdict"] == "supported"
    assert set(found[0]) == {"claim", "verdict", "effect", "ci_low", "ci_high", "measure", "detail"}
    assert found[0]["claim"] == "on bAbI, orthogonality degrades accuracy"
    same = synthetic_runs()
    same.loc[same["constraint"] != "baseline", ["test_acc/qa1", "test_acc/qa2"]] = \
        same.loc[same["constraint"] == "baseline", ["test_acc/qa1", "test_acc/qa2"]].to_numpy()
    assert br.verdict_rows(br.accuracy_costs(same, TASKS), TASKS, "1k")[0]["verdict"] == "not supported"


def test_an_architectural_arm_without_a_weight_is_a_group_of_its_own():
    # architectural arms carry weight NaN (Study.run via constraint_of): groupby must not drop them
    runs = synthetic_runs()
    entmax = runs[runs["constraint"] == "orthogonality"].assign(constraint="entmax15", weight=float("nan"))
    runs = pd.concat([runs, entmax], ignore_index=True)
    table = br.error_table(runs, TASKS)
    assert set(table["constraint"]) == {"baseline", "orthogonality", "entmax15"}
    assert table.set_index(["constraint", "task"]).loc[("entmax15", "qa1"), "error"] == pytest.approx(30.0)
    costs = br.accuracy_costs(runs, TASKS).set_index("constraint")
    assert costs.loc["entmax15", "effect"] == pytest.approx(-0.1) and costs.loc["entmax15", "n"] == 3
    row = [r for r in br.verdict_rows(costs.reset_index(), TASKS, "1k") if "entmax" in r["claim"]][0]
    assert row["claim"] == "on bAbI, 1.5-entmax attention degrades accuracy" and row["verdict"] == "supported"
    assert row["detail"].startswith("registry setting;") and "nan" not in row["detail"]
    assert "1.5-entmax attention" in br.comparison_table(table, TASKS, None).columns


def test_support_table_known_values():
    per_run = pd.DataFrame({
        "task": ["qa1", "qa2"] * 2, "support_mass": [0.4, 0.6, 0.5, 0.7], "support_mass_top": [0.9] * 4,
        "chance": [0.2, 0.3, 0.2, 0.3], "constraint": "baseline", "weight": 0.0, "seed": [0, 0, 1, 1],
    })  # fmt: skip
    table = br.support_table(per_run, TASKS).set_index("task")
    assert table.loc["qa1", "support_mass"] == pytest.approx(0.45)
    assert table.loc["mean", "support_mass"] == pytest.approx(0.55)  # per-run means 0.5 and 0.6
    assert table.loc["mean", "chance"] == pytest.approx(0.25)
    assert table["support_mass_high"].max() <= 1.0 and table["support_mass_low"].min() >= 0.0
    shown = br.support_display(table.reset_index(), TASKS)
    assert shown.loc["mean", "chance (uniform attention)"] == "0.25"


# ------------------------------------------------------------------------------- configs and runs


def tiny_study(cache) -> Study:
    return Study.from_parameters(
        model={"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32, "max_len": 8},
        data={"n_val": 2}, train={"steps": 4, "batch_size": 4, "eval_every": 2, "warmup_steps": 1},
        seeds=[0, 1], sweep_weights={"orthogonality": [0.3]}, n_jobs=1, cache_dir=cache)


def test_babi_configs_are_the_study_configs_with_babi_data(tiny_babi, tmp_path):
    study = tiny_study(tmp_path / "cache")
    changes = br.data_changes(br.canonical_dir(str(tiny_babi)), TASKS, max_sentences=3, steps=4)
    max_len = br.needed_max_len(study, changes)
    assert max_len > 8  # the longest tiny input is longer than the base model's max_len
    chosen = pd.DataFrame({"constraint": ["orthogonality"], "weight": [0.3]})
    configs = br.babi_configs(study, chosen, changes, max_len)
    assert len(configs) == 4  # (baseline + 1 constraint) x 2 seeds
    assert [c.constraints.orthogonality for c in configs] == [0.0, 0.0, 0.3, 0.3]
    assert all(c.data.source == "babi" and c.data.tasks == tuple(TASKS) and c.model.max_len == max_len for c in configs)
    assert run_hash(configs[0]) == run_hash(study.config(seed=0, **changes, **{"model.max_len": max_len}))
    more = br.babi_configs(study, chosen, changes, max_len, ["hopfield", "entmax15"], {"hopfield": {"model.hopfield_patterns": 4}})
    assert more[:4] == configs and len(more) == 8
    assert [constraint_of(c)[0] for c in more[4:]] == ["hopfield", "hopfield", "entmax15", "entmax15"]
    assert more[4].model.hopfield_patterns == 4 and more[6].model.attention == "entmax15"
    assert more[4].seed == 0 and more[5].seed == 1 and more[4].data == configs[0].data
    with pytest.raises(ValueError, match="babi_alt_arms: 'orthogonality' is not an architectural arm"):
        br.babi_configs(study, chosen, changes, max_len, ["orthogonality"])


def test_support_mass_of_real_runs(tiny_babi, tmp_path):
    study = tiny_study(tmp_path / "cache")
    changes = br.data_changes(str(tiny_babi), TASKS, max_sentences=3, steps=4)
    chosen = pd.DataFrame({"constraint": ["orthogonality"], "weight": [0.3]})
    configs = br.babi_configs(study, chosen, changes, br.needed_max_len(study, changes))
    results = [run(c, study.cache_dir) for c in configs[:1] + configs[2:3]]
    per_run = br.support_mass(results, per_task=1)
    assert set(per_run["constraint"]) == {"baseline", "orthogonality"}
    assert set(per_run["task"]) == set(TASKS) and (per_run["n"] == 1).all()
    assert ((per_run["chance"] > 0) & (per_run["chance"] < 1)).all()
    assert (per_run["support_mass"] <= per_run["support_mass_top"] + 1e-9).all()
    assert (per_run["n_heads"] == 2).all()  # the one global layer's heads
