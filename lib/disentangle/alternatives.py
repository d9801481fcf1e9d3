"""Section 11: the non-constraint routes to disentangled heads on the constraints' bench.

The architectural arms of the registry (routed heads, Hopfield memory, 1.5-entmax and learned-alpha entmax
attention) each change the model of the global layers, not the loss. Each is trained at the setting its
registry entry gives (the most faithful to its published design) over the section's seeds, next to the
baseline with the same seeds (paired), and optionally swept along its own fields::

    pts = points(["routed_heads", "hopfield"], {"routed_heads": {"model.routed_top_k": [1, 2, 4]}})
    runs, results = train(study, pts, seeds=[0, 1, 2, 3, 4])
    frames = model_frames(results, probe_factors=["answer", "queried", "task"])
    models = per_model(runs, frames)       # one row per model: accuracy and every measure, model level

Run frames carry ``constraint`` (the arm's name, "baseline" for the baseline), ``weight`` (NaN: an
architecture has no weight) and ``setting`` ("" at the arm's own setting, e.g. "routed_top_k=2" on a sweep).
Every per-model measure is computed once and kept with its run (``RunResult.derived``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import analysis
from .arms import ARMS as REGISTRY
from .arms import BASELINE, get as get_arm
from .config import ConfigError, RunConfig
from .study import Study, collect_head_frames
from .train import run as cached_run

ALTERNATIVES = tuple(n for n, a in REGISTRY.items() if a.kind == "architecture")
# The fields each arm's sweep may vary (dotted RunConfig fields; the full profile sweeps them).
SWEEPABLE: dict[str, tuple[str, ...]] = {
    "routed_heads": ("model.routed_top_k", "model.shared_heads", "model.routing_balance"),  # k, shared heads
    "hopfield": ("model.hopfield_beta", "model.hopfield_patterns", "model.hopfield_steps"),
    "entmax15": (),
    "entmax_alpha": ("model.entmax_alpha",),
}
HEAD_MEASURES = ("entropy", "entropy_cls", "support_mass_cls", "support_excess_cls", "topk_precision", "sink_mass")
FACTORS = ("kind", "entity", "role")


@dataclass(frozen=True)
class Point:
    """One arm at one setting: ``setting`` is "" at the arm's own setting, else e.g. "routed_top_k=2"."""

    arm: str
    setting: str = ""
    changes: tuple[tuple[str, Any], ...] = ()


def points(arms: Sequence[str], sweeps: Mapping[str, Mapping[str, Sequence]] | None = None,
           settings: Mapping[str, Mapping[str, Any]] | None = None) -> list[Point]:
    """The baseline, each arm at its own setting (the registry's, with ``settings[arm]`` replacing some of
    its fields, e.g. for a model with fewer heads), and each swept value of each arm (a value equal to the
    arm's own setting is that point, not a second one). Every bad name or value is reported at once."""
    problems = [f"arms: {a!r} is not an architectural arm (allowed: {list(ALTERNATIVES)})" for a in arms if a not in ALTERNATIVES]
    settings = dict(settings or {})
    for arm, fields in settings.items():
        if arm not in arms or not isinstance(fields, Mapping):
            problems.append(f"settings: {arm!r} must be one of the arms trained here ({list(arms)}) mapped to dotted fields")
            continue
        problems += [f"settings.{arm}: {name!r} is not a field of this arm (allowed: {list(SWEEPABLE.get(arm, ()))})"
                     for name in fields if name not in SWEEPABLE.get(arm, ())]
    sweeps = dict(sweeps or {})
    for arm, fields in sweeps.items():
        if arm not in arms:
            problems.append(f"sweeps: {arm!r} is not one of the arms trained here ({list(arms)})")
            continue
        if not isinstance(fields, Mapping):
            problems.append(f"sweeps.{arm}={fields!r} must map dotted fields to lists of values")
            continue
        for name, values in fields.items():
            if name not in SWEEPABLE.get(arm, ()):
                problems.append(f"sweeps.{arm}: {name!r} is not swept for this arm (allowed: {list(SWEEPABLE.get(arm, ()))})")
            elif isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                problems.append(f"sweeps.{arm}.{name}={values!r} must be a non-empty list of values")
    if problems:
        raise ConfigError(problems)
    out = [Point(BASELINE)] + [Point(a, "", tuple(settings.get(a, {}).items())) for a in arms]
    for arm, fields in sweeps.items():
        base = tuple(settings.get(arm, {}).items())
        own = RunConfig().replace(**{**get_arm(arm).changes, **dict(base)}).to_dict()
        for name, values in fields.items():
            section, key = name.split(".", 1)
            for v in values:
                if own[section][key] != v:
                    text = f"{key}={v:g}" if isinstance(v, (int, float)) else f"{key}={v}"
                    out.append(Point(arm, text, (*[c for c in base if c[0] != name], (name, v))))
    return out


def config(study: Study, point: Point, seed: int) -> RunConfig:
    """The study's base config with the point's arm on, its sweep changes and ``seed``."""
    changes = {} if point.arm == BASELINE else dict(get_arm(point.arm).changes)
    return study.base.replace(seed=seed, **{**changes, **dict(point.changes)})  # one replace: validated once, as a whole


def train(study: Study, pts: Sequence[Point], seeds: Sequence[int], desc: str = "alternatives",
          alongside: Sequence[RunConfig] = ()):
    """Every point x seed in one grid (cached runs load at once). Returns the run frame (``constraint``,
    ``weight``, ``setting`` columns) and ``[(arm, weight, seed, RunResult)]`` with a parallel list of settings
    under ``results.settings``. ``alongside``: more configs trained in the same grid and not returned (the
    penalty runs of :func:`penalty_configs`): one pool packs all the work, where a second grid of two runs
    after it left a core idle behind the first's tail (~30 s of section 11, measured)."""
    todo = [(p, s, config(study, p, s)) for p in pts for s in seeds]
    runs, _ = study.run([c for *_, c in todo] + list(alongside), desc=desc)
    runs = runs.iloc[:len(todo)].copy()
    runs["constraint"] = [p.arm for p, _, _ in todo]
    runs["weight"] = [0.0 if p.arm == BASELINE else math.nan for p, _, _ in todo]
    runs.insert(3, "setting", [p.setting for p, _, _ in todo])
    results = Results((p.arm, 0.0 if p.arm == BASELINE else math.nan, s, cached_run(c, study.cache_dir)) for p, s, c in todo)
    results.settings = [p.setting for p, _, _ in todo]
    return runs, results


def penalty_configs(study: Study, constraint: str, weight: float, seeds: Sequence[int]) -> list[RunConfig]:
    """``constraint`` at ``weight`` on ``seeds`` with the alternatives' study config."""
    return [study.config(constraint, weight, s) for s in seeds]


def penalty_runs(study: Study, constraint: str, weight: float, seeds: Sequence[int]) -> Results:
    """:func:`penalty_configs` trained or loaded in one grid: the penalty an arm is judged against on the
    alternatives' own seeds, beyond those the constraint sections trained, so the comparison pairs as many
    seeds as the arms have."""
    cfgs = penalty_configs(study, constraint, weight, seeds)
    if cfgs:
        study.run(cfgs, desc=constraint)
    out = Results((constraint, weight, s, cached_run(c, study.cache_dir)) for s, c in zip(seeds, cfgs))
    out.settings = [""] * len(out)
    return out


def control_clusters(study: Study, pts: Sequence[Point]) -> int:
    """The number of k-means clusters the baseline's states are split into as the attractors' control: the
    Hopfield memory's stored patterns at its own setting plus one (the metastable tokens); 0 without it."""
    own = [p for p in pts if p.arm == "hopfield" and p.setting == ""]
    return config(study, own[0], 0).model.hopfield_patterns + 1 if own else 0


def frame(results: Results) -> pd.DataFrame:
    """The run frame of ``results`` (as :func:`train` returns for its own): one row per run."""
    settings = getattr(results, "settings", [""] * len(results))
    rows = [{**r.row(), "constraint": arm, "weight": w, "setting": setting, "seed": seed}
            for (arm, w, seed, r), setting in zip(results, settings)]
    return pd.DataFrame(rows)


class Results(list):
    """``[(arm, weight, seed, RunResult)]`` with ``settings``: each row's setting ("" = the arm's own)."""

    settings: list[str]


# ------------------------------------------------------------------------------------------ per model


def _routing(result) -> pd.DataFrame:
    model, data = result.load_model(), result.data()
    stats = analysis.routing_stats(model, data.splits["test"], data.vocab, tasks=data.tasks)
    cfg = result.config.model
    stats["shared"] = stats["head"] < (cfg.shared_heads if cfg.routed_top_k else 0)
    return stats


def _attractors(result) -> pd.DataFrame:
    model, data = result.load_model(), result.data()
    return analysis.attractor_factors(model, data.splits["test"], data.vocab)


def _zeros(result) -> pd.DataFrame:
    model, data = result.load_model(), result.data()
    return analysis.attention_zeros(model, data.splits["test"])


def _similarity(result) -> pd.DataFrame:
    model, data = result.load_model(), result.data()
    mats = analysis.head_similarity(model, data.splits["test"])
    return pd.DataFrame([{"layer": layer, "similarity": float(m[~np.eye(len(m), dtype=bool)].mean())} for layer, m in mats.items()])


def _alphas(result) -> pd.DataFrame:
    model = result.load_model()
    return pd.DataFrame([{"layer": i, "head": h, "alpha": float(a)} for i, b in enumerate(model.blocks)
                         if b.attn.alpha is not None for h, a in enumerate(b.attn.alpha.tolist())])


def _probes(factors: Sequence[str]):
    def compute(result) -> pd.DataFrame:  # the same computation (and cache entry) as section 07's probes
        m, d = result.load_model(), result.data()
        split = d.splits["test"]
        return analysis.probe_heads(m, split, analysis.story_factors(split), list(factors), max_examples=1000)
    return compute


def _state_clusters(k: int):
    def compute(result) -> pd.DataFrame:
        model, data = result.load_model(), result.data()
        return analysis.state_clusters(model, data.splits["test"], data.vocab, k, seed=result.config.seed)
    return compute


def _derivations(result, arm: str, probe_factors: Sequence[str], control_clusters: int = 0) -> list[tuple[str, Any]]:
    """(derived name, compute) of every per-model frame this model needs, in :func:`model_frames`' order."""
    from .study import _head_frames_of_model

    todo = [("head_frames_v1", _head_frames_of_model), ("attention_zeros_v1", _zeros), ("similarity_offdiag_v1", _similarity)]
    if arm in (BASELINE, "routed_heads"):
        todo.append(("routing_v1", _routing))
    if arm == BASELINE and control_clusters:
        todo.append((f"state_clusters_k{control_clusters}_v1", _state_clusters(control_clusters)))
    if result.config.model.hopfield_patterns:
        todo.append(("attractors_v1", _attractors))
    if result.config.model.attention == "entmax_alpha":
        todo.append(("alphas_v1", _alphas))
    if probe_factors:
        todo.append(("probes_v1", _probes(probe_factors)))
    return todo


def _derive_in_worker(cfg_dict: dict, cache_dir: str | None, arm: str, probe_factors: list[str],
                      control_clusters: int = 0) -> str | None:
    import traceback

    import torch

    torch.set_num_threads(1)
    try:
        result = cached_run(RunConfig.from_dict(cfg_dict), cache_dir)
        for name, compute in _derivations(result, arm, probe_factors, control_clusters):
            result.derived(name, compute)
        return None
    except Exception:
        return traceback.format_exc()


def derive(results: Results, probe_factors: Sequence[str] = (), probe_seeds: Sequence[int] | None = None,
           n_jobs: int | None = None, cache_dir=None, control_clusters: int = 0) -> None:
    """Compute every finished model's per-model frames (see :func:`model_frames`) in ``n_jobs`` worker processes
    (the training pool; one per core by default), so the analyses of many models use every core; each is kept
    with its run, and :func:`model_frames` then only loads them. Probes only for ``probe_seeds`` (None: all).
    ``control_clusters``: the baseline's token states clustered into that many clusters, the control of the
    Hopfield attractors (:func:`analysis.state_clusters`); 0 = none."""
    import os

    from .train import _worker_pool

    todo = []
    for arm, _, seed, result in results:
        if result.status != "finished":
            continue
        factors = list(probe_factors) if probe_seeds is None or seed in probe_seeds else []
        missing = [n for n, _ in _derivations(result, arm, factors, control_clusters) if not (result.path / "derived" / f"{n}.pt").exists()]
        if missing:
            todo.append((result.config.to_dict(), str(cache_dir) if cache_dir else None, arm, factors, control_clusters))
    if not todo:
        return
    n = n_jobs or os.cpu_count() or 1
    if n == 1 or len(todo) == 1:
        errors = [_derive_in_worker(*t) for t in todo]
    else:
        pool = _worker_pool(n)
        errors = [f.result() for f in [pool.submit(_derive_in_worker, *t) for t in todo]]
    errors = [e for e in errors if e]
    if errors:
        raise RuntimeError(f"{len(errors)} per-model analyses failed; the first:\n{errors[0]}")


def model_frames(results: Results, probe_factors: Sequence[str] = (), probe_seeds: Sequence[int] | None = None,
                 control_clusters: int = 0) -> dict[str, pd.DataFrame]:
    """Per-head and per-model frames of every finished model, tagged with ``model``, ``constraint``,
    ``weight``, ``seed`` and ``setting``: ``metrics`` / ``importance`` / ``usage`` (as section 07), ``zeros``
    (exact-zero attention), ``similarity`` (mean off-diagonal head similarity per layer), ``routing`` (the
    baseline and routed models), ``attractors`` (Hopfield models), ``clusters`` (the baseline's token states
    in ``control_clusters`` k-means clusters, the attractors' control), ``alphas`` (learned-alpha models) and
    ``probes`` (when ``probe_factors`` are given; only for ``probe_seeds``, None = every seed)."""
    settings = getattr(results, "settings", [""] * len(results))
    frames = collect_head_frames(results, setting=settings)
    parts: dict[str, list[pd.DataFrame]] = {}

    def add(name: str, frame: pd.DataFrame, arm, weight, seed, setting, result) -> None:
        parts.setdefault(name, []).append(frame.assign(model=result.run_id, constraint=arm, weight=weight, seed=seed, setting=setting))

    for (arm, weight, seed, result), setting in zip(results, settings):
        if result.status != "finished":
            continue
        tags = (arm, weight, seed, setting, result)
        add("zeros", result.derived("attention_zeros_v1", _zeros), *tags)
        add("similarity", result.derived("similarity_offdiag_v1", _similarity), *tags)
        if arm in (BASELINE, "routed_heads"):
            add("routing", result.derived("routing_v1", _routing), *tags)
        if result.config.model.hopfield_patterns:
            add("attractors", result.derived("attractors_v1", _attractors), *tags)
        if arm == BASELINE and control_clusters:
            add("clusters", result.derived(f"state_clusters_k{control_clusters}_v1", _state_clusters(control_clusters)), *tags)
        if result.config.model.attention == "entmax_alpha":
            add("alphas", result.derived("alphas_v1", _alphas), *tags)
        if probe_factors and (probe_seeds is None or seed in probe_seeds):
            add("probes", result.derived("probes_v1", _probes(probe_factors)), *tags)
    frames.update({name: pd.concat(p, ignore_index=True) for name, p in parts.items()})
    return frames


def per_model(runs: pd.DataFrame, frames: Mapping[str, pd.DataFrame], min_gain: float = 0.02) -> pd.DataFrame:
    """One row per finished model: ``model``, ``constraint``, ``setting``, ``seed``, its accuracies (test
    overall and per task, ood) and every measure at model level (the mean over its global heads, or
    layers): the attention measures of :data:`HEAD_MEASURES`, ``zero_share`` (and ``_cls``), ``similarity``,
    ``importance_max`` (the largest accuracy drop one head's ablation causes, any task), ``selectivity_task`` /
    ``selectivity_role`` (mean over routed heads, 0 in a model without routing), ``routing_entropy``,
    ``ami_<factor>`` / ``nmi_<factor>`` / ``purity_<factor>`` and ``ami`` (mean over :data:`FACTORS`), ``metastable``,
    ``control_ami_<factor>`` / ``control_ami`` (baseline models: their clustered states, the attractors' control)
    and the probes' ``disentanglement`` / ``completeness``."""
    finished = runs[runs["status"] == "finished"].rename(columns={"run_id": "model"})
    acc = [c for c in finished.columns if c == "test_acc" or c.startswith("test_acc/") or c == "ood_acc" or c.startswith("ood_acc/")]
    out = finished[["model", "constraint", "setting", "seed", *acc]].drop_duplicates("model").set_index("model")

    def join(values: pd.DataFrame | pd.Series) -> None:
        nonlocal out
        out = out.join(values, how="left")

    m = frames["metrics"]
    join(m[m["task"] == "all"].groupby("model")[list(HEAD_MEASURES)].mean())
    if "importance" in frames:
        imp = frames["importance"]
        join(imp[imp["task"] != "all"].groupby("model")["importance"].max().rename("importance_max"))
    if "zeros" in frames:
        join(frames["zeros"].groupby("model")[["zero_share", "zero_share_cls"]].mean())
    if "similarity" in frames:
        join(frames["similarity"].groupby("model")["similarity"].mean())
    if "routing" in frames:
        r = frames["routing"]
        for by in ("task", "role"):
            sel = r[~r["shared"]].groupby("model", group_keys=False).apply(
                lambda g: analysis.selectivity(g, by=by)["selectivity"].mean(), include_groups=False)
            join(sel.rename(f"selectivity_{by}"))
        overall = r[(r["by"] == "task") & (r["group"] == "all")]
        join(overall.groupby("model")["routing_entropy"].mean())
    if "attractors" in frames:
        a = frames["attractors"].groupby(["model", "factor"])[["ami", "nmi", "purity"]].mean().unstack("factor")
        a.columns = [f"{score}_{factor}" for score, factor in a.columns]
        a["ami"] = a[[f"ami_{f}" for f in FACTORS if f"ami_{f}" in a]].mean(axis=1)
        join(a)
        join(frames["attractors"].groupby("model")[["metastable", "n_attractors"]].mean())
    if "clusters" in frames:  # the control: the same scores for k-means clusters of the baseline's token states
        c = frames["clusters"].groupby(["model", "factor"])["ami"].mean().unstack("factor")
        c.columns = [f"control_ami_{factor}" for factor in c.columns]
        c["control_ami"] = c[[f"control_ami_{f}" for f in FACTORS if f"control_ami_{f}" in c]].mean(axis=1)
        join(c)
    if "probes" in frames:
        dci = analysis.exclusivity_by(frames["probes"], by="model", min_gain=min_gain).set_index("model")
        join(dci[["disentanglement", "completeness"]])
    return out.reset_index()


def summary(models: pd.DataFrame, measures: Sequence[str], by: Sequence[str] = ("constraint", "setting")) -> pd.DataFrame:
    """Mean and 95% t-interval over seeds of each measure per arm (and setting): ``<m>``, ``<m>_ci_low``,
    ``<m>_ci_high`` and ``n`` (models)."""
    from .stats import mean_ci

    rows = []
    for key, g in models.groupby(list(by), sort=False):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for m in measures:
            row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = mean_ci(g[m]) if m in g else (math.nan,) * 3
        row["n"] = len(g)
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["ALTERNATIVES", "FACTORS", "HEAD_MEASURES", "Point", "Results", "SWEEPABLE", "config", "control_clusters", "derive",
           "frame", "model_frames", "penalty_runs", "per_model", "points", "summary", "train"]
