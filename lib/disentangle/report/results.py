"""The numbers notebooks record, and where they live: ``reports/<profile>/results/<section>.json``.

Notebooks write with :class:`Recorder`; the findings notebook, the index page and the smoke tests read
with :func:`read_results`. Kept apart from the runner so a notebook needs nothing of the command line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..paths import REPO

# Overridable so tests can run the pipeline in temporary folders.
REPORTS = Path(os.environ.get("DISENTANGLE_REPORTS", REPO / "reports"))


def results_dir(profile: str) -> Path:
    return REPORTS / profile / "results"


class Recorder:
    """Numbers a notebook records for the index, the findings notebook and the smoke tests.

    ``rec = Recorder("01_baseline", profile)``; ``rec["baseline_acc"] = 0.97`` writes
    ``reports/<profile>/results/01_baseline.json`` at once (values must be JSON-serialisable;
    DataFrames are stored as lists of records).
    """

    def __init__(self, section: str, profile: str):
        self.path = results_dir(profile) / f"{section}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.values: dict[str, Any] = {}
        self.path.write_text("{}")  # nothing stale from an earlier execution survives

    def __setitem__(self, key: str, value: Any) -> None:
        if hasattr(value, "to_dict") and hasattr(value, "columns"):
            value = json.loads(value.to_json(orient="records"))
        self.values[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.values, indent=1, default=float))
        os.replace(tmp, self.path)


def read_results(profile: str, section: str) -> dict[str, Any]:
    path = results_dir(profile) / f"{section}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def resolve_path(path: str) -> str:
    """A path parameter as an absolute path; relative paths are relative to the repository root."""
    if not path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (REPO / p).resolve())


__all__ = ["REPORTS", "Recorder", "read_results", "resolve_path", "results_dir"]
