"""Bad input and faults (issue 20), table-driven: profiles, notebook parameters, bAbI files, cache entries,
interrupted and diverged runs. Each case asserts that the message names the field or file and what is
allowed, and that no finished run is lost or altered. Tiny configs, no report render."""

import json
import math

import nbformat
import pandas as pd
import pytest

from disentangle.config import ConfigError
from disentangle.data import babi
from disentangle.report import run as runner
from disentangle.report.parameters import ParameterError, _declared, check, check_notebook
from disentangle.study import Study, accuracy_table
from disentangle.train import run, run_grid

from test_train import TINY, tiny

# ------------------------------------------------------------------------------- notebook parameters

# (parameters given to 02_orthogonality / 09_babi, the substrings every one of the problems must show)
PARAMETER_CASES = {
    "seeds a string": ({"seeds": "zero"}, ["seeds='zero' must be a list of int"]),
    "seeds an int (papermill -p seeds 3)": ({"seeds": 3}, ["seeds=3 must be a list of int"]),
    "one seed not an int": ({"seeds": [0, "1"]}, ["seeds[1]='1' must be an int"]),
    "misspelt key": ({"seed": [0]}, ["seed is not a parameter", "did you mean 'seeds'?", "parameters: profile, seeds"]),
    "NaN sweep weight": ({"sweep_weights": {"orthogonality": [0.03, 0.3, 3.0, math.nan]}},
                         ["sweep_weights.orthogonality[3]=nan must be a finite number"]),
    "sweep weight a string": ({"sweep_weights": {"head_usage": ["big"]}}, ["sweep_weights.head_usage[0]='big' must be a float"]),
    "sweep weights not a mapping": ({"sweep_weights": [0.1]}, ["sweep_weights=[0.1] must be a mapping"]),
    "model not a mapping": ({"model": 64}, ["model=64 must be a mapping"]),
    "n_jobs a float": ({"n_jobs": 1.5}, ["n_jobs=1.5 must be an int"]),
    "bool for an int": ({"n_jobs": True}, ["n_jobs=True must be an int"]),
    "variant not a string": ({"variants": {"orthogonality": 3}}, ["variants.orthogonality=3 must be a str"]),
    "babi_tasks a string": ({"babi_tasks": "qa1"}, ["babi_tasks='qa1' must be a list of str"]),
    "two problems at once": ({"seeds": "zero", "n_jobs": "2"}, ["seeds='zero'", "n_jobs='2'"]),
}


@pytest.mark.parametrize("case", PARAMETER_CASES)
def test_bad_notebook_parameters_are_named_as_written(case):
    given, expected = PARAMETER_CASES[case]
    problems = check(given, _declared("09_babi"), where="09_babi.ipynb")
    text = "\n".join(problems)
    for part in expected:
        assert part in text, (part, text)


def test_the_notebook_check_catches_papermill_overrides():
    namespace = {"profile": "x", "seeds": 3, "sweep_weights": {"orthogonality": [math.nan]}}
    with pytest.raises(ParameterError) as err:
        check_notebook("02_orthogonality", namespace)
    assert "02_orthogonality.ipynb" in str(err.value) and len(err.value.problems) == 2
    check_notebook("02_orthogonality", {"seeds": [0, 1], "n_jobs": 0})  # good values pass


def test_every_notebook_checks_its_parameters_right_after_the_parameters_cell():
    for path in sorted(runner.NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        assert f"check_notebook({path.stem!r}, globals())" in nb.cells[i + 1].source, path.name


# (study parameters, the substrings of the ConfigError)
STUDY_CASES = {
    "duplicate seeds": ({"seeds": [0, 0]}, ["seeds=[0, 0] has duplicates [0]: each seed must appear once"]),
    "seeds a string": ({"seeds": "zero"}, ["seeds='zero' must be a list of integers"]),
    "seeds an int": ({"seeds": 3}, ["seeds=3 must be a list of integers"]),
    "empty seeds": ({"seeds": []}, ["seeds is empty"]),
    "negative weight": ({"sweep_weights": {"orthogonality": [-1.0]}}, ["sweep_weights.orthogonality[0]=-1.0 must be >= 0"]),
    "NaN weight": ({"sweep_weights": {"orthogonality": [math.nan]}}, ["sweep_weights.orthogonality[0]=nan must be a finite"]),
    "unknown constraint": ({"sweep_weights": {"orthogonalty": [1.0]}}, ["'orthogonalty' is not a constraint (allowed:"]),
}


@pytest.mark.parametrize("case", STUDY_CASES)
def test_bad_study_parameters_fail_before_anything_trains(case, tmp_path):
    given, expected = STUDY_CASES[case]
    params = {"model": TINY["model"], "data": TINY["data"], "train": TINY["train"], "seeds": [0, 1],
              "sweep_weights": {"orthogonality": [0.1]}, "cache_dir": tmp_path, **given}
    with pytest.raises(ConfigError) as err:
        Study.from_parameters(**params)
    for part in expected:
        assert part in str(err.value), (part, str(err.value))
    assert not any(tmp_path.iterdir())  # nothing trained


# ------------------------------------------------------------------------------------------ profiles


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The real notebooks with profiles, reports and cache in tmp_path."""
    params, reports = tmp_path / "params", tmp_path / "reports"
    params.mkdir()
    monkeypatch.setattr(runner, "PARAMS", params)
    monkeypatch.setattr(runner, "REPORTS", reports)
    monkeypatch.setenv("DISENTANGLE_CACHE", str(reports / "cache"))
    monkeypatch.setenv("DISENTANGLE_REPORTS", str(reports))  # for the notebooks' kernels
    return params, reports


PROFILE_CASES = {
    "YAML syntax error": ("title: x\ncommon:\n  seeds: [0, 1\n  n_jobs: 1\n", ["bad.yaml:4:", "YAML syntax error"]),
    "not a mapping": ("- 1\n- 2\n", ["bad.yaml: a profile is a mapping"]),
    "unknown top-level key": ("title: x\ncomon: {}\n", ["unknown top-level keys ['comon']"]),
    "misspelt common key": ("common: {seed: [0]}\n", ["common.seed is not a parameter of any notebook (did you mean 'seeds'?)"]),
    "misspelt section key": ("sections: {09_babi: {babi_dirr: x}}\n",
                             ["sections.09_babi.babi_dirr is not a parameter of 09_babi.ipynb (did you mean 'babi_dir'?)"]),
    "seeds a string": ("common: {seeds: zero}\n", ["common.seeds='zero' must be a list of int"]),
    "NaN weight": ("common: {sweep_weights: {orthogonality: [0.1, 0.2, 0.3, .nan]}}\n",
                   ["common.sweep_weights.orthogonality[3]=nan must be a finite number"]),
    "section value of the wrong type": ("sections: {09_babi: {babi_steps: many}}\n",
                                        ["sections.09_babi.babi_steps='many' must be an int"]),
}


@pytest.mark.parametrize("case", PROFILE_CASES)
def test_bad_profiles_are_one_clear_error_before_anything_runs(case, project, capsys):
    params, reports = project
    text, expected = PROFILE_CASES[case]
    (params / "bad.yaml").write_text(text)
    assert runner.main(["--profile", "bad", "--only", "00_tasks"]) == 2
    err = capsys.readouterr().err
    for part in expected:
        assert part in err, (part, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 4
    assert not (reports / "bad").exists()


def test_an_explicit_babi_dir_that_is_a_file_is_an_error(project, tmp_path, capsys):
    params, reports = project
    (params / "ok.yaml").write_text("title: ok\n")
    a_file = tmp_path / "en.txt"
    a_file.write_text("1 Mary went to the kitchen.\n")
    assert runner.main(["--profile", "ok", "--only", "09_babi", "--babi-dir", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert f"--babi-dir {a_file}" in err and "is a file, not a directory" in err
    assert runner.main(["--profile", "ok", "--only", "09_babi", "--babi-dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (reports / "ok").exists()


def test_an_explicit_babi_dir_without_the_task_files_is_an_error_not_a_skipped_section(project, tmp_path, monkeypatch,
                                                                                        capsys):
    # The second half of case 7: a directory that exists but lacks the files made 09 skip itself, "ok", exit 0.
    params, reports = project
    (params / "ok.yaml").write_text("title: ok\nsections: {09_babi: {babi_tasks: [qa1, qa2]}}\n")
    ran = []
    monkeypatch.setattr(runner, "execute", lambda s, p, o: ran.append(p) or runner.SectionRun(s, "ok", parameters=p))
    monkeypatch.setattr(runner, "render_html", lambda *a: None)
    monkeypatch.setattr(runner, "environment", lambda: {})
    empty = tmp_path / "empty"
    empty.mkdir()
    assert runner.main(["--profile", "ok", "--only", "09_babi", "--babi-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"--babi-dir {empty}:" in err and "qa1" in err and "needed by 09_babi" in err and "Traceback" not in err
    only_qa1 = tmp_path / "only_qa1"
    only_qa1.mkdir()
    for kind in ("train", "test"):
        (only_qa1 / f"qa1_single-supporting-fact_{kind}.txt").write_text(GOOD_BABI)
    assert runner.main(["--profile", "ok", "--only", "09_babi", "--babi-dir", str(only_qa1)]) == 2
    assert "qa2" in capsys.readouterr().err  # the task whose files are missing
    assert not ran and not (reports / "ok" / "sections.json").exists()  # nothing ran, no index row claims ok
    (params / "ok.yaml").write_text("title: ok\nsections: {09_babi: {babi_tasks: [qa1]}}\n")
    assert runner.main(["--profile", "ok", "--only", "09_babi", "--babi-dir", str(only_qa1)]) == 0  # usable: it runs
    assert ran[0]["babi_dir"] == str(only_qa1)


def test_unwritable_reports_are_refused_before_any_training(project, tmp_path, monkeypatch, capsys):
    params, _ = project
    (params / "ok.yaml").write_text("title: ok\n")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")  # even root cannot create a folder under a file
    monkeypatch.setattr(runner, "REPORTS", blocker / "reports")
    called = []
    monkeypatch.setattr(runner, "execute", lambda *a: called.append(a))
    assert runner.main(["--profile", "ok", "--only", "00_tasks"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to {blocker / 'reports' / 'ok'}" in err and "Traceback" not in err
    assert not called
    monkeypatch.setattr(runner, "REPORTS", tmp_path / "reports2")
    monkeypatch.setenv("DISENTANGLE_CACHE", str(blocker / "cache"))  # only the cache unusable
    assert runner.main(["--profile", "ok", "--only", "00_tasks"]) == 2
    assert f"cannot write to {blocker / 'cache'}" in capsys.readouterr().err and not called


def test_ctrl_c_marks_the_section_interrupted_and_keeps_the_index_true(project, monkeypatch, capsys):
    params, reports = project
    (params / "ok.yaml").write_text("title: ok\n")
    out = reports / "ok"
    out.mkdir(parents=True)
    (out / "sections.json").write_text(json.dumps({"00_tasks": {
        "status": "ok", "seconds": 1.0, "error": None, "html": "00_tasks.html", "finished": "earlier"}}))

    def interrupted(section, params, out_dir):
        (out_dir / f"{section.name}.html").unlink(missing_ok=True)  # what execute does first
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "execute", interrupted)
    monkeypatch.setattr(runner, "environment", lambda: {})
    monkeypatch.setattr(runner, "screenshots", lambda out_dir: None)  # its own notice when Chromium is missing
    assert runner.main(["--profile", "ok", "--only", "00_tasks"]) == 130
    err = capsys.readouterr().err
    assert "interrupted in 00_tasks" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    state = json.loads((out / "sections.json").read_text())
    assert state["00_tasks"]["status"] == "interrupted" and state["00_tasks"]["html"] is None
    assert "00_tasks.html'" not in (out / "index.html").read_text()  # no link to the deleted page


# ------------------------------------------------------------------------------------------ bAbI files

GOOD_BABI = "1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\t1\n"

# (file bytes, the substrings of the error, besides the file name)
BABI_CASES = {
    "not UTF-8": (b"1 Mary went to the kitchen.\n2 John went to the caf\xe9.\n3 Where is Mary?\tkitchen\t1\n",
                  [":2: byte 0xe9 at column 23 is not UTF-8"]),
    "missing id": (b"Mary went to the kitchen.\n", [":1: expected '<id> <text>'"]),
    "question without supporting ids": (b"1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\n",
                                        [":2: a question line needs 3 tab-separated fields"]),
    "supporting id not earlier": (b"1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\t5\n", [":2: supporting id(s)"]),
    "ids not counting up": (b"1 Mary went to the kitchen.\n3 Where is Mary?\tkitchen\t1\n", [":2: line id 3 follows 1"]),
}


@pytest.mark.parametrize("case", BABI_CASES)
def test_bad_babi_files_name_the_file_and_line(case, tmp_path):
    content, expected = BABI_CASES[case]
    path = tmp_path / "qa1_single-supporting-fact_train.txt"
    path.write_bytes(content)
    with pytest.raises(babi.BabiFormatError) as err:
        babi.read_file(path)
    assert str(err.value).startswith(f"{path}:")
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


def test_a_good_babi_file_reads(tmp_path):
    path = tmp_path / "qa1_single-supporting-fact_train.txt"
    path.write_text(GOOD_BABI)
    assert len(babi.read_file(path)) == 1


# ----------------------------------------------------------------------------------------- cache entries


def test_identical_runs_write_identical_model_bytes(tmp_path):
    a = run(tiny(), tmp_path / "a")
    b = run(tiny(), tmp_path / "b")
    assert (a.path / "model.pt").read_bytes() == (b.path / "model.pt").read_bytes()
    ra, rb = (json.loads((r.path / "result.json").read_text()) for r in (a, b))
    assert ra["model_sha256"] == rb["model_sha256"] and ra["history_sha256"] == rb["history_sha256"]


def _cut(path, fraction=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_a_truncated_history_is_detected_and_the_run_recomputed(tmp_path):
    first = run(tiny(), tmp_path)
    history = first.path / "history.csv"
    _cut(history)
    again = run(tiny(), tmp_path)
    assert not again.cached  # the checksum in result.json caught the cut file
    assert again.history.equals(first.history) and again.metrics == first.metrics  # nothing lost or altered


def test_an_old_entry_without_history_checksum_is_verified_against_its_metrics(tmp_path):
    first = run(tiny(), tmp_path)
    result_path = first.path / "result.json"
    result = json.loads(result_path.read_text())
    del result["history_sha256"]  # as written before the checksum existed
    result_path.write_text(json.dumps(result))
    intact = run(tiny(), tmp_path)
    assert intact.cached and intact.history.equals(first.history)  # an intact old entry is kept
    _cut(first.path / "history.csv")
    result_path.write_text(json.dumps(result))
    cut = run(tiny(), tmp_path)
    assert not cut.cached and cut.history.equals(first.history)


@pytest.mark.parametrize("damage", ["history.csv deleted", "history.csv garbage"])
def test_other_history_damage_is_recomputed(tmp_path, damage):
    first = run(tiny(), tmp_path)
    history = first.path / "history.csv"
    if damage == "history.csv deleted":
        history.unlink()
    else:
        history.write_bytes(b"\x00\xff garbage")
    again = run(tiny(), tmp_path)
    assert not again.cached and again.metrics == first.metrics


# ------------------------------------------------------------------------------------------ diverged runs


def test_all_diverged_runs_give_a_table_of_nan_with_the_exclusions_counted(tmp_path):
    diverging = {"train.lr": 1e30, "train.grad_clip": 0.0, "train.warmup_steps": 0}
    runs, _ = run_grid([tiny(seed=0, **diverging), tiny(seed=1, **diverging)], tmp_path, n_jobs=1, progress=False)
    assert set(runs["status"]) == {"diverged"}
    table = accuracy_table(runs, ["where_person", "counting"])
    for col in ("test", "test_low", "test_high", "ood", "ood_low", "ood_high"):
        assert col in table and table[col].isna().all()
    assert (table["n"] == 0).all() and (table["excluded"] == 2).all()
    rows = list(table.itertuples())  # what 01_baseline reads: every attribute present
    assert all(math.isnan(r.ood) for r in rows)


def test_a_diverged_run_is_excluded_from_means_and_counted(tmp_path):
    good, bad = tiny(), tiny(seed=1, **{"train.lr": 1e30, "train.grad_clip": 0.0, "train.warmup_steps": 0})
    runs, _ = run_grid([good, bad], tmp_path, n_jobs=1, progress=False)
    table = accuracy_table(runs, ["where_person", "counting"])
    assert table.loc["all", "n"] == 1 and table.loc["all", "excluded"] == 1
    assert table.loc["all", "test"] == pytest.approx(runs.loc[0, "test_acc"])
    assert isinstance(runs, pd.DataFrame)


def test_figures_of_diverged_runs_draw_instead_of_raising():
    from disentangle.report import plots

    runs = pd.DataFrame({"weight": [0.0, 1.0], "status": ["diverged", "diverged"], "test_acc": [math.nan, math.nan]})
    plots.sweep_accuracy(runs, ["where_person"], "orthogonality")  # no test_acc/where_person column at all
    plots.learning_curves(pd.DataFrame(), ["where_person"])  # diverged before the first evaluation: no history


DIVERGING_PROFILE = """
title: diverging
common:
  seeds: [0, 1]
  n_jobs: 1
  model: {d_model: 16, n_heads: 2, n_layers: 2, local_layers: 1, d_ff: 32, max_len: 128}
  data: {tasks: [where_person, coreference], n_train: 64, n_val: 16, n_test: 32, n_ood: 16, n_people: 3,
         story_min: 2, story_max: 3, n_distractors: 0, ood_story_min: 5, ood_story_max: 7}
  train: {steps: 20, batch_size: 16, lr: 1000, warmup_steps: 0, eval_every: 10}
  sweep_weights: {orthogonality: [1.0], mutual_information: [1.0], attention_entropy: [1.0], head_usage: [1.0]}
  axes: {model.d_ff: [32, 64]}
  capacity_arms: all
sections:
  01_baseline: {compare_plain: false}
  09_babi: {babi_dir: BABI, babi_tasks: [qa1], babi_steps: 20, babi_n_train: 50, babi_n_test: 20,
            babi_attention_examples: 10,
            babi_alt_settings: {routed_heads: {model.routed_top_k: 1, model.shared_heads: 1}}}
"""
DIVERGED_SECTIONS = ["01_baseline", "02_orthogonality", "06_capacity_scaling", "07_interpretability", "08_findings", "09_babi"]


def test_sections_of_a_profile_whose_runs_all_diverge_execute_and_record_them(project, monkeypatch, babi_en):
    """The one end-to-end render of this module (about 70 s): lr 1000, every run diverges (09 trains the
    architectural arms too: (baseline and 4 constraints + 4 architectural arms) x 2 seeds = 18 runs). Each section
    executes, records the diverged runs, and every verdict is inconclusive, saying which runs it left out."""
    params, reports = project
    (params / "div.yaml").write_text(DIVERGING_PROFILE.replace("BABI", str(babi_en)))
    monkeypatch.setattr(runner, "render_html", lambda *a: None)
    from disentangle.report import results as store

    monkeypatch.setattr(store, "REPORTS", reports)  # the index reads 07-09's results in this process
    assert runner.main(["--profile", "div", "--only", *DIVERGED_SECTIONS]) == 0

    def results(section):
        return json.loads((reports / "div" / "results" / f"{section}.json").read_text())

    baseline = results("01_baseline")
    assert baseline["statuses"] == {"diverged": 2}
    rows = baseline["baseline"]
    assert all(r["n"] == 0 and r["excluded"] == 2 for r in (rows if isinstance(rows, list) else rows.values()))

    capacity = results("06_capacity_scaling")  # 5 arms x 2 seeds at d_ff 32 and 64
    assert capacity["statuses"] == {"diverged": 20}
    assert {r["outcome"] for r in capacity["recovery"]} == {"no finished run"}
    assert all(c["n"] == 0 and c["excluded"] == 2 for c in capacity["chosen_weights"])
    (pooled,) = capacity["findings"]
    assert pooled["verdict"] == "inconclusive" and "no finished baseline run" in pooled["detail"]
    assert "20 of 20 runs did not finish (20 diverged)" in pooled["detail"]

    interp = results("07_interpretability")
    assert interp["statuses"] == {"diverged": 10}
    assert all(a["n"] == 0 and a["excluded"] == 2 for a in interp["arm_summary"]) and len(interp["arm_summary"]) == 5
    assert "heatmap_heads" not in interp  # nothing measured on a diverged model

    found = results("08_findings")
    assert found["statuses"] == {"diverged": 20} and found["verdict_counts"] == {"inconclusive": len(found["findings"])}
    costs = [f for f in found["findings"] if f["group"] == "accuracy cost"]
    assert len(costs) == 4 and all("4 runs that did not finish left out" in f["detail"] for f in costs)
    assert all("no finished model" in f["detail"] for f in found["findings"] if f["group"] == "sparse vs correct")

    babi_results = results("09_babi")
    assert babi_results["statuses"] == {"diverged": 18} and "support_mass" not in babi_results
    assert all(f["verdict"] == "inconclusive" and "did not finish left out" in f["detail"] for f in babi_results["findings"])

    # The index draws 07's table and counts 08/09's verdicts; the arms left out are said in its alt text.
    index = (reports / "div" / "index.html").read_text()
    assert "baseline: accuracy n/a, support mass above chance n/a (2 runs that did not finish left out)" in index
