"""Overhead of the Dask path against the local process pool, on the quick profile's sweep grid.

The same configs (every constraint × weight × seed of ``params/quick.yaml``: 32 configs, 26 distinct runs) are trained twice
from an empty cache: by ``run_grid`` on the local pool of one process per core, and on a
``LocalCluster`` with as many single-threaded worker processes. Same machine, same runs, same numbers
(checked); printed: wall time of each and their ratio. Cluster start-up is timed apart.

    .venv/bin/python benchmarks/bench_cluster.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import yaml

from disentangle.study import Study
from disentangle.train import run_grid


def main() -> None:
    from distributed import LocalCluster

    common = yaml.safe_load((Path(__file__).resolve().parents[1] / "params" / "quick.yaml").read_text())["common"]
    study = Study.from_parameters(common["model"], common["data"], common["train"], common["seeds"], common["sweep_weights"],
                                  common["variants"])
    configs = [c for name in study.sweep_weights for c in study.sweep_configs(name)]
    n = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        local, _ = run_grid(configs, Path(tmp) / "local", n_jobs=n, progress=False)
        t_local = time.perf_counter() - t
        t = time.perf_counter()
        with LocalCluster(n_workers=n, threads_per_worker=1, dashboard_address=None, silence_logs=40) as lc:
            t_start = time.perf_counter() - t
            t = time.perf_counter()
            remote, _ = run_grid(configs, Path(tmp) / "dask", progress=False, scheduler=lc.scheduler_address)
            t_dask = time.perf_counter() - t
    same = local[["run_id", "test_acc", "test_ce"]].equals(remote[["run_id", "test_acc", "test_ce"]])
    print(f"{len(local)} configs ({local['run_id'].nunique()} distinct runs) of the quick profile's sweeps, {n} workers; identical numbers: {same}")
    print(f"  local pool     {t_local:7.1f} s")
    print(f"  dask cluster   {t_dask:7.1f} s   {t_dask / t_local:.2f}x the local pool's time (cluster start-up {t_start:.1f} s apart)")


if __name__ == "__main__":
    main()
