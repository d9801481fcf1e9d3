"""Console progress of the runner: what run_grid writes for it and how the runner reads and shows it."""

import io
import os

from disentangle.report.progress import ENV, Counts, SectionProgress, eta_seconds, read_counts
from disentangle.train import GridProgress


def test_grid_progress_writes_nothing_without_the_runner(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    GridProgress("runs", 3, 1).update()
    assert list(tmp_path.iterdir()) == []


def test_counts_sum_the_latest_record_of_each_grid(monkeypatch, tmp_path):
    path = tmp_path / "progress.jsonl"
    monkeypatch.setenv(ENV, str(path))
    first = GridProgress("sweeps", 4, 1)  # one cached run: done starts at 1
    first.update()
    second = GridProgress("chosen arms", 3, 3)  # all cached
    with open(path, "a") as f:
        f.write('{"grid": "half-writ')  # a line being written when the runner reads
    assert read_counts(path) == Counts(total=7, done=5, cached=4)
    for _ in range(2):
        first.update()
    assert read_counts(path) == Counts(total=7, done=7, cached=4)
    assert second.record["done"] == 3


def test_the_estimate_counts_only_trained_runs():
    assert eta_seconds(Counts(total=10, done=6, cached=4), training_seconds=20.0) == 40.0  # 2 trained in 20 s, 4 left
    assert eta_seconds(Counts(total=10, done=4, cached=4), training_seconds=20.0) is None  # nothing trained yet
    assert eta_seconds(Counts(total=10, done=10, cached=4), training_seconds=20.0) is None  # nothing left


def test_section_progress_collects_what_the_kernel_writes_and_cleans_up(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with SectionProgress("[quick] 02_orthogonality", stream=io.StringIO(), live=False) as p:
        path = os.environ[ENV]  # what the kernel inherits
        grid = GridProgress("sweeps", 5, 2)
        for _ in range(3):
            grid.update()
    assert ENV not in os.environ and not os.path.exists(path)
    assert p.counts == Counts(total=5, done=5, cached=2)
    assert p.summary() == "5/5 runs, 2 cached"


def test_not_a_terminal_prints_nothing_while_running(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    stream = io.StringIO()  # not a tty
    with SectionProgress("[quick] 01_baseline", stream=stream) as p:
        GridProgress("runs", 2, 0).update()
    assert stream.getvalue() == "" and not p.live


def test_a_terminal_gets_a_live_line(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what the runner sets for the kernels must not hide its own line
    stream = io.StringIO()
    with SectionProgress("[quick] 01_baseline", stream=stream, live=True):
        grid = GridProgress("runs", 4, 1)
        grid.update()
    shown = stream.getvalue()
    assert "[quick] 01_baseline: 2/4 runs" in shown and "1 cached" in shown and "elapsed" in shown
