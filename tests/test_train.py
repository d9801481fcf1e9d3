"""Training runs: determinism, caching, resume after a kill, corrupted entries, divergence, grids."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest
import torch
from numerics import tol

from disentangle import train as train_mod
from disentangle.config import ConfigError, RunConfig, run_hash
from disentangle.objective import Constraints
from disentangle.train import _batch_indices, lr_at, run, run_grid

TINY = {
    "model": {"d_model": 16, "n_heads": 2, "n_layers": 2, "d_ff": 32},
    "data": {"tasks": ["where_person", "counting"], "n_train": 96, "n_val": 32, "n_test": 32, "n_ood": 16},
    "train": {"steps": 40, "batch_size": 16, "eval_every": 10, "warmup_steps": 5, "lr": 3e-3},
}


def tiny(**changes) -> RunConfig:
    return RunConfig.from_dict(TINY).replace(**changes)


def same_metrics(a: dict, b: dict) -> bool:
    keys = set(a) | set(b)
    return all(a.get(k) == b.get(k) or (isinstance(a.get(k), float) and math.isnan(a[k]) and math.isnan(b[k])) for k in keys)


def test_lr_schedule_known_values():
    cfg = tiny(**{"train.lr": 1.0, "train.warmup_steps": 10, "train.steps": 110, "train.min_lr_ratio": 0.1}).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_batches_are_a_pure_function_of_seed_and_step_and_cover_the_data():
    n, bs = 50, 10
    assert torch.equal(_batch_indices(7, n, bs, seed=3), _batch_indices(7, n, bs, seed=3))
    assert not torch.equal(_batch_indices(7, n, bs, seed=3), _batch_indices(8, n, bs, seed=3))
    assert not torch.equal(_batch_indices(0, n, bs, seed=4), _batch_indices(0, n, bs, seed=3))
    drawn = torch.cat([_batch_indices(s, n, bs, seed=3) for s in range(200)])
    assert drawn.min() >= 0 and drawn.max() < n
    assert set(drawn.tolist()) == set(range(n))  # every example is seen


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    a = run(tiny(), tmp_path / "a")
    b = run(tiny(), tmp_path / "b")
    assert a.status == b.status == "finished"
    assert same_metrics(a.metrics, b.metrics)
    pd.testing.assert_frame_equal(a.history, b.history)
    c = run(tiny(seed=1), tmp_path / "a")
    assert c.metrics["test_ce"] != a.metrics["test_ce"]


def test_cpu_runs_flush_denormals_inside_and_restore_the_process_state(tmp_path, monkeypatch):
    tiny_float = 1e-40  # a float32 denormal: flushed to 0 under flush-to-zero
    seen = []
    real_loop = train_mod._loop

    def spy(*args, **kwargs):
        seen.append(((torch.tensor([tiny_float]) * 1.0).item(), torch.get_num_threads()))
        return real_loop(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_loop", spy)
    threads = torch.get_num_threads()
    run(tiny(), cache_dir=tmp_path, threads=1)
    assert seen == [(0.0, 1)]
    assert (torch.tensor([tiny_float]) * 1.0).item() != 0.0 and torch.get_num_threads() == threads


def test_run_records_every_loss_term_and_final_metrics(tmp_path):
    res = run(tiny(**{"constraints.head_usage": 0.1, "constraints.attention_entropy": 0.05}), tmp_path)
    cols = set(res.history.columns)
    assert {"step", "lr", "train_loss", "train_ce", "train_head_usage", "train_attention_entropy", "val_acc", "val_ce"} <= cols
    assert res.history["step"].tolist() == [10, 20, 30, 40]
    for key in ("test_acc", "test_acc/where_person", "test_acc/counting", "ood_acc", "chance/where_person",
                "measure/attention_entropy", "measure/head_usage"):
        assert key in res.metrics and math.isfinite(res.metrics[key]), key
    # the logged total is CE plus the weighted terms
    h = res.history.iloc[-1]
    # Each logged term is a float32 mean over the 10 steps since the last evaluation; the total adds three.
    total = h["train_ce"] + 0.1 * h["train_head_usage"] + 0.05 * h["train_attention_entropy"]
    assert h["train_loss"] == pytest.approx(total, abs=tol(3 * 10 + 3, abs(total)))
    assert not (res.path / "checkpoint.pt").exists()


def test_early_stopping_waits_for_min_steps(tmp_path):
    # lr 1e-12: updates below float32's resolution of the weights, so validation accuracy never improves after
    # the first evaluation and patience 1 stops at the second
    frozen = {"train.lr": 1e-12, "train.warmup_steps": 0, "train.early_stopping": 1}
    early = run(tiny(**frozen), tmp_path)
    assert early.history["step"].tolist() == [10, 20] and early.info["stopped_early_at_step"] == 20
    floored = run(tiny(**frozen, **{"train.min_steps": 30}), tmp_path)
    assert floored.history["step"].tolist() == [10, 20, 30] and floored.info["stopped_early_at_step"] == 30
    assert run_hash(tiny()) == run_hash(tiny(**{"train.min_steps": 0}))  # the field is out of the hash at its default
    with pytest.raises(ConfigError, match="min_steps=50 must be at most steps=40"):
        tiny(**{"train.min_steps": 50})


def test_finished_runs_load_from_cache(tmp_path):
    first = run(tiny(), tmp_path)
    t0 = time.perf_counter()
    again = run(tiny(), tmp_path)
    assert again.cached and not first.cached
    assert time.perf_counter() - t0 < 1.0
    assert same_metrics(first.metrics, again.metrics)
    model = again.load_model()
    assert model.cfg.vocab_size is not None and not model.training


@pytest.mark.parametrize("damage", ["model", "result", "config"])
def test_corrupted_cache_entry_is_recomputed(tmp_path, damage):
    first = run(tiny(), tmp_path)
    target = {"model": "model.pt", "result": "result.json", "config": "config.json"}[damage]
    path = first.path / target
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # a truncated write
    again = run(tiny(), tmp_path)
    assert not again.cached
    assert same_metrics(first.metrics, again.metrics)


def test_garbage_checkpoint_restarts_from_scratch(tmp_path):
    cfg = tiny()
    run_dir = tmp_path / run_hash(cfg)
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    res = run(cfg, tmp_path)
    assert res.status == "finished" and "resumed_from_step" not in res.info
    assert same_metrics(res.metrics, run(cfg, tmp_path / "fresh").metrics)


def test_killed_run_resumes_to_the_same_final_metrics(tmp_path):
    cfg = tiny(**{"train.steps": 400, "train.eval_every": 20, "constraints.mutual_information": 0.1,
                  "constraints.mi_variant": "club"})
    reference = run(cfg, tmp_path / "reference")
    cache = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import json
        from disentangle.config import RunConfig
        from disentangle.train import run
        run(RunConfig.from_dict(json.loads({json.dumps(json.dumps(cfg.to_dict()))})), {str(cache)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    checkpoint = cache / run_hash(cfg) / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "the run finished before it could be killed; make it longer"
    assert not (cache / run_hash(cfg) / "result.json").exists()
    resumed = run(cfg, cache)
    assert 0 < resumed.info["resumed_from_step"] < cfg.train.steps
    assert same_metrics(reference.metrics, resumed.metrics)
    pd.testing.assert_frame_equal(reference.history, resumed.history)


def test_nan_loss_is_recorded_as_diverged_with_last_finite_metrics(tmp_path, monkeypatch):
    real_loss = Constraints.loss
    calls = {"n": 0}

    def nan_after_25_steps(self, out, padding_mask, model):
        calls["n"] += 1
        total, terms = real_loss(self, out, padding_mask, model)
        return (total + float("nan") if calls["n"] > 25 else total), terms

    monkeypatch.setattr(Constraints, "loss", nan_after_25_steps)
    res = run(tiny(), tmp_path)
    assert res.status == "diverged"
    assert res.info["diverged_at_step"] == 25
    assert res.history["step"].tolist() == [10, 20]
    assert res.metrics["val_acc"] == res.history["val_acc"].iloc[-1]
    assert math.isnan(res.metrics["test_acc"])
    again = run(tiny(), tmp_path)  # a diverged run is a result: cached like a finished one
    assert again.cached and again.status == "diverged"


def test_grid_survives_a_diverging_run(tmp_path):
    good = tiny()
    bad = tiny(**{"train.lr": 1e30, "train.grad_clip": 0.0, "train.warmup_steps": 0})
    runs, history = run_grid([good, bad], tmp_path, n_jobs=1, progress=False)
    assert runs["status"].tolist() == ["finished", "diverged"]
    assert math.isfinite(runs.loc[0, "test_acc"]) and math.isnan(runs.loc[1, "test_acc"])


def test_grid_rows_follow_config_order_and_parallel_equals_sequential(tmp_path):
    configs = [tiny(seed=0), tiny(seed=1), tiny(seed=0)]  # a duplicate runs once
    seq, seq_hist = run_grid(configs, tmp_path / "seq", n_jobs=1, progress=False)
    par, par_hist = run_grid(configs, tmp_path / "par", n_jobs=2, progress=False)
    assert seq["seed"].tolist() == [0, 1, 0]
    assert {"model.d_ff", "constraints.head_usage", "data.tasks", "status", "wall_time", "run_id"} <= set(seq.columns)
    assert seq["run_id"].tolist() == [run_hash(c) for c in configs]
    cols = ["test_acc", "test_ce", "val_acc", "measure/head_usage"]
    pd.testing.assert_frame_equal(seq[cols], par[cols])
    assert set(seq_hist["run_id"]) == set(seq["run_id"])
    assert len(seq_hist) == 3 * 4


def test_grid_reports_every_bad_field_of_every_config_before_training(tmp_path):
    bad = [
        {**TINY, "model": {**TINY["model"], "d_model": 50, "n_heads": 4}},
        {**TINY, "train": {**TINY["train"], "lr": -1, "device": "tpu"}},
    ]
    with pytest.raises(ConfigError) as err:
        run_grid(bad, tmp_path, progress=False)
    text = str(err.value)
    assert "d_model=50 is not divisible by n_heads=4" in text
    assert "lr=-1.0 must be > 0" in text and "device='tpu'" in text
    assert not any(tmp_path.iterdir())


def test_failed_run_is_recorded_when_asked(tmp_path):
    too_short = tiny(**{"model.max_len": 8})
    runs, _ = run_grid([tiny(), too_short], tmp_path, n_jobs=1, progress=False, on_error="record")
    assert runs["status"].tolist() == ["finished", "failed"]
    assert "max_len=8" in runs.loc[1, "error"]
    with pytest.raises(RuntimeError, match="1 of 2 runs failed"):
        run_grid([tiny(), too_short], tmp_path, n_jobs=1, progress=False)


def test_derived_results_are_computed_once_and_recomputed_when_damaged(tmp_path):
    res = run(tiny(), tmp_path)
    calls = []

    def compute(r):
        calls.append(1)
        return {"n_params": r.load_model().num_params()}

    first = res.derived("params", compute)
    again = run(tiny(), tmp_path).derived("params", compute)
    assert first == again == {"n_params": res.metrics["params"]} and len(calls) == 1
    (res.path / "derived" / "params.pt").write_bytes(b"garbage")
    assert res.derived("params", compute) == first and len(calls) == 2


def test_interrupting_a_parallel_grid_stops_its_workers(tmp_path, monkeypatch):
    """KeyboardInterrupt while waiting: the pool's workers are terminated, nothing trains in the background."""
    from disentangle import train as T

    def interrupted(futures):
        raise KeyboardInterrupt
        yield  # pragma: no cover

    monkeypatch.setattr(T, "as_completed", interrupted)
    configs = [tiny(seed=s, **{"train.steps": 4000}) for s in range(3)]
    with pytest.raises(KeyboardInterrupt):
        run_grid(configs, tmp_path, n_jobs=2, progress=False)
    assert 2 not in T._POOLS
    time.sleep(1.0)
    assert not any((tmp_path / run_hash(c) / "result.json").exists() for c in configs)
