"""Grids on a Dask cluster: ``run_grid``'s units of work submitted through Dask's own executor.

A run is a pure function of its frozen config whose result lands in a cache folder named by its hash,
so a cluster needs no scheduler of ours: a ``dask.distributed`` scheduler, workers that can import
this package, and a cache directory every worker sees (``DISENTANGLE_CACHE`` on a shared file system).

    DISENTANGLE_SCHEDULER=tcp://host:8786 make report     # or --scheduler, or a `scheduler:` profile key

What Dask gives and this module uses, rather than re-implementing: ``Client.get_executor`` (a
``concurrent.futures`` executor, so ``run_grid`` drives the local pool and a cluster with the same
code) and its task retries; a worker lost in the middle of a run has its task rescheduled on another
worker by the scheduler, and the run resumes there from its last checkpoint (``train.run``). Two
workers that end up on the same run never corrupt its folder: ``train.run`` holds a per-run file lock
for the whole run, so the second waits, then finds the run finished and loads it ("first finished
wins", and nothing is trained twice to completion).

Before anything trains, :func:`executor` checks what can be checked and names it: an unreachable
scheduler, a worker that cannot import the package or has another ``CODE_VERSION``, a cache path a
worker cannot write.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from pathlib import Path

ENV = "DISENTANGLE_SCHEDULER"
RETRIES = 3  # per run, on top of the rescheduling of tasks whose worker died
_CLIENTS: dict[str, object] = {}


class ClusterError(RuntimeError):
    """The cluster cannot run this grid; the message says what and where."""


def scheduler_address(explicit: str | None = None) -> str | None:
    """The scheduler to use: ``explicit`` (a ``--scheduler`` option or profile key), else ``$DISENTANGLE_SCHEDULER``,
    else None (the local process pool)."""
    return explicit or os.environ.get(ENV) or None


def _worker_facts(cache: str) -> dict:
    """Run on each worker: its package version, CODE_VERSION and whether it can write the cache."""
    import tempfile

    facts: dict = {"pid": os.getpid()}
    try:
        from disentangle.config import CODE_VERSION

        facts["code_version"] = CODE_VERSION
    except Exception as err:  # the package is missing or broken on this worker
        facts["import_error"] = f"{type(err).__name__}: {err}"
        return facts
    try:
        Path(cache).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, prefix=".write-check-"):
            pass
    except OSError as err:
        facts["cache_error"] = f"{type(err).__name__}: {err}"
    return facts


def client(address: str, timeout: float = 10.0):
    """A connected ``distributed.Client`` for ``address`` (kept for the process, like the local pool)."""
    try:
        from distributed import Client
    except ImportError as err:
        raise ClusterError(f"scheduler={address!r} needs dask.distributed: pip install -e '.[cluster]' ({err})") from None
    c = _CLIENTS.get(address)
    if c is not None and getattr(c, "status", "") == "running":
        return c
    try:
        c = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise ClusterError(f"scheduler={address!r} is unreachable ({type(err).__name__}: {err}); is `dask scheduler` running there?") from None
    _CLIENTS[address] = c
    return c


def check_workers(c, cache: Path) -> list[dict]:
    """Every worker's facts; a :class:`ClusterError` naming each worker that cannot train this grid."""
    from .config import CODE_VERSION

    facts = c.run(_worker_facts, str(cache))
    if not facts:
        raise ClusterError(f"the scheduler at {c.scheduler.address} has no workers: start some with `dask worker {c.scheduler.address}`")
    problems = []
    for worker, f in sorted(facts.items()):
        if "import_error" in f:
            problems.append(f"worker {worker} cannot import disentangle ({f['import_error']}): install the package there")
        elif f["code_version"] != CODE_VERSION:
            problems.append(f"worker {worker} has CODE_VERSION {f['code_version']}, this process {CODE_VERSION}: install the same checkout")
        elif "cache_error" in f:
            problems.append(f"worker {worker} cannot write the cache {cache} ({f['cache_error']}): point DISENTANGLE_CACHE at a shared, writable directory")
    if problems:
        raise ClusterError("; ".join(problems))
    return list(facts.values())


def executor(address: str, cache: Path) -> Executor:
    """A ``concurrent.futures`` executor on the cluster at ``address`` (Dask's own, with task retries),
    after :func:`check_workers`. Its ``n_workers`` (the workers seen now) sizes the grid's stacks, as the
    worker processes do on one machine."""
    c = client(address)
    workers = check_workers(c, cache)
    ex = c.get_executor(retries=RETRIES, pure=False)
    ex.n_workers = len(workers)
    return ex


__all__ = ["ENV", "ClusterError", "check_workers", "client", "executor", "scheduler_address"]
