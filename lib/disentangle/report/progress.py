"""Console progress of the report runner: the section, runs finished / total (cached ones counted),
elapsed time and an estimate of what is left, while papermill executes a notebook.

Training happens inside the notebook's kernel, a separate process; ``train.run_grid`` appends its
progress to the file named by ``DISENTANGLE_PROGRESS`` (see ``train.GridProgress``), which this module
polls from a thread while the runner waits on papermill. Progress goes to stderr only, never into the
executed notebooks or their pages. On a terminal it is a live tqdm line; otherwise (CI logs) nothing
while a section runs and one line when it ends (:meth:`SectionProgress.summary`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "DISENTANGLE_PROGRESS"


@dataclass
class Counts:
    total: int = 0  # runs of the grids started so far (a notebook starts its grids one after another)
    done: int = 0  # finished, cached ones included
    cached: int = 0


def read_counts(path: Path) -> Counts:
    """Sum the latest record of every grid in a progress file; a half-written last line is ignored."""
    latest: dict[str, dict] = {}
    try:
        text = path.read_text()
    except OSError:
        return Counts()
    for line in text.splitlines():
        try:
            record = json.loads(line)
            latest[record["grid"]] = record
        except (ValueError, KeyError, TypeError):
            continue
    c = Counts()
    for r in latest.values():
        c.total += int(r["total"])
        c.done += int(r["done"])
        c.cached += int(r["cached"])
    return c


def eta_seconds(counts: Counts, training_seconds: float) -> float | None:
    """Seconds left at the pace of the runs trained so far (cached ones take no time, so they are left out
    of the rate); None before any run has trained, or when nothing is left."""
    trained = counts.done - counts.cached
    left = counts.total - counts.done
    if trained <= 0 or left <= 0 or training_seconds <= 0:
        return None
    return left * training_seconds / trained


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


class SectionProgress:
    """``with SectionProgress("[quick] 02_orthogonality") as p: execute(...)``; then ``p.summary()``."""

    def __init__(self, label: str, stream=None, interval: float = 0.5, live: bool | None = None):
        self.label, self.interval = label, interval
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.counts = Counts()
        self._stop = threading.Event()

    def __enter__(self) -> SectionProgress:
        fd, name = tempfile.mkstemp(prefix="disentangle-progress-", suffix=".jsonl")
        os.close(fd)
        self.path = Path(name)
        self._previous = os.environ.get(ENV)
        os.environ[ENV] = name  # the kernel papermill starts next inherits it
        self.t0 = time.perf_counter()
        self._first_training: float | None = None
        self._bar = None
        if self.live:
            from tqdm import tqdm

            # disable=False: the runner sets TQDM_DISABLE for the kernels, not for its own console line.
            self._bar = tqdm(total=0, desc=self.label, file=self.stream, disable=False, leave=False,
                             bar_format="{desc}: {n}/{total} runs |{bar:20}| {elapsed} elapsed{postfix}")
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._refresh()

    def _refresh(self) -> None:
        counts = read_counts(self.path)
        now = time.perf_counter()
        if self._first_training is None and counts.total > counts.cached:
            self._first_training = now  # the pace counts from the first grid that had runs to train
        self.counts = counts
        if self._bar is not None:
            eta = eta_seconds(counts, now - self._first_training if self._first_training else 0.0)
            self._bar.total, self._bar.n = counts.total, counts.done
            self._bar.set_postfix_str(f"{counts.cached} cached" + (f", ~{_clock(eta)} left" if eta else ""),
                                      refresh=False)
            self._bar.refresh()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._refresh()
        if self._bar is not None:
            self._bar.close()
        if self._previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self._previous
        self.path.unlink(missing_ok=True)
        self.seconds = time.perf_counter() - self.t0

    def summary(self) -> str:
        """``"12/12 runs, 4 cached"`` (or ``"no runs"``), for the section's one line."""
        c = self.counts
        if c.total == 0:
            return "no runs"
        return f"{c.done}/{c.total} runs, {c.cached} cached"
