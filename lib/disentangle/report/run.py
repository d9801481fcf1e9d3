"""Run the ordered notebooks with papermill under a profile and render one self-contained HTML report.

    python -m disentangle.report --profile default            # what `make report` runs
    python -m disentangle.report --profile quick --only 01_baseline 08_findings
    python -m disentangle.report --profile default --babi-dir /data/babi/en-10k

A profile is ``params/<name>.yaml``::

    title: ...                  # shown on the index page
    banner: ...                 # optional warning shown on every page (the quick profile's "not meaningful")
    common: {key: value}        # given to every notebook that declares the parameter
    sections: {01_baseline: {key: value}}   # per-notebook values, overriding common ones

Every key must be a parameter the notebook declares in its ``parameters`` cell; anything else is an
error before anything runs. Executed notebooks, their HTML and the numbers they record go to
``reports/<profile>/``; the index is ``reports/<profile>/index.html``. A failing notebook makes the
runner exit non-zero, naming the notebook and cell; its page shows the traceback and the index shows
the failure (the old, stale page is deleted before each notebook runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..paths import REPO
from .parameters import check as check_parameters
from .progress import SectionProgress
from .results import REPORTS, Recorder, read_results, resolve_path, results_dir  # noqa: F401 (re-exported)

# Overridable so tests can run the pipeline in temporary folders.
NOTEBOOKS = Path(os.environ.get("DISENTANGLE_NOTEBOOKS", REPO / "notebooks"))
PARAMS = Path(os.environ.get("DISENTANGLE_PARAMS", REPO / "params"))
TEMPLATES = Path(__file__).resolve().parent / "templates"
PROFILE_KEYS = ("title", "banner", "description", "common", "sections", "scheduler")
# Parameters whose values are paths: relative ones are taken relative to the repository root, since
# notebooks execute with notebooks/ as their working directory.
PATH_PARAMETERS = ("babi_dir",)


class ProfileError(ValueError):
    """A profile that names unknown notebooks or parameters; lists every problem at once."""


# ------------------------------------------------------------------------------------------ profile


@dataclass
class Section:
    name: str  # e.g. "01_baseline"
    path: Path
    title: str

    @classmethod
    def from_path(cls, path: Path) -> Section:
        nb = json.loads(path.read_text())
        title = path.stem
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                first = "".join(cell["source"]).strip().splitlines()[0]
                title = first.lstrip("#").strip()
                break
        return cls(path.stem, path, title)


def all_sections() -> list[Section]:
    return [Section.from_path(p) for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))]


def load_profile(name: str) -> dict[str, Any]:
    path = PARAMS / f"{name}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in PARAMS.glob("*.yaml"))
        raise ProfileError(f"no profile {name!r}: {path} does not exist (available: {', '.join(available)})")
    try:
        profile = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ProfileError(f"{where}: YAML syntax error: {problem}") from None
    except UnicodeDecodeError as err:
        raise ProfileError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if not isinstance(profile, dict):
        raise ProfileError(f"{path}: a profile is a mapping of {list(PROFILE_KEYS)}, got a {type(profile).__name__}")
    unknown = set(profile) - set(PROFILE_KEYS)
    if unknown:
        raise ProfileError(f"{path}: unknown top-level keys {sorted(unknown)} (allowed: {list(PROFILE_KEYS)})")
    return profile


def _did_you_mean(key: str, allowed) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def declared_parameters(section: Section) -> dict[str, Any]:
    import papermill

    return papermill.inspect_notebook(str(section.path))


def plan(profile_name: str, profile: dict[str, Any], sections: list[Section]) -> dict[str, dict[str, Any]]:
    """Parameters for each of ``sections``; raises ProfileError listing every unknown notebook or key.

    The whole profile is checked against every notebook in notebooks/, also when only some run.
    """
    where = f"params/{profile_name}.yaml"
    every = all_sections()
    by_name = {s.name: s for s in every}
    declared = {s.name: declared_parameters(s) for s in every}
    common = profile.get("common") or {}
    per_section = profile.get("sections") or {}
    problems = [f"{where}: sections.{name} is not a notebook (notebooks: {', '.join(by_name)})"
                for name in per_section if name not in by_name]
    used = set()
    for name, params in per_section.items():
        for key in (params or {}):
            if name in declared and key not in declared[name]:
                problems.append(f"{where}: sections.{name}.{key} is not a parameter of {name}.ipynb"
                                f"{_did_you_mean(key, declared[name])} (parameters: {', '.join(declared[name])})")
    for key in common:
        if any(key in d for d in declared.values()):
            used.add(key)
        else:
            every_key = sorted({k for d in declared.values() for k in d})
            problems.append(f"{where}: common.{key} is not a parameter of any notebook{_did_you_mean(key, every_key)}")
    # Types, against the first notebook that declares each key (the shared keys are declared alike).
    for key, value in common.items():
        owner = next((d for d in declared.values() if key in d), None)
        if owner is not None:
            problems += check_parameters({key: value}, owner, prefix=f"{where}: common.")
    for name, params in per_section.items():
        if name in declared:
            known = {k: v for k, v in (params or {}).items() if k in declared[name]}
            problems += check_parameters(known, declared[name], prefix=f"{where}: sections.{name}.")
    if problems:
        raise ProfileError("\n".join(problems))
    out = {}
    for s in sections:
        params = {k: v for k, v in common.items() if k in declared[s.name]}
        params.update(per_section.get(s.name) or {})
        if "profile" in declared[s.name]:
            params["profile"] = profile_name
        for key in PATH_PARAMETERS:
            if isinstance(params.get(key), str):
                params[key] = resolve_path(params[key])
        out[s.name] = params
    return out


# ---------------------------------------------------------------------------------------- execution


@dataclass
class SectionRun:
    section: Section
    status: str = "not run"  # "ok", "failed"
    seconds: float = 0.0
    error: dict[str, Any] | None = None  # {"cell": index, "ename": ..., "evalue": ...}
    html: str | None = None  # file name of the rendered page, relative to the profile folder
    parameters: dict[str, Any] = field(default_factory=dict)


def _logged_kernel(log: Path) -> type:
    """A kernel manager whose kernel writes its own stdout and stderr to ``log``, not to the console.

    What a kernel prints itself (not a cell's output, which papermill keeps in the notebook) is noise on the
    runner's console: ipykernel's start-up warnings, and after Ctrl-C the traceback of a kernel being shut
    down mid-message (``ZMQError``). The runner's own lines stay the console's; the log is there to read.
    """
    from jupyter_client.manager import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw):
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as handle:  # the kernel keeps its own copy of the descriptor
                kw.setdefault("stdout", handle)
                kw.setdefault("stderr", handle)
                return await super().start_kernel(**kw)

    return LoggedKernelManager


def execute(section: Section, params: dict[str, Any], out_dir: Path) -> SectionRun:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out_nb = out_dir / f"{section.name}.ipynb"
    result = SectionRun(section, parameters=params)
    for stale in (out_nb, out_dir / f"{section.name}.html"):
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(section.path), str(out_nb), parameters=params, kernel_name="python3",
            cwd=str(NOTEBOOKS), progress_bar=False, log_output=False,
            kernel_manager_class=_logged_kernel(out_dir / "logs" / f"{section.name}.kernel.log"),
        )
        result.status = "ok"
    except PapermillExecutionError as err:
        result.status = "failed"
        result.error = {"cell": err.cell_index, "exec_count": err.exec_count, "ename": err.ename, "evalue": err.evalue}
    except Exception as err:  # the kernel died, the notebook could not be read, ...
        result.status = "failed"
        result.error = {"cell": None, "exec_count": None, "ename": type(err).__name__, "evalue": str(err)}
    result.seconds = time.perf_counter() - t0
    return result


def render_html(executed: Path, target: Path, banner: str | None, nav: str) -> None:
    """Executed notebook -> self-contained HTML: figures inline, code folded, nothing fetched online."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="section", extra_template_basedirs=[str(TEMPLATES)])
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    nb = nbformat.read(str(executed), as_version=4)
    body, _ = exporter.from_notebook_node(nb, resources={"report_banner": banner, "report_nav": nav})
    target.write_text(body)


def environment() -> dict[str, str]:
    import torch

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git commit": git("rev-parse", "--short", "HEAD") + dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "platform": platform.platform(),
    }


def _where(error: dict) -> str:
    """Where a notebook failed, as the executed copy numbers it: cell index and execution count."""
    if error.get("cell") is None:
        return "before any cell ran"
    return f"cell {error['cell']} (In [{error.get('exec_count')}])"


def _update_state(out_dir: Path, runs: list[SectionRun]) -> dict[str, dict]:
    path = out_dir / "sections.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    for r in runs:
        state[r.section.name] = {"status": r.status, "seconds": r.seconds, "error": r.error, "html": r.html,
                                 "finished": dt.datetime.now().isoformat(timespec="seconds")}
    path.write_text(json.dumps(state, indent=1))
    return state


def _from_state(section: Section, saved: dict | None) -> SectionRun:
    if saved is None:
        return SectionRun(section, status="not run")
    return SectionRun(section, saved["status"], saved["seconds"], saved["error"], saved["html"])


# ------------------------------------------------------------------------------------------- index

_VERDICT_COLOURS = {"supported": "#d4edda", "not supported": "#f8d7da", "inconclusive": "#fff3cd"}


# Sections whose recorded "findings" rows make up the index's summary table, in this order.
FINDINGS_SECTIONS = ("08_findings", "09_babi", "10_replication", "11_alternatives")


def _fmt_effect(r: dict) -> str:
    from ..verdicts.findings import effect_text  # the findings notebook's tables use the same format

    return effect_text(r.get("effect"), r.get("ci_low"), r.get("ci_high"))


def _findings_blocks(profile_name: str, runs: list[SectionRun]) -> list[dict]:
    """The findings tables' contents, one block per section of FINDINGS_SECTIONS that recorded rows."""
    status = {r.section.name: r.status for r in runs}
    blocks = []
    for section in FINDINGS_SECTIONS:
        if status.get(section) == "failed":
            blocks.append({"section": section, "failed": True})
            continue
        rows = read_results(profile_name, section).get("findings") or []
        if not rows:
            continue
        blocks.append({"section": section, "failed": False, "rows": [
            {"claim": str(r.get("claim")), "verdict": str(r.get("verdict")), "effect": _fmt_effect(r),
             "colour": _VERDICT_COLOURS.get(r.get("verdict"), "#eee"), "measure": str(r.get("measure", "")),
             "detail": str(r["detail"]) if r.get("detail") else ""} for r in rows]})
    return blocks


# The section whose recorded ``arm_summary`` (summary.arm_table) the index draws at its top, and the sections
# whose recorded arms join it (the alternatives of section 11, when it has run).
SUMMARY_SECTION = "07_interpretability"
SUMMARY_EXTRA_SECTIONS = ("11_alternatives",)


def _summary(profile_name: str, blocks: list[dict]) -> dict | None:
    """The index's summary figure as an embedded PNG with its alt text; None before 07 has recorded it."""
    import base64
    import io

    from . import summary

    table = read_results(profile_name, SUMMARY_SECTION).get("arm_summary") or []
    if not table:
        return None
    own, seen = len(table), {str(r.get("constraint")) for r in table}
    for section in SUMMARY_EXTRA_SECTIONS:
        extra = [r for r in read_results(profile_name, section).get("arm_summary") or [] if str(r.get("constraint")) not in seen]
        table = [*table, *extra]
        seen |= {str(r.get("constraint")) for r in extra}
    counts = summary.verdict_counts([r for b in blocks if not b["failed"] for r in b["rows"]])
    fig = summary.figure(table, counts)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return {"png": base64.b64encode(buf.getvalue()).decode("ascii"), "alt": summary.alt_text(table, counts),
            "caption": f"Test accuracy against attention correctness for every arm (recorded by {SUMMARY_SECTION}"
                       + (f"; the alternatives by {', '.join(SUMMARY_EXTRA_SECTIONS)}" if len(table) > own else "") + "), "
                       "and how many findings below have each verdict."}


def write_index(out_dir: Path, profile_name: str, profile: dict, runs: list[SectionRun], env: dict, total: float) -> Path:
    """Render templates/index.html.j2 (autoescaped: every value is text, none is markup)."""
    import jinja2

    templates = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                                   undefined=jinja2.StrictUndefined)
    sections = []
    for r in runs:
        e = r.error or {}
        sections.append({"name": r.section.name, "title": r.section.title, "html": r.html, "status": r.status,
                         # an interrupted section has no error to show: its status says it (not "FAILED ... None")
                         "failed": r.status not in ("ok", "not run", "interrupted"), "where": _where(e),
                         "ename": str(e.get("ename")), "evalue": str(e.get("evalue"))[:300],
                         "seconds": f"{r.seconds:.0f} s"})
    blocks = _findings_blocks(profile_name, runs)
    page = templates.get_template("index.html.j2").render(
        title=profile.get("title") or "Disentangled heads", banner=profile.get("banner"),
        description=profile.get("description") or "", findings=blocks, summary=_summary(profile_name, blocks),
        sections=sections, profile=profile_name, wall_time=f"{total / 60:.1f} min",
        env={k: str(v) for k, v in env.items()})
    path = out_dir / "index.html"
    path.write_text(page)
    return path


def screenshots(out_dir: Path) -> None:
    """Full-page PNGs of the index and every page under ``<out_dir>/screenshots/`` (linked from nowhere), so
    a person can see what a browser shows; skipped, with a note, where Chromium or Playwright is missing.
    ``DISENTANGLE_SCREENSHOTS=0`` skips them (the test suite takes its own, in its temporary folder)."""
    from . import browser

    if os.environ.get("DISENTANGLE_SCREENSHOTS") == "0":
        return
    missing = browser.unavailable()
    if missing:
        print(f"screenshots skipped: {missing}", file=sys.stderr)
        return
    pages = browser.check_pages(out_dir, out_dir / "screenshots")
    problems = [f"{p.name}: {x}" for p in pages for x in p.problems]
    print(f"screenshots: {out_dir / 'screenshots'} ({len(pages)} pages)", flush=True)
    for problem in problems:
        print(f"warning: in the browser, {problem}", file=sys.stderr)


# --------------------------------------------------------------------------------------------- main


def _cache_dir() -> Path:
    from ..train import default_cache_dir

    return default_cache_dir()


def _explicit_dir_problem(path: str) -> str | None:
    """Why a directory the user named explicitly cannot be used, or None."""
    p = Path(resolve_path(path))
    if not p.exists():
        return f"{p} does not exist (give a directory of bAbI v1.2 files, e.g. .../tasks_1-20_v1-2/en)"
    if not p.is_dir():
        return f"{p} is a file, not a directory (give a directory of bAbI v1.2 files, e.g. .../tasks_1-20_v1-2/en)"
    if not os.access(p, os.R_OK | os.X_OK):
        return f"{p} is not readable"
    return None


def declared_default(section: str, key: str) -> Any:
    """The default a notebook's parameters cell gives ``key`` (a literal)."""
    import ast

    return ast.literal_eval(declared_parameters(next(s for s in all_sections() if s.name == section))[key]["default"])


def _babi_files_problem(path: str, tasks) -> str | None:
    """Why the bAbI directory ``path`` lacks what ``tasks`` need (their train and test files), or None."""
    from ..config import ConfigError
    from ..verdicts.babi import babi_dir_problem

    try:
        problem = babi_dir_problem(path, list(tasks))
    except ConfigError:  # bad task ids: the notebook's own check names them; not this path's fault
        return None
    return problem.replace("`", "") if problem else None  # Markdown quotes, not for a console


def _unwritable(dirs: list[Path]) -> str | None:
    """The first of ``dirs`` that cannot be created or written, with the reason; None if all can."""
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write-test.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            return f"cannot write to {d}: {err.strerror or err} (the report writes its pages, results and run cache there)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disentangle.report", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="default", help="params/<PROFILE>.yaml (quick, default, full)")
    parser.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="run only these notebooks (e.g. 01_baseline)")
    parser.add_argument("--babi-dir", help="directory of bAbI v1.2 files for 09_babi (overrides the profile)")
    parser.add_argument("--scheduler", help="train on a dask.distributed cluster: its scheduler, e.g. tcp://host:8786 "
                        "(overrides the profile's `scheduler:` and $DISENTANGLE_SCHEDULER; the cache must be shared)")
    args = parser.parse_args(argv)

    try:
        profile = load_profile(args.profile)
        sections = all_sections()
        if args.only:
            unknown = [n for n in args.only if n not in {s.name for s in sections}]
            if unknown:
                raise ProfileError(f"--only: {unknown} are not notebooks (notebooks: {', '.join(s.name for s in sections)})")
            sections = [s for s in sections if s.name in args.only]
        params = plan(args.profile, profile, sections)
    except ProfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.babi_dir is not None:
        problem = _explicit_dir_problem(args.babi_dir)
        if problem:  # the user's own path: an error, never a skipped section (only the profile's default skips)
            print(f"error: --babi-dir {args.babi_dir}: {problem}", file=sys.stderr)
            return 2
        for name, p in params.items():
            if "babi_dir" in declared_parameters(next(s for s in sections if s.name == name)):
                p["babi_dir"] = resolve_path(args.babi_dir)
                # A directory that exists but lacks the tasks' files would make the section skip itself and
                # report ok: the user's own path must be usable, so check it as the notebook will, now.
                problem = _babi_files_problem(p["babi_dir"], p.get("babi_tasks") or declared_default(name, "babi_tasks"))
                if problem:
                    print(f"error: --babi-dir {args.babi_dir}: {problem} (needed by {name}; only the profile's own "
                          "babi_dir may be skipped)", file=sys.stderr)
                    return 2

    out_dir = REPORTS / args.profile
    problem = _unwritable([out_dir, out_dir / "results", _cache_dir()])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # Kernels inherit the environment: no progress bars in executed notebooks (they would render as
    # stderr blocks in the HTML); they still show when a notebook is run by hand.
    os.environ["TQDM_DISABLE"] = "1"
    # The grids inside the kernels read the scheduler from the environment (cluster.scheduler_address).
    scheduler = args.scheduler or profile.get("scheduler")
    if scheduler:
        os.environ["DISENTANGLE_SCHEDULER"] = str(scheduler)
    banner = profile.get("banner")
    nav = " ".join([f"<a href='index.html'>index</a>"] + [f"<a href='{s.name}.html'>{s.name}</a>" for s in sections])
    runs: list[SectionRun] = []
    t0 = time.perf_counter()
    interrupted = None
    for s in sections:
        try:
            # One console line per section; while it runs, a live line of runs done / total on a terminal.
            with SectionProgress(f"[{args.profile}] {s.name}") as progress:
                r = execute(s, params[s.name], out_dir)
        except KeyboardInterrupt:
            # The section's pages were deleted by execute: record it as interrupted (no page), so the
            # index stays true; finished runs are in the cache and a re-run resumes the others.
            interrupted = SectionRun(s, status="interrupted", parameters=params[s.name])
            runs.append(interrupted)
            break
        executed = out_dir / f"{s.name}.ipynb"
        if executed.exists():
            render_html(executed, out_dir / f"{s.name}.html", banner, nav)
            r.html = f"{s.name}.html"
        if r.status == "ok":
            print(f"[{args.profile}] {s.name} ok ({r.seconds:.0f} s, {progress.summary()})", flush=True)
        else:
            e = r.error or {}
            print(f"[{args.profile}] {s.name} FAILED at {_where(e)}: {e.get('ename')}: {e.get('evalue')}",
                  file=sys.stderr, flush=True)
        runs.append(r)
    total = time.perf_counter() - t0
    # The index lists every section: those not run now keep the state recorded when they last ran.
    state = _update_state(out_dir, runs)
    shown = []
    for s in all_sections():
        now = next((r for r in runs if r.section.name == s.name), None)
        shown.append(now or _from_state(s, state.get(s.name)))
    index = write_index(out_dir, args.profile, profile, shown, environment(), total)
    if interrupted is None:  # after Ctrl-C the user wants out, not a browser started
        screenshots(out_dir)
    print(f"[{args.profile}] report: {index} ({total / 60:.1f} min)")
    if interrupted is not None:
        print(f"[{args.profile}] interrupted in {interrupted.section.name} (marked so in the index): finished runs "
              "are cached; run the same command again to resume", file=sys.stderr, flush=True)
        return 130
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        names = ", ".join(f"{r.section.name} ({_where(r.error or {})})" for r in failed)
        print(f"error: {len(failed)} notebook(s) failed: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
