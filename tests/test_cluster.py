"""Grids on a Dask cluster: the same numbers as the local pool, surviving a worker killed mid-run,
and clear errors before anything trains."""

import os
import signal
import threading
import time

import pandas as pd
import pytest

from disentangle import cluster
from disentangle.config import RunConfig, run_hash
from disentangle.train import run_grid

distributed = pytest.importorskip("distributed")  # installed by `make test` (the [cluster] extra)

TINY = {
    "model": {"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32},
    "data": {"tasks": ["where_person", "counting"], "n_train": 96, "n_val": 32, "n_test": 32, "n_ood": 16},
    "train": {"steps": 40, "batch_size": 16, "eval_every": 10, "warmup_steps": 5, "lr": 3e-3},
}
METRICS = ["test_acc", "test_ce", "val_acc", "ood_acc", "measure/head_usage"]


def grid(steps: int = 40) -> list[RunConfig]:
    base = RunConfig.from_dict(TINY).replace(**{"train.steps": steps})
    return [base.replace(seed=s, **{"constraints.head_usage": w}) for s in (0, 1) for w in (0.0, 0.1)]


@pytest.fixture(scope="module")
def local_cluster():
    """Two worker processes, one thread each, like the local pool on this machine."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as lc:
        yield lc


def test_a_cluster_gives_the_numbers_of_the_local_pool(tmp_path, local_cluster):
    configs = grid()
    local, local_hist = run_grid(configs, tmp_path / "local", n_jobs=2, progress=False)
    remote, remote_hist = run_grid(configs, tmp_path / "dask", progress=False, scheduler=local_cluster.scheduler_address)
    assert (remote["status"] == "finished").all()
    pd.testing.assert_frame_equal(local[["run_id", *METRICS]], remote[["run_id", *METRICS]])
    cols = ["run_id", "step", "train_loss", "val_acc"]
    key = ["run_id", "step"]
    pd.testing.assert_frame_equal(local_hist[cols].sort_values(key, ignore_index=True),
                                  remote_hist[cols].sort_values(key, ignore_index=True))


def test_a_worker_killed_mid_run_costs_only_steps_since_its_checkpoint(tmp_path, local_cluster):
    configs = grid(steps=400)  # long enough to be killed in the middle, checkpoints every 10 steps
    reference, _ = run_grid(configs, tmp_path / "reference", n_jobs=2, progress=False)
    cache = tmp_path / "dask"
    killed: list[int] = []

    def kill_a_worker_mid_run() -> None:
        # Wait until some run has a checkpoint (it is in the middle of training), then SIGKILL its worker.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if any(cache.glob("*/checkpoint.pt")):
                pids = [f["pid"] for f in cluster.check_workers(cluster.client(local_cluster.scheduler_address), cache)]
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_mid_run, daemon=True)
    killer.start()
    runs, _ = run_grid(configs, cache, progress=False, scheduler=local_cluster.scheduler_address)
    killer.join()
    assert killed, "no run reached a checkpoint: the kill never happened"
    assert (runs["status"] == "finished").all()
    # Bit-identical to the uninterrupted grid: a resumed run continues exactly where its checkpoint was.
    pd.testing.assert_frame_equal(reference[["run_id", *METRICS]], runs[["run_id", *METRICS]])
    finished_before = {run_hash(c): (cache / run_hash(c) / "result.json").stat().st_mtime_ns for c in configs}
    again, _ = run_grid(configs, cache, progress=False, scheduler=local_cluster.scheduler_address)
    assert again["run_id"].tolist() == runs["run_id"].tolist()
    # Nothing finished is trained again: every result file is the one written the first time.
    assert {r: (cache / r / "result.json").stat().st_mtime_ns for r in finished_before} == finished_before


def test_an_unreachable_scheduler_is_named_before_anything_trains(tmp_path):
    with pytest.raises(cluster.ClusterError, match=r"scheduler='tcp://127.0.0.1:9' is unreachable"):
        run_grid(grid()[:1], tmp_path, progress=False, scheduler="tcp://127.0.0.1:9")
    assert not any(tmp_path.glob("*/config.json"))  # nothing started


def test_a_cache_the_workers_cannot_write_is_named(tmp_path, local_cluster):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(cluster.ClusterError, match=r"cannot write the cache .*file"):
        cluster.check_workers(cluster.client(local_cluster.scheduler_address), blocked / "cache")


def test_the_scheduler_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv(cluster.ENV, raising=False)
    assert cluster.scheduler_address(None) is None
    monkeypatch.setenv(cluster.ENV, "tcp://h:8786")
    assert cluster.scheduler_address(None) == "tcp://h:8786"
    assert cluster.scheduler_address("tcp://other:1") == "tcp://other:1"
