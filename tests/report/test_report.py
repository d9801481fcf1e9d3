"""The report pipeline: the quick profile end to end (smoke test on recorded numbers and the HTML), profile
validation, and what happens when a notebook fails. All in temporary folders: the user's reports/ and run
cache are never touched."""

import ast
import json
import re
import textwrap
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml
from bs4 import BeautifulSoup  # nbconvert's own dependency

from conftest import REPO

NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


from conftest import run_report  # the session's quick report (fixture ``quick``) is in conftest.py too


def results(folder: Path, section: str) -> dict:
    return json.loads((folder / "results" / f"{section}.json").read_text())


# ------------------------------------------------------------------------------ the quick profile


@pytest.mark.slow
def test_every_section_renders_and_the_index_links_it(quick):
    index = (quick / "index.html").read_text()
    for name in NOTEBOOKS:
        assert (quick / f"{name}.html").exists(), name
        assert f"href='{name}.html'" in index, name
    assert "FAILED" not in index


@pytest.mark.slow
def test_the_console_shows_one_line_per_section(quick):
    # Not a terminal (captured): no live progress, one line per section with its runs counted.
    lines = (quick.parent / "quick.stdout").read_text().splitlines()
    for name in NOTEBOOKS:
        mine = [line for line in lines if line.startswith(f"[quick] {name} ")]
        assert len(mine) == 1 and " ok (" in mine[0], (name, mine)
    baseline = next(line for line in lines if line.startswith("[quick] 01_baseline "))
    assert re.search(r"(\d+)/\1 runs, \d+ cached\)$", baseline), baseline


@pytest.mark.slow
def test_the_index_opens_on_the_summary_figure(quick):
    index = (quick / "index.html").read_text()
    figure = re.search(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', index)
    assert figure and index.index(figure.group(0)) < index.index("<h2>Findings</h2>")
    assert "baseline: accuracy" in figure.group(1) and "verdict counts" in figure.group(1)
    arms = results(quick, "07_interpretability")["arm_summary"]
    assert {a["constraint"] for a in arms} == {"baseline", *yaml.safe_load(
        (REPO / "params" / "quick.yaml").read_text())["common"]["sweep_weights"]}
    assert all(a["n"] >= 1 for a in arms)


@pytest.mark.slow
def test_tables_show_numbers_as_written_not_padded(quick):
    # pandas' default float format pads to six decimals (weights as 0.000000, 3.000000); the pages use
    # {:g} for weights and three decimals for measures.
    padded = re.compile(r"<t[dh][^>]*>\s*-?\d+\.\d{5,}\s*</t[dh]>")
    for name in ["index", *NOTEBOOKS]:
        found = padded.findall((quick / f"{name}.html").read_text())
        assert not found, (name, found[:3])


@pytest.mark.slow
def test_no_error_outputs_anywhere(quick):
    for name in NOTEBOOKS:
        nb = nbformat.read(quick / f"{name}.ipynb", as_version=4)
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, (name, errors[:1])
        # What the page shows as output (not the highlighted source, where `raise ValueError(...)` is code):
        # a traceback printed to a stream rather than raised would get past the check above.
        page = BeautifulSoup((quick / f"{name}.html").read_text(), "html.parser")
        shown = " ".join(area.get_text(" ") for area in page.select(".jp-OutputArea"))
        error = r"Traceback|\b\w*Error\s*:"  # get_text puts a space between a highlighted name and its colon
        assert not re.search(error, shown), (name, re.findall(f".{{0,80}}(?:{error}).{{0,80}}", shown)[:1])


@pytest.mark.slow
def test_every_figure_is_embedded_and_nothing_is_fetched(quick):
    for name in NOTEBOOKS:
        nb = nbformat.read(quick / f"{name}.ipynb", as_version=4)
        figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
        page = (quick / f"{name}.html").read_text()
        assert page.count('src="data:image/png;base64,') == figures, name
        assert not re.search(r"<img[^>]+src=\"(?!data:)", page), f"{name}: an image is not embedded"
        assert not re.search(r"<(script|link)[^>]+(src|href)=\"https?://", page), f"{name}: loads from the internet"
        assert 'class="code-fold"' in page, f"{name}: code is not folded"


@pytest.mark.slow
def test_the_quick_banner_is_on_every_page(quick):
    banner = yaml.safe_load((REPO / "params" / "quick.yaml").read_text())["banner"]
    assert banner.split(".")[0] in (quick / "index.html").read_text()
    for name in NOTEBOOKS:
        assert "report-banner" in (quick / f"{name}.html").read_text(), name


@pytest.mark.slow
def test_recorded_numbers(quick):
    profile = yaml.safe_load((REPO / "params" / "quick.yaml").read_text())["common"]
    tasks, seeds = profile["data"]["tasks"], profile["seeds"]
    sizes = results(quick, "00_tasks")["sizes"]
    assert sizes["train"] == profile["data"]["n_train"] * len(tasks)
    assert sizes["test"] == profile["data"]["n_test"] * len(tasks)

    baseline = {row["task"]: row for row in results(quick, "01_baseline")["baseline"]}
    assert baseline["where_person"]["n"] == len(seeds)
    # even 200 steps of a tiny model beat always giving the most frequent answer
    assert baseline["where_person"]["test"] > baseline["where_person"]["chance"] + 0.05

    for section, constraint in [("02_orthogonality", "orthogonality"), ("03_mutual_information", "mutual_information"),
                                ("04_attention_entropy", "attention_entropy"), ("05_head_usage", "head_usage")]:
        costs = results(quick, section)["costs"]
        weights = sorted({c["weight"] for c in costs})
        assert weights == sorted(profile["sweep_weights"][constraint]), section
        assert all(c["n"] == len(seeds) for c in costs), section

    findings = results(quick, "08_findings")["findings"]
    assert findings and all(f["verdict"] in ("supported", "not supported", "inconclusive") for f in findings)
    assert {f["group"] for f in findings} == {"accuracy cost", "capacity", "sparse vs correct", "where it hurts"}
    assert sum(f["group"] == "capacity" for f in findings) == len(profile["axes"])  # one claim per capacity axis

    # 11: every alternative and its paired baseline over the section's seeds, five findings rows
    alt = yaml.safe_load((REPO / "params" / "quick.yaml").read_text())["sections"]["11_alternatives"]
    rec = results(quick, "11_alternatives")
    arms = ["routed_heads", "hopfield", "entmax15", "entmax_alpha"]
    assert {(r["constraint"], r["finished"]) for r in rec["status"]} == {(a, len(alt["alt_seeds"])) for a in ["baseline", *arms]}
    assert {r["constraint"] for r in rec["measures"]} == {"baseline", *profile["sweep_weights"], *arms}
    assert all(0 <= r["test"] <= 1 for r in rec["accuracy"] if r["constraint"] in arms)
    assert [f["group"] for f in rec["findings"]] == ["alternatives"] * 5
    # 10: the replication's runs as published and converged, its own findings group on the index
    rep = yaml.safe_load((REPO / "params" / "quick.yaml").read_text())["sections"]["10_replication"]
    replication = results(quick, "10_replication")
    if not replication["skipped"]:
        acc = {(r["protocol"], r["name"]): r for r in replication["accuracy"]}
        assert all(acc[("published", n)]["n"] == len(rep["rep_seeds"]) for n in ["vanilla", "ortho_mi", "ortho_mi_attn_head"])
        assert all(acc[("converged", n)]["n"] == len(rep["rep_converged_seeds"]) for n in rep["rep_converged"])
        assert {f["group"] for f in replication["findings"]} == {"replication"}
        assert "from 10_replication" in (quick / "index.html").read_text()
    index = (quick / "index.html").read_text()
    assert "from 11_alternatives" in index and all(f["claim"].split("'")[0] in index for f in rec["findings"])  # escaped apostrophes


@pytest.mark.slow
def test_a_second_run_reuses_the_cache(quick, tmp_path):
    # Same cache, one section again: every run loads, nothing trains (wall time of the section is small).
    reports = quick.parent
    proc = run_report("quick", reports, {"DISENTANGLE_SCREENSHOTS": "0"}, "--only", "02_orthogonality")
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((quick / "sections.json").read_text())
    assert state["02_orthogonality"]["status"] == "ok"
    assert state["02_orthogonality"]["seconds"] < 60


# -------------------------------------------------------------------------- profiles and failures


def test_notebook_defaults_match_the_default_profile():
    """Running a notebook by hand (no papermill parameters) reproduces the default profile."""
    profile = yaml.safe_load((REPO / "params" / "default.yaml").read_text())
    for name in NOTEBOOKS:
        declared = papermill.inspect_notebook(str(REPO / "notebooks" / f"{name}.ipynb"))
        wanted = {**profile["common"], **(profile.get("sections") or {}).get(name, {})}
        for key, value in wanted.items():
            if key in declared:
                default = ast.literal_eval(declared[key]["default"])
                assert default == value, f"{name}.{key}: notebook default {default!r} != params/default.yaml {value!r}"


def test_every_notebook_has_one_typed_commented_parameters_cell():
    for name in NOTEBOOKS:
        nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, name
        for line in tagged[0].source.splitlines():
            if line.strip():
                assert re.match(r"^\w+: [\w\[\], ]+ = .+  # .+", line), f"{name}: untyped or uncommented: {line}"


def write_notebook(path: Path, code: list[str]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}")]
    params = nbformat.v4.new_code_cell("x: int = 1  # a parameter")
    params.metadata["tags"] = ["parameters"]
    nb.cells += [params] + [nbformat.v4.new_code_cell(c) for c in code]
    nbformat.write(nb, path)


@pytest.fixture
def toy_project(tmp_path):
    notebooks, params, reports = tmp_path / "notebooks", tmp_path / "params", tmp_path / "reports"
    notebooks.mkdir()
    params.mkdir()
    write_notebook(notebooks / "00_ok.ipynb", ["print(x)"])
    write_notebook(notebooks / "01_fails.ipynb", ["y = x + 1", "raise ValueError('deliberate failure')"])
    (params / "toy.yaml").write_text("title: toy\ncommon: {x: 2}\n")
    env = {"DISENTANGLE_NOTEBOOKS": str(notebooks), "DISENTANGLE_PARAMS": str(params)}
    return params, reports, env


def test_a_failing_notebook_fails_the_run_and_shows_in_the_index(toy_project):
    params, reports, env = toy_project
    (reports / "toy").mkdir(parents=True)
    (reports / "toy" / "01_fails.html").write_text("STALE RESULTS")
    proc = run_report("toy", reports, env)
    assert proc.returncode == 1
    assert re.search(r"01_fails.*cell \d+ \(In \[\d+\]\)", proc.stderr), proc.stderr[-2000:]
    assert "deliberate failure" in proc.stderr
    index = (reports / "toy" / "index.html").read_text()
    assert "FAILED" in index and "deliberate failure" in index
    assert "STALE RESULTS" not in (reports / "toy" / "01_fails.html").read_text()
    state = json.loads((reports / "toy" / "sections.json").read_text())
    assert state["00_ok"]["status"] == "ok" and state["01_fails"]["status"] == "failed"


def test_unknown_profile_keys_are_refused_before_anything_runs(toy_project):
    params, reports, env = toy_project
    (params / "bad.yaml").write_text(textwrap.dedent("""
        title: bad
        common: {x: 2, y: 3}
        sections: {00_ok: {z: 1}, 02_missing: {}}
    """))
    proc = run_report("bad", reports, env)
    assert proc.returncode == 2
    for problem in ("common.y is not a parameter of any notebook", "sections.00_ok.z is not a parameter of 00_ok.ipynb",
                    "sections.02_missing is not a notebook"):
        assert problem in proc.stderr, problem
    assert not (reports / "bad").exists()
    missing = run_report("nope", reports, env)
    assert missing.returncode == 2 and "no profile 'nope'" in missing.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "params").glob("*.yaml")))
def test_every_profile_builds_valid_run_configs(name):
    """Each profile (full included: CI never runs it, no GPU) is accepted by the runner and every run it
    would train is a valid config: sweeps, each capacity size under each constraint, and the bAbI runs."""
    from disentangle.verdicts.babi import data_changes
    from disentangle.config import run_hash
    from disentangle.report.run import all_sections, load_profile, plan
    from disentangle.study import ARMS, Study

    planned = plan(name, load_profile(name), all_sections())
    seen = set()  # sections mostly share the profile's common values: check each distinct set once
    for section, p in planned.items():
        key = repr(sorted((k, v) for k, v in p.items() if k != "profile"))
        if not {"model", "data", "train", "seeds", "sweep_weights"} <= set(p) or key in seen:
            continue
        seen.add(key)
        study = Study.from_parameters(model=p["model"], data=p["data"], train=p["train"], seeds=p["seeds"],
                                      sweep_weights=p["sweep_weights"], variants=p.get("variants"))
        configs = [c for constraint in study.sweep_weights for c in study.sweep_configs(constraint)]
        # one baseline per seed shared by every sweep, and one run per (constraint, weight > 0, seed)
        n_weighted = sum(len([w for w in ws if w > 0]) for ws in study.sweep_weights.values())
        assert len({run_hash(c) for c in configs}) == len(study.seeds) * (1 + n_weighted), section
        for axis, sizes in (p.get("axes") or {}).items():
            assert getattr(study.base.model, axis.split(".", 1)[1]) in sizes, f"{name}: {axis} lacks the default size"
            for size in sizes:
                for constraint, weights in study.sweep_weights.items():
                    study.config(constraint, max(weights), 0, **{axis: size})
        if "capacity_arms" in p:
            assert p["capacity_arms"] in ARMS
        if p.get("babi_dir"):
            for constraint, weights in study.sweep_weights.items():
                study.config(constraint, max(weights), 0, **data_changes(p["babi_dir"], p["babi_tasks"],
                                                                         p["babi_max_sentences"], p["babi_steps"]))


def _interrupt_a_real_notebook(toy_project, tmp_path):
    """Run the toy profile, whose 01_slow sleeps in a real kernel; once that cell has started, send SIGINT to
    the runner's process group (what Ctrl-C in a terminal sends). Returns (returncode, stderr, out_dir)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    params, reports, env = toy_project
    marker = tmp_path / "started"
    write_notebook(Path(env["DISENTANGLE_NOTEBOOKS"]) / "01_slow.ipynb",
                   [f"import pathlib, time\npathlib.Path({str(marker)!r}).write_text('in the long cell')\ntime.sleep(300)"])
    (Path(env["DISENTANGLE_NOTEBOOKS"]) / "01_fails.ipynb").unlink()
    out = reports / "toy"
    out.mkdir(parents=True)
    (out / "01_slow.html").write_text("STALE RESULTS")
    (out / "sections.json").write_text(json.dumps({"01_slow": {
        "status": "ok", "seconds": 1.0, "error": None, "html": "01_slow.html", "finished": "earlier"}}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "disentangle.report", "--profile", "toy"], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, **env, "DISENTANGLE_REPORTS": str(reports), "DISENTANGLE_CACHE": str(reports / "cache"),
             "DISENTANGLE_SCREENSHOTS": "0"})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the notebook never reached its long cell"
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stderr, out


def test_ctrl_c_during_a_real_notebook_marks_it_interrupted(toy_project, tmp_path):
    """Case 9 of issue 20 with a real kernel (about 15 s): exit 130, one line of the runner's saying
    "interrupted", and the index keeps no stale "ok" row or link for the interrupted section."""
    returncode, stderr, out = _interrupt_a_real_notebook(toy_project, tmp_path)
    assert returncode == 130, stderr[-2000:]
    mine = [line for line in stderr.splitlines() if line.startswith(("[toy]", "error"))]
    assert len(mine) == 1 and "interrupted in 01_slow" in mine[0], stderr[-2000:]
    state = json.loads((out / "sections.json").read_text())
    assert state["00_ok"]["status"] == "ok" and state["01_slow"]["status"] == "interrupted"
    assert state["01_slow"]["html"] is None and not (out / "01_slow.html").exists()
    index = (out / "index.html").read_text()
    assert "href='01_slow.html'" not in index and "href='00_ok.html'" in index and "interrupted" in index


def test_ctrl_c_during_a_real_notebook_prints_no_traceback(toy_project, tmp_path):
    # The interrupted kernel's own traceback (ZMQError while papermill shuts it down) goes to its log.
    _, stderr, out = _interrupt_a_real_notebook(toy_project, tmp_path)
    assert "Traceback" not in stderr and "IPKernelApp" not in stderr, stderr[-2000:]
    assert (out / "logs" / "01_slow.kernel.log").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "params").glob("*.yaml")))
def test_every_profile_builds_valid_alternative_configs(name):
    """Section 11's arms, settings and sweeps under each profile (full's sweeps included) are valid runs: the
    routed heads fit the profile's heads, every swept value is a valid model, and the default keeps 5 seeds."""
    from disentangle import alternatives as alt
    from disentangle.config import run_hash
    from disentangle.report.run import all_sections, load_profile, plan
    from disentangle.study import Study

    declared = papermill.inspect_notebook(str(REPO / "notebooks" / "11_alternatives.ipynb"))
    p = {**{k: ast.literal_eval(v["default"]) for k, v in declared.items()},  # the notebook's defaults, then the profile's
         **plan(name, load_profile(name), [s for s in all_sections() if s.name == "11_alternatives"])["11_alternatives"]}
    study = Study.from_parameters(model=p["model"], data=p["data"], train={**p["train"], **p.get("alt_train", {})},
                                  seeds=p["alt_seeds"], sweep_weights=p["sweep_weights"], variants=p.get("variants"))
    points = alt.points(p["alt_arms"], p.get("alt_sweeps"), p.get("alt_settings"))
    configs = [alt.config(study, pt, s) for pt in points for s in p["alt_seeds"]]
    assert len({run_hash(c) for c in configs}) == len(configs)  # no point trains another's run
    assert sum(pt.setting == "" for pt in points) == 1 + len(p["alt_arms"])
    if name == "default":
        assert len(p["alt_seeds"]) >= 5 and not p.get("alt_sweeps") and not p.get("alt_train")
        assert alt.config(study, alt.Point("baseline"), 0) == study.config(seed=0)  # the baseline is 01's
    if name == "full":
        assert set(p["alt_sweeps"]) == {"routed_heads", "hopfield", "entmax_alpha"}
