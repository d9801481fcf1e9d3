"""Shared fixtures. The real bAbI data lives outside the repo (../shared/data/babi, CC BY 3.0)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def babi_root() -> Path:
    return Path(os.environ.get("DISENTANGLE_BABI_ROOT", REPO.parent / "shared" / "data" / "babi"))


@pytest.fixture(scope="session")
def babi_en() -> Path:
    """The 1k bAbI directory. Missing data skips locally but fails in CI, so it is never skipped silently."""
    path = babi_root() / "en"
    if not path.is_dir():
        message = f"real bAbI data not found at {path} (set DISENTANGLE_BABI_ROOT)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def run_report(profile: str, reports: Path, extra_env: dict | None = None, *args: str) -> subprocess.CompletedProcess:
    """The report runner on ``profile`` with its reports and run cache in ``reports`` (never the user's)."""
    env = {**os.environ, "DISENTANGLE_REPORTS": str(reports), "DISENTANGLE_CACHE": str(reports / "cache"),
           **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "disentangle.report", "--profile", profile, *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    """The quick report, rendered once per session: tests/report/test_report.py reads its files and
    numbers, tests/report/test_browser.py opens it in Chromium."""
    reports = tmp_path_factory.mktemp("reports")
    # The browser test takes its own screenshots, in its temporary folder: the runner need not.
    proc = run_report("quick", reports, {"DISENTANGLE_SCREENSHOTS": "0"})
    assert proc.returncode == 0, f"quick report failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    (reports / "quick.stdout").write_text(proc.stdout)  # the console, not a terminal: one line per section
    return reports / "quick"
