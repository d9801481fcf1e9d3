"""One run from a frozen config (fit, evaluate, checkpoint, resume), cached by config hash; and grids.

    result = run(cfg)                    # trains, or loads the finished run from reports/cache/<hash>/
    runs, history = run_grid(configs)    # one progress bar; a row per run, a row per evaluation

A run's folder ``<cache>/<run_hash(cfg)>/`` holds:

* ``config.json``     the full config and the code version it was trained with;
* ``checkpoint.pt``   model, optimiser, schedule, RNG states, constraint state and history so far
                      (written atomically every ``eval_every`` steps; removed when the run ends);
* ``history.csv``     one row per evaluation (train losses since the last evaluation, val metrics);
* ``model.pt``        final weights;
* ``result.json``     written last: status, final metrics and the checksum of ``model.pt``.

A folder whose ``result.json`` is missing, unreadable, for another config or whose ``model.pt`` does not
match its checksum is not trusted: the run resumes from ``checkpoint.pt`` if that loads, else restarts.

Statuses: ``finished``; ``diverged`` (the loss became NaN or infinite: training stops, the last finite
metrics are kept, test metrics are NaN); ``failed`` (an exception, recorded by ``run_grid`` only when
asked to, never cached).

Reproducibility: seeds are set in one place (:func:`seed_everything`); batch order is a pure function of
(seed, epoch), so a resumed run replays exactly the batches an uninterrupted one would. On CPU each run
uses ``threads`` intra-op threads (default 1: grids parallelise across runs instead, and a fixed thread
count keeps float reductions, hence results, identical between sequential and parallel grids).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
import multiprocessing as mp

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import cluster
from .config import CODE_VERSION, ConfigError, DataConfig, RunConfig, flatten, run_hash
from .constraints import MEASURE_CAPTURES, measure
from .objective import Constraints
from .data import Split, TaskData, iter_batches
from .data import build as build_data
from .paths import REPO
from .model import Encoder

STATUSES = ("finished", "diverged", "failed")


def default_cache_dir() -> Path:
    """``$DISENTANGLE_CACHE`` if set, else ``reports/cache`` of this checkout (or of the working directory)."""
    env = os.environ.get("DISENTANGLE_CACHE")
    if env:
        return Path(env)
    return REPO / "reports" / "cache"


def seed_everything(seed: int) -> None:
    """The one place seeds are set: Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"train.device={name!r} but CUDA is not available here (use 'auto' or 'cpu')"])
    return torch.device(name)


@contextmanager
def _cpu_settings(threads: int | None) -> Iterator[None]:
    """Intra-op threads (None leaves them alone) and flush-to-zero of denormal floats, for one CPU run.

    Why flush denormals: a strong attention-entropy penalty drives attention rows towards one-hot, and the
    softmax's near-zero probabilities and their gradients fall into the denormal range, where x86 float
    arithmetic is many times slower: at weight 3 a default run took 42.5 s instead of 27.9 s (same test
    accuracy to 3 decimals; weights differ in the last bits, hence CODE_VERSION 4). Restored afterwards.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


def progress_bar(**kwargs):
    """tqdm's notebook widget when ipywidgets is installed, its text bar otherwise (tqdm.auto would warn).

    The report runner sets TQDM_DISABLE=1, so rendered pages carry no progress bars.
    """
    if os.environ.get("TQDM_DISABLE"):  # an explicit disable=False would otherwise override it
        kwargs["disable"] = True
    try:
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm
    return tqdm(**kwargs)


class GridProgress:
    """Appends a grid's progress to the file named by ``DISENTANGLE_PROGRESS``, when set (by the report runner).

    Notebooks run in papermill kernels, separate processes whose stderr is captured into the executed
    notebook, so a bar drawn here would never reach the runner's console. A file the runner polls is the
    narrowest channel: no sockets, nothing in the rendered pages, and nothing at all when the variable is
    unset (a notebook run by hand shows its tqdm bar instead). One JSON line per update, appended with a
    single write: ``{"grid": id, "desc", "total", "cached", "done"}``; ``done`` counts cached runs too.
    """

    def __init__(self, desc: str, total: int, cached: int):
        self.path = os.environ.get("DISENTANGLE_PROGRESS")
        self.record = {"grid": f"{os.getpid()}-{time.time_ns()}", "desc": desc, "total": total, "cached": cached,
                       "done": cached}
        self._write()

    def update(self) -> None:
        self.record["done"] += 1
        self._write()

    def _write(self) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(self.record) + "\n")


# ---------------------------------------------------------------------------------------------- data


@lru_cache(maxsize=4)
def _data_in_memory(data_json: str, cache_dir: str) -> TaskData:
    cfg = DataConfig.from_dict(json.loads(data_json))
    key = hashlib.sha256(f"{CODE_VERSION}:{data_json}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / "data" / f"{key}.pt"
    if path.exists():
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # a partial or stale file: rebuild it
            path.unlink(missing_ok=True)
    built = build_data(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(built, path)
    return built


def load_data(cfg: DataConfig, cache_dir: str | Path | None = None) -> TaskData:
    """The data of a config, built once and then shared through memory and the on-disk cache."""
    return _data_in_memory(json.dumps(cfg.to_dict(), sort_keys=True), str(cache_dir or default_cache_dir()))


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: Encoder, split: Split, tasks: Sequence[str], batch_size: int = 500) -> dict[str, float]:
    """Accuracy and cross-entropy over a split, overall and per task (keys ``acc``, ``ce``, ``acc/<task>``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, losses, task_ids = [], [], []
    for b in iter_batches(split, batch_size, device):
        logits = model(b["tokens"], b["padding_mask"], segments=b["segments"]).logits.float()
        correct.append((logits.argmax(-1) == b["answers"]).cpu())
        losses.append(F.cross_entropy(logits, b["answers"], reduction="none").cpu())
        task_ids.append(b["task_ids"].cpu())
    model.train(was_training)
    correct_t, loss_t, tid = torch.cat(correct).float(), torch.cat(losses), torch.cat(task_ids)
    out = {"acc": correct_t.mean().item(), "ce": loss_t.mean().item()}
    for i, task in enumerate(tasks):
        sel = tid == i
        if sel.any():
            out[f"acc/{task}"] = correct_t[sel].mean().item()
    return out


@torch.no_grad()
def measure_split(model: Encoder, split: Split, batch_size: int = 250) -> dict[str, float]:
    """Every constraint's own measure on a split (size-weighted mean over batches), for any model."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for b in iter_batches(split, batch_size, device):
        out = model(b["tokens"], b["padding_mask"], capture=MEASURE_CAPTURES, segments=b["segments"])
        for k, v in measure(out, b["padding_mask"], model).items():
            totals[k] = totals.get(k, 0.0) + v * len(b["tokens"])
    model.train(was_training)
    return {k: v / len(split) for k, v in totals.items()}


# ------------------------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    config: RunConfig
    run_id: str
    path: Path
    status: str
    metrics: dict[str, float]
    history: pd.DataFrame
    wall_time: float  # seconds of training and evaluation, summed over resumptions
    cached: bool = False  # loaded from a finished cache entry, nothing trained now
    error: str | None = None
    info: dict = field(default_factory=dict)  # e.g. {"resumed_from_step": 400, "diverged_at_step": 12}

    def load_model(self, device: str | torch.device = "cpu") -> Encoder:
        """The final model, in eval mode."""
        state = torch.load(self.path / "model.pt", map_location=device, weights_only=False)
        model = Encoder(state["model_config"]).to(device)
        model.load_state_dict(state["weights"])
        return model.eval()

    def data(self) -> TaskData:
        return load_data(self.config.data, self.path.parent)

    def derived(self, name: str, compute):
        """A result derived from this run (e.g. head metrics), computed once and kept in the run's folder.

        ``compute(result)`` must be deterministic; its value is pickled to ``derived/<name>.pt``. The
        folder goes with the run: a retrained run (new hash or corrupted entry) recomputes it. Change
        ``name`` when the computation changes.
        """
        path = self.path / "derived" / f"{name}.pt"
        if path.exists():
            try:
                return torch.load(path, weights_only=False)
            except Exception:  # a partial write: recompute
                path.unlink(missing_ok=True)
        value = compute(self)
        path.parent.mkdir(exist_ok=True)
        _atomic_save(value, path)
        return value

    def row(self) -> dict:
        """One tidy row: flattened config, final metrics, status and bookkeeping."""
        return {
            "run_id": self.run_id,
            **flatten(self.config.to_dict()),
            "status": self.status,
            **self.metrics,
            "wall_time": self.wall_time,
            "cached": self.cached,
            "error": self.error,
        }


def _tmp_path(path: Path) -> Path:
    # Unique per writer: parallel workers may write the same file (e.g. a shared data cache entry).
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _atomic_save(obj, path: Path) -> None:
    # Through a file object: torch.save(obj, <path>) records the file's (here the temporary, pid-named) stem
    # as the archive's name inside the zip, so identical weights gave different bytes and model_sha256s.
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config_record(cfg: RunConfig, run_id: str) -> dict:
    return {"run_id": run_id, "code_version": CODE_VERSION, "config": cfg.to_dict()}


def _load_finished(cfg: RunConfig, run_id: str, run_dir: Path) -> RunResult | None:
    """The cached result if every part of the entry checks out, else None."""
    try:
        record = json.loads((run_dir / "config.json").read_text())
        result = json.loads((run_dir / "result.json").read_text())
        if record != _config_record(cfg, run_id) or result.get("status") not in STATUSES:
            return None
        if result.get("model_sha256") and _sha256(run_dir / "model.pt") != result["model_sha256"]:
            return None
        # A run that diverged before its first evaluation has no history file.
        history_path = run_dir / "history.csv"
        if "history_sha256" in result:
            if result["history_sha256"] is None:
                if history_path.exists():
                    return None
            elif _sha256(history_path) != result["history_sha256"]:
                return None
        history = pd.read_csv(history_path) if history_path.exists() else pd.DataFrame()
        if "history_sha256" not in result and not _history_matches(history, result["metrics"]):
            # An entry written before history.csv had a checksum: verified against the final metrics instead
            # (result.json holds the last evaluation's val_/train_ values); a cut file fails and is retrained.
            return None
    except (OSError, ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    metrics = {k: (float("nan") if v is None else v) for k, v in result["metrics"].items()}
    return RunResult(cfg, run_id, run_dir, result["status"], metrics, history, result["wall_time"], cached=True, info=result.get("info", {}))


def _history_matches(history: pd.DataFrame, metrics: dict) -> bool:
    """Whether the last row of ``history`` holds the final val_/train_ metrics of ``result.json``."""
    keys = [k for k in metrics if k.startswith(("val_", "train_"))]
    if not keys:
        return True
    if not len(history) or any(k not in history.columns for k in keys):
        return False
    last = history.iloc[-1]
    for k in keys:
        want, got = metrics[k], last[k]
        if want is None:
            if not pd.isna(got):
                return False
        elif pd.isna(got) or not math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-12):
            return False
    return True


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batch_indices(step: int, n: int, batch_size: int, seed: int, order: str = "iid") -> torch.Tensor:
    """Batch ``step``, a pure function of (seed, step), so a resumed run replays exactly the batches of an
    uninterrupted one.

    ``order="iid"``: ``batch_size`` indices drawn uniformly with replacement. Why not an epoch-wise permutation
    (random reshuffling)? On these tasks it was consistently worse: over 4 seeds, 3200 steps, the baseline
    reached 0.78 mean val accuracy on where_person with per-epoch permutations and 0.94 with i.i.d. batches
    (closing note of issue 6). We keep what works and flag it.
    ``order="epochs"``: a shuffled data loader (the original study's): epoch e = step // ceil(n / batch_size)
    is a fresh permutation of the n examples cut into batches, the last one holding the n mod batch_size left.
    """
    if order == "iid":
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randint(0, n, (batch_size,), generator=g)
    per_epoch = -(-n // batch_size)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 500_009 + epoch)  # another stream than the iid batches'
    return torch.randperm(n, generator=g)[k * batch_size : (k + 1) * batch_size]


def _optimizer(model: Encoder, cfg) -> torch.optim.AdamW:
    # Decay matrices (projections, embeddings); not biases and LayerNorm gains (nanoGPT's rule), unless
    # weight_decay_on="all" (the original study's AdamW over every parameter).
    every = cfg.weight_decay_on == "all"
    decay = [p for p in model.parameters() if p.dim() >= 2 or every]
    no_decay = [p for p in model.parameters() if p.dim() < 2 and not every]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters; at these sizes ~5x faster than the per-tensor loop (~12% of a step)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), fused=True)


def run(
    cfg: RunConfig,
    cache_dir: str | Path | None = None,
    *,
    progress: bool = False,
    threads: int | None = 1,
    force: bool = False,
) -> RunResult:
    """Train one config (or load it from the cache) and return its result.

    ``force`` discards any cache entry. ``threads`` sets torch's intra-op threads on CPU for the run
    (None leaves them alone); results are bit-reproducible for a given thread count.
    """
    cache = Path(cache_dir or default_cache_dir())
    run_id = run_hash(cfg)
    run_dir = cache / run_id
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    finished = _load_finished(cfg, run_id, run_dir)
    if finished is not None:
        return finished
    # One trainer per run at a time, whatever process or machine it is on (two reports on one checkout,
    # a cluster task rescheduled while its first worker still runs): the second waits, then loads the
    # run the first finished ("first finished wins"). flock is released by the OS if the holder dies.
    with _run_lock(cache, run_id):
        finished = _load_finished(cfg, run_id, run_dir)
        if finished is not None:
            return finished
        return _train_or_resume(cfg, run_id, run_dir, cache, progress, threads)


@contextmanager
def _run_lock(cache: Path, run_id: str) -> Iterator[None]:
    locks = cache / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / run_id, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train_or_resume(cfg: RunConfig, run_id: str, run_dir: Path, cache: Path, progress: bool, threads: int | None) -> RunResult:
    data = load_data(cfg.data, cache)
    if resolve_device(cfg.train.device).type != "cpu":
        return _loop(_prepare(cfg, run_id, run_dir, cache, data), progress)
    with _cpu_settings(threads):
        return _loop(_prepare(cfg, run_id, run_dir, cache, data), progress)


def _prepare(cfg: RunConfig, run_id: str, run_dir: Path, cache: Path, data: TaskData) -> _Training:
    """A run's folder made ready (``config.json``) and its :class:`_Training` set up, resumed from the
    folder's checkpoint when that is valid. The caller holds the run's lock."""
    # Anything but a valid checkpoint in an unfinished folder is debris from a crash: start clean.
    checkpoint = None
    if run_dir.exists():
        try:
            checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
            if checkpoint.get("run_id") != run_id:
                checkpoint = None
        except Exception:
            checkpoint = None
        if checkpoint is None:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(json.dumps(_config_record(cfg, run_id), indent=2), run_dir / "config.json")
    run = _Training(cfg, run_id, run_dir, data)
    if checkpoint is not None:
        run.resume(checkpoint)
    return run


class _Training:
    """One run's training, in the named steps :func:`_loop` (or a stack, :mod:`disentangle.stack`) strings together: set up (model, optimiser,
    constraints, from the run's seed), :meth:`resume` from a checkpoint, :meth:`step` (one optimiser step;
    False when the loss is not finite), :meth:`evaluate_and_checkpoint` (validation row, early stopping,
    checkpoint; True to stop) and :meth:`finish` (final metrics and the result files).

    The loop state (``step``, ``rows``, ``elapsed``, ``best_val``, ``since_best``) is exactly what a
    checkpoint saves, so a killed run resumes to bit-identical numbers.
    """

    def __init__(self, cfg: RunConfig, run_id: str, run_dir: Path, data: TaskData):
        tc = cfg.train
        self.cfg, self.tc, self.run_id, self.run_dir, self.data = cfg, tc, run_id, run_dir, data
        self.device = resolve_device(tc.device)
        if cfg.model.max_len < data.max_len:
            raise ConfigError([f"model.max_len={cfg.model.max_len} is shorter than the longest input ({data.max_len} tokens); raise it"])
        self.model_cfg = cfg.model.replace(vocab_size=len(data.vocab), n_classes=len(data.answers))
        seed_everything(cfg.seed)  # before anything draws from the RNG: the model, then the constraints' state
        self.model = Encoder(self.model_cfg).to(self.device)
        self.constraints = Constraints(cfg.constraints, self.model_cfg, device=self.device)
        self.opt = _optimizer(self.model, tc)
        use_amp = tc.amp == "bf16" or (tc.amp == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_amp else nullcontext
        self.step_no, self.rows, self.elapsed, self.best_val, self.since_best = 0, [], 0.0, -1.0, 0
        self.info: dict = {}
        self.status = "finished"
        self.running: dict[str, float] = {}
        self.n_running = 0
        self.t0 = time.perf_counter()

    def resume(self, checkpoint: dict) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.opt.load_state_dict(checkpoint["optimizer"])
        self.constraints.load_state_dict(checkpoint["constraints"])
        torch.set_rng_state(checkpoint["rng_cpu"])
        if self.device.type == "cuda" and checkpoint.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng_cuda"], self.device)
        self.step_no, self.rows, self.elapsed = checkpoint["step"], checkpoint["history"], checkpoint["elapsed"]
        self.best_val, self.since_best = checkpoint["best_val"], checkpoint["since_best"]
        self.info["resumed_from_step"] = self.step_no

    def _diverged(self) -> None:
        self.status = "diverged"
        self.info["diverged_at_step"] = self.step_no

    def step(self) -> bool:
        """One optimiser step on the run's next batch; False (and status ``diverged``) if the loss is not finite."""
        tc, model, constraints = self.tc, self.model, self.constraints
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step_no, tc)
        train = self.data.splits["train"]
        b = train.batch(_batch_indices(self.step_no, len(train), tc.batch_size, self.cfg.seed, tc.batch_order))
        b = {k: v.to(self.device) for k, v in b.items()}
        with self.autocast():
            out = model(b["tokens"], b["padding_mask"], capture=constraints.captures, segments=b["segments"])
            ce = F.cross_entropy(out.logits.float(), b["answers"])
            penalty, terms = constraints.loss(out, b["padding_mask"], model)
            loss = ce + penalty
        if not torch.isfinite(loss):
            self._diverged()
            return False
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip, foreach=True)
        self.opt.step()
        constraints.auxiliary_step(out, b["padding_mask"])
        self.last = {"loss": loss.detach(), "ce": ce.detach()}
        for k, v in {"loss": loss.item(), "ce": ce.item(), **terms}.items():
            self.running[k] = self.running.get(k, 0.0) + float(v)
        self.n_running += 1
        self.step_no += 1
        return True

    def due(self) -> bool:
        return self.step_no % self.tc.eval_every == 0 or self.step_no == self.tc.steps

    def evaluate_and_checkpoint(self) -> bool:
        """A validation row (train losses averaged since the last one), early stopping, and a checkpoint
        unless the run is about to finish. True when training stops here (diverged or stopped early)."""
        tc, step = self.tc, self.step_no
        val = evaluate(self.model, self.data.splits["val"], self.data.tasks)
        row = {"step": step, "lr": lr_at(step - 1, tc), **{f"train_{k}": v / self.n_running for k, v in self.running.items()},
               **{f"val_{k}": v for k, v in val.items()}}
        if not all(math.isfinite(v) for v in row.values()):
            self._diverged()
            return True
        self.rows.append(row)
        self.running, self.n_running = {}, 0
        improved = val["acc"] > self.best_val
        self.best_val, self.since_best = (val["acc"], 0) if improved else (self.best_val, self.since_best + 1)
        stop_early = tc.early_stopping > 0 and self.since_best >= tc.early_stopping and step >= tc.min_steps
        if stop_early:
            self.info["stopped_early_at_step"] = step
        if step < tc.steps and not stop_early:
            _atomic_save({
                "run_id": self.run_id, "step": step, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "constraints": self.constraints.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "history": self.rows, "elapsed": self.elapsed + time.perf_counter() - self.t0,
                "best_val": self.best_val, "since_best": self.since_best,
            }, self.run_dir / "checkpoint.pt")
            pd.DataFrame(self.rows).to_csv(self.run_dir / "history.csv", index=False)
        return stop_early

    def finish(self) -> RunResult:
        """Final metrics (test, OOD and constraint measures for a finished run), then ``model.pt``,
        ``history.csv`` and, last, ``result.json``, whose presence marks the run as done."""
        model, data, rows, run_dir = self.model, self.data, self.rows, self.run_dir
        history = pd.DataFrame(rows)
        metrics: dict[str, float] = {f"chance/{t}": c for t, c in data.chance("test").items()}
        metrics["steps_done"] = self.step_no
        metrics["params"] = model.num_params()
        if rows:
            metrics.update({k: v for k, v in rows[-1].items() if k.startswith(("val_", "train_"))})
            metrics["best_val_acc"] = self.best_val
        if self.status == "finished":
            model.eval()
            metrics.update({f"test_{k}": v for k, v in evaluate(model, data.splits["test"], data.tasks).items()})
            if "ood" in data.splits:
                metrics.update({f"ood_{k}": v for k, v in evaluate(model, data.splits["ood"], data.tasks).items()})
            measures = measure_split(model, data.splits["test"])
            metrics.update({f"measure/{k}": v for k, v in measures.items()})
        else:
            metrics["test_acc"] = float("nan")
        wall = self.elapsed + time.perf_counter() - self.t0
        _atomic_save({"model_config": self.model_cfg, "weights": model.state_dict()}, run_dir / "model.pt")
        if rows:
            history.to_csv(run_dir / "history.csv", index=False)
        else:
            (run_dir / "history.csv").unlink(missing_ok=True)
        json_metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        _atomic_write_text(json.dumps({
            "status": self.status, "metrics": json_metrics, "wall_time": wall, "info": self.info,
            "model_sha256": _sha256(run_dir / "model.pt"),
            "history_sha256": _sha256(run_dir / "history.csv") if rows else None, "device": str(self.device),
            "torch": torch.__version__, "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
        }, indent=2), run_dir / "result.json")
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
        return RunResult(self.cfg, self.run_id, run_dir, self.status, metrics, history, wall, cached=False, info=self.info)


def _loop(run: _Training, progress: bool) -> RunResult:
    """Train one run to its end (the solo engine): the loop over :class:`_Training`'s steps."""
    cfg = run.cfg
    run.t0 = time.perf_counter()  # wall time counts training, not set-up
    bar = progress_bar(total=cfg.train.steps, initial=run.step_no, desc=run.run_id, leave=False) if progress else None
    run.model.train()
    while run.step_no < cfg.train.steps:
        if not run.step():
            break
        if bar is not None:
            bar.update(1)
        if run.due() and run.evaluate_and_checkpoint():
            break
    if bar is not None:
        bar.close()
    return run.finish()


# ------------------------------------------------------------------------------------------- grids


def _run_in_worker(cfg_dicts: list[dict], cache_dir: str, threads: int | None) -> list[tuple[str, str | None]]:
    """Train one work item of a grid: a single run, or a stack (:mod:`disentangle.stack`); an error fails
    every run of its item."""
    from .stack import train_stack

    cfgs = [RunConfig.from_dict(d) for d in cfg_dicts]
    try:
        if len(cfgs) == 1:
            run(cfgs[0], cache_dir, threads=threads)
            return [(run_hash(cfgs[0]), None)]
        return train_stack(cfgs, cache_dir, threads)
    except Exception:
        error = traceback.format_exc()
        return [(run_hash(c), error) for c in cfgs]


def stacking_default() -> bool:
    """Whether grids stack runs when ``run_grid(stacked=None)``: yes, unless ``$DISENTANGLE_STACKED`` is 0."""
    value = os.environ.get("DISENTANGLE_STACKED", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes"):
        raise ConfigError([f"DISENTANGLE_STACKED={value!r} must be 1 (stack runs, the default) or 0 (one run at a time)"])
    return value in ("1", "true", "yes")


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _worker_pool(n_jobs: int) -> ProcessPoolExecutor:
    """One pool of ``n_jobs`` spawned workers per process, kept across grids: starting a worker (a fresh
    interpreter importing torch) costs seconds, and a notebook calls run_grid many times. Spawned, not
    forked: forking a process whose torch thread pools are initialised can deadlock."""
    pool = _POOLS.get(n_jobs)
    if pool is None or getattr(pool, "_broken", False):
        pool = _POOLS[n_jobs] = ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker)
    return pool


def _stop_pool(n_jobs: int) -> None:
    pool = _POOLS.pop(n_jobs, None)
    if pool is not None:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)


def _init_worker() -> None:
    # An interrupt meant for the notebook (e.g. papermill stopping its kernel) also reaches the idle
    # workers of its process group; they stop anyway when their parent does (sentinel at exit, or EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker is one core's worth, like its torch thread: numpy's BLAS too (sklearn's probe fits spread over
    # threads that fight the other workers ran 15-27x slower, see analysis.probe_representations).
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)


def _failed(cfg: RunConfig, cache: Path, error: str) -> RunResult:
    run_id = run_hash(cfg)
    return RunResult(cfg, run_id, cache / run_id, "failed", {"test_acc": float("nan")}, pd.DataFrame(), 0.0, error=error)


def _validate_all(configs: Sequence[RunConfig | dict]) -> list[RunConfig]:
    """Build every config, raising one ConfigError that lists the bad fields of all of them."""
    built, problems = [], []
    for i, c in enumerate(configs):
        try:
            built.append(c if isinstance(c, RunConfig) else RunConfig.from_dict(c))
        except ConfigError as err:
            problems += [f"config[{i}] {p}" for p in err.problems]
    if problems:
        raise ConfigError(problems)
    return built


def run_grid(
    configs: Sequence[RunConfig],
    cache_dir: str | Path | None = None,
    *,
    n_jobs: int | None = None,
    threads: int | None = 1,
    progress: bool = True,
    on_error: str = "raise",
    desc: str = "runs",
    scheduler: str | None = None,
    stacked: bool | None = None,
    max_stack: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run (or load) every config; return ``(runs, history)`` as tidy DataFrames.

    ``runs``: one row per config, in the given order: ``run_id``, flattened config columns
    (``model.d_ff``, ``constraints.head_usage``, ...), final metrics, ``status``, ``wall_time``.
    ``history``: one row per (run, evaluation step).

    Configs are all validated before anything trains. Finished runs load from the cache; the others
    train in ``n_jobs`` worker processes (default: one per CPU core on CPU, 1 with CUDA). A diverged
    run is a row with status ``diverged``. Any other exception is raised after the remaining runs
    finish (``on_error="raise"``) or recorded as a ``failed`` row (``on_error="record"``).

    Workers are spawned processes, so a *script* that calls this with ``n_jobs > 1`` needs the usual
    ``if __name__ == "__main__":`` guard (notebooks and pytest need nothing).

    ``scheduler`` (or ``$DISENTANGLE_SCHEDULER``): the address of a ``dask.distributed`` scheduler; the
    runs are then submitted to its workers through Dask's executor (:mod:`disentangle.cluster`), with the
    cache on a file system they all see; ``n_jobs`` is then the cluster's business.

    ``stacked`` (default True, or ``$DISENTANGLE_STACKED``): runs that share every shape train together, as one
    stacked step (:mod:`disentangle.stack`), at most ``max_stack`` to a stack; each stack is one work item for
    the worker processes or the cluster (``max_stack`` default: ``$DISENTANGLE_MAX_STACK``, else no cap on a CPU
    and what the free memory holds on CUDA, :func:`disentangle.stack.default_max_runs`). False trains one
    run per work item, as before stacking.
    """
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error={on_error!r} is not one of ['raise', 'record']")
    configs = _validate_all(configs)
    cache = Path(cache_dir or default_cache_dir())
    unique = {run_hash(c): c for c in configs}
    results: dict[str, RunResult] = {}
    todo = []
    for run_id, cfg in unique.items():
        cached = _load_finished(cfg, run_id, cache / run_id)
        if cached is not None:
            results[run_id] = cached
        else:
            todo.append(cfg)
    address = cluster.scheduler_address(scheduler)
    remote = cluster.executor(address, cache) if address and todo else None  # checks the workers first
    if n_jobs is None:
        n_jobs = 1 if torch.cuda.is_available() else (os.cpu_count() or 1)
    n_jobs = max(1, min(n_jobs, len(todo)))
    if n_jobs > 1 or remote is not None:  # build each dataset once, here, rather than once per worker
        for data_cfg in {c.data for c in todo}:
            load_data(data_cfg, cache)

    if stacked is None:
        stacked = stacking_default()
    if stacked and todo:
        from .stack import default_max_runs, plan

        items = plan(todo, getattr(remote, "n_workers", 1) if remote is not None else n_jobs, max_stack or default_max_runs(todo[0]))
    else:
        items = [[cfg] for cfg in todo]
    bar = progress_bar(total=len(unique), initial=len(results), desc=desc, disable=not progress)
    grid_progress = GridProgress(desc, len(unique), len(results))
    errors: dict[str, str] = {}

    def record(outcomes: list[tuple[str, str | None]]) -> None:
        for run_id, err in outcomes:
            if err:
                errors[run_id] = err
            bar.update(1)
            grid_progress.update()

    if n_jobs == 1 and remote is None:
        for item in items:
            record(_run_in_worker([c.to_dict() for c in item], str(cache), threads))
    else:
        # Spawned workers: forking a process whose torch thread pools are initialised can deadlock.
        pool = remote or _worker_pool(n_jobs)
        futures = [pool.submit(_run_in_worker, [c.to_dict() for c in item], str(cache), threads) for item in items]
        try:
            for fut in as_completed(futures):
                record(fut.result())
        except KeyboardInterrupt:
            # Workers ignore SIGINT (see _init_worker): stop them here, so an interrupted notebook does not
            # go on training in the background. Finished runs are cached; running ones resume from checkpoints.
            if remote is not None:
                for fut in futures:
                    fut.cancel()
            else:
                _stop_pool(n_jobs)
            raise
    bar.close()
    for cfg in todo:
        run_id = run_hash(cfg)
        if run_id in errors:
            results[run_id] = _failed(cfg, cache, errors[run_id])
        else:
            results[run_id] = _load_finished(cfg, run_id, cache / run_id)
            results[run_id].cached = False  # trained by this call
    if errors and on_error == "raise":
        first = next(iter(errors.values()))
        raise RuntimeError(f"{len(errors)} of {len(unique)} runs failed; first error:\n{first}")

    ordered = [results[run_hash(c)] for c in configs]
    runs = pd.DataFrame([r.row() for r in ordered])
    histories = [r.history.assign(run_id=r.run_id) for r in ordered if len(r.history)]
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    return runs, history
