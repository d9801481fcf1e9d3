"""The study's experiments, defined once so every notebook asks for the same runs (same hash, one cache).

    study = Study.from_parameters(model=..., data=..., train=..., seeds=[0, 1, 2],
                                  sweep_weights={...}, variants={...})
    runs, history = study.baseline()              # unconstrained, one run per seed
    runs, history = study.sweeps()                # every constraint x weight x seed (weight 0 = baseline)
    chosen = study.chosen_weights()               # one weight per constraint, computed from the sweeps
    runs, _ = study.capacity({"model.d_ff": [64, 128, 256]})

Run frames get two extra columns: ``constraint`` (the active constraint, or "baseline") and ``weight``.
"""

from __future__ import annotations

import math

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .arms import ARMS as REGISTRY
from .arms import constraint_names
from .arms import get as get_arm
from .arms import label as get_label
from .config import ConfigError, RunConfig, flatten
from .stats import mean_ci
from .train import run_grid

CONSTRAINTS = constraint_names()
# which constraints the capacity grid grows beyond the default size (Study.capacity)
ARMS = ("all", "costly", "costliest")
# The config field holding each constraint's variant, and its allowed values (from the registry).
VARIANT_FIELDS = {a.name: (a.variant_field, a.variants) for a in REGISTRY.values() if a.variant_field}


def constraint_of(cfg: RunConfig) -> tuple[str, float]:
    """(name, weight) of the run's active constraint; (name, NaN) for an architectural arm (it has no weight);
    ("baseline", 0.0) when neither is on."""
    active = cfg.constraints.active()
    if not active:
        arch = architecture_of(cfg)
        return (arch, math.nan) if arch else ("baseline", 0.0)
    if len(active) > 1:
        return "+".join(sorted(active)), float("nan")
    (name, weight), = active.items()
    return name, weight


def _by_sure_cost(chosen: pd.DataFrame, margin: float) -> dict[str, float]:
    """The costly constraints of ``chosen`` (chosen weight costs >= ``margin`` of mean test accuracy), surest
    cost first, with that cost: the baseline's mean minus the upper end of the arm's accuracy interval (the
    mean with one seed, no interval)."""
    cost = dict(zip(chosen["constraint"], chosen["test_acc"] - chosen["baseline_acc"]))
    costly = [c for c, v in cost.items() if v <= -margin]
    upper = {r.constraint: r.ci_high if np.isfinite(r.ci_high) else r.test_acc for r in chosen.itertuples()}
    sure_cost = {c: float(chosen.loc[chosen["constraint"] == c, "baseline_acc"].iloc[0]) - upper[c] for c in costly}
    return dict(sorted(sure_cost.items(), key=lambda kv: kv[1], reverse=True))


def _chance(runs: pd.DataFrame) -> float:
    """Mean over tasks of majority-class test accuracy (the same for every run of one data config)."""
    return float(np.nanmean(runs.filter(like="chance/").iloc[0].to_numpy(dtype=float)))


def architecture_of(cfg: RunConfig) -> str | None:
    """The architectural arm the run's model is (e.g. "entmax15"), "a+b" for several, None for the plain
    encoder. An arm is on when a field it changes is set: a choice (a string, like ``model.attention``) to
    the arm's value, a number (like ``model.routed_top_k``) to anything but its default, so that the arm's
    sweep points and other sizes (a 4-head model's top-k, no shared heads) are the arm too."""
    have, default = flatten(cfg.to_dict()), flatten(RunConfig().to_dict())
    on = [a.name for a in REGISTRY.values() if a.kind == "architecture" and any(
        have[k] == v if isinstance(v, str) else have[k] != default[k] for k, v in a.changes.items())]
    return "+".join(sorted(on)) if on else None


def _seed_problems(seeds) -> list[str]:
    """Problems with a ``seeds`` parameter: a non-empty list of distinct integers (duplicates would train one
    run and count it twice, giving n=2 and a zero-width interval)."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        return [f"seeds={seeds!r} must be a list of integers, e.g. [0, 1, 2]"]
    if not seeds:
        return ["seeds is empty: give at least one seed"]
    problems = [f"seeds[{i}]={s!r} must be an integer" for i, s in enumerate(seeds)
                if isinstance(s, bool) or not isinstance(s, int)]
    if not problems:
        dups = sorted({s for s in seeds if list(seeds).count(s) > 1})
        if dups:
            problems.append(f"seeds={list(seeds)!r} has duplicates {dups}: each seed must appear once")
    return problems


def _weight_problems(name: str, weights) -> list[str]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        return [f"{name}={weights!r} must be a list of numbers >= 0"]
    problems = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            problems.append(f"{name}[{i}]={w!r} must be a number >= 0")
        elif not math.isfinite(w):
            problems.append(f"{name}[{i}]={w!r} must be a finite number >= 0")
        elif w < 0:
            problems.append(f"{name}[{i}]={w!r} must be >= 0")
    return problems

@dataclass
class Study:
    base: RunConfig  # every run is this config with one constraint and/or one size changed
    seeds: tuple[int, ...]
    sweep_weights: dict[str, tuple[float, ...]]  # per constraint; 0.0 (the baseline) is always included
    variants: dict[str, str] = field(default_factory=dict)  # e.g. {"orthogonality": "outputs", "mutual_information": "infonce"}
    n_jobs: int | None = None  # parallel training processes (None = one per CPU core)
    cache_dir: Path | None = None
    # Weights added above the top of a sweep while its top weight still meets the choice rule (each one step
    # of the sweep's own spacing), so that a chosen weight is bracketed by a larger one that fails: without it
    # the "largest weight that keeps half the gain" may only be the largest one tried. 0 = the sweep as given.
    sweep_bracket: int = 0
    _chosen: dict[float, pd.DataFrame] = field(default_factory=dict, init=False, repr=False, compare=False)
    _bracketed: set = field(default_factory=set, init=False, repr=False, compare=False)

    @classmethod
    def from_parameters(
        cls,
        model: Mapping,
        data: Mapping,
        train: Mapping,
        seeds: Sequence[int],
        sweep_weights: Mapping[str, Sequence[float]],
        variants: Mapping[str, str] | None = None,
        constraints: Mapping | None = None,
        n_jobs: int = 0,
        cache_dir: str | Path | None = None,
        sweep_bracket: int = 0,
    ) -> Study:
        """Build from notebook parameters; every problem (config fields, constraint names) is reported at once."""
        problems = []
        try:
            base = RunConfig.from_dict({"model": dict(model), "data": dict(data), "train": dict(train),
                                        "constraints": dict(constraints or {})})
        except ConfigError as err:
            problems += err.problems
            base = None
        problems += _seed_problems(seeds)
        if not isinstance(sweep_weights, Mapping):
            problems.append(f"sweep_weights={sweep_weights!r} must be a mapping of constraint name to a list of weights")
            sweep_weights = {}
        problems += [f"sweep_weights: {c!r} is not a constraint (allowed: {list(CONSTRAINTS)})" for c in sweep_weights if c not in CONSTRAINTS]
        for c, ws in sweep_weights.items():
            problems += _weight_problems(f"sweep_weights.{c}", ws)
        for c, v in (variants or {}).items():
            if c not in VARIANT_FIELDS:
                problems.append(f"variants: {c!r} has no variants (allowed: {list(VARIANT_FIELDS)})")
            elif v not in VARIANT_FIELDS[c][1]:
                problems.append(f"variants.{c}={v!r} is not one of {list(VARIANT_FIELDS[c][1])}")
        if isinstance(sweep_bracket, bool) or not isinstance(sweep_bracket, int) or sweep_bracket < 0:
            problems.append(f"sweep_bracket={sweep_bracket!r} must be an integer >= 0 (weights added above a sweep's top)")
        if problems:
            raise ConfigError(problems)
        weights = {c: tuple(sorted({0.0, *map(float, ws)})) for c, ws in sweep_weights.items()}
        seeds = list(seeds)
        return cls(base, tuple(seeds), weights, dict(variants or {}), n_jobs or None, Path(cache_dir) if cache_dir else None,
                   sweep_bracket)

    # ------------------------------------------------------------------------------------ configs

    def config(self, constraint: str | None = None, weight: float = 0.0, seed: int = 0, **changes) -> RunConfig:
        """The base config with one constraint at ``weight`` (and its variant), a seed and any dotted changes.

        A weight of 0 gives exactly the baseline config whatever the constraint, so sweeps share the
        baseline's cached runs.
        """
        cfg = self.base.replace(seed=seed, **changes)
        if constraint is None or constraint == "baseline" or weight == 0:
            return cfg
        if constraint not in CONSTRAINTS:
            raise ConfigError([f"constraint={constraint!r} is not one of {['baseline', *CONSTRAINTS]}"])
        return get_arm(constraint).apply(cfg, weight, self.variants.get(constraint))

    def run(self, configs: Sequence[RunConfig], desc: str = "runs") -> tuple[pd.DataFrame, pd.DataFrame]:
        """``run_grid`` plus ``constraint`` and ``weight`` columns."""
        runs, history = run_grid(configs, self.cache_dir, n_jobs=self.n_jobs, desc=desc)
        labels = [constraint_of(c) for c in configs]
        runs.insert(1, "constraint", [name for name, _ in labels])
        runs.insert(2, "weight", [w for _, w in labels])
        if len(history):
            meta = runs[["run_id", "constraint", "weight", "seed"]].drop_duplicates("run_id")
            history = history.merge(meta, on="run_id", how="left")
        else:  # every run diverged before its first evaluation: no rows, but the columns callers select on
            history = history.reindex(columns=[*history.columns, *[c for c in ("run_id", "step", "constraint", "weight", "seed")
                                                                   if c not in history]])
        return runs, history

    # -------------------------------------------------------------------------------- experiments

    def baseline(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self.run([self.config(seed=s) for s in self.seeds], desc="baseline")

    def sweep_configs(self, constraint: str) -> list[RunConfig]:
        """The sweep's runs as they stand (with the weights :meth:`bracket` added once it has run)."""
        if constraint not in self.sweep_weights:
            raise ConfigError([f"no sweep_weights for {constraint!r} (have: {list(self.sweep_weights)})"])
        return [self.config(constraint, w, s) for w in self.sweep_weights[constraint] for s in self.seeds]

    def bracket(self, constraints: Sequence[str] | None = None, retain: float = 0.5) -> None:
        """Train the sweeps of ``constraints`` (default: all) and, up to ``sweep_bracket`` times, add a weight
        above the top of each sweep whose top weight still meets the choice rule (:meth:`_choose`), one step
        of the sweep's own spacing up (the ratio of its two largest weights; 10 for a single weight), until a
        weight fails the rule. Rounds train every sweep that grows in one grid. Deterministic: the same runs
        decide the same weights, so every notebook's study extends its sweeps alike."""
        todo = [c for c in (constraints or list(self.sweep_weights)) if c not in self._bracketed]
        added = dict.fromkeys(todo, 0)
        while todo:
            runs, _ = self.run([cfg for c in todo for cfg in self.sweep_configs(c)], desc="sweeps")
            runs["weight"] = [cfg.constraints.active().get(c, 0.0) for c in todo for cfg in self.sweep_configs(c)]
            runs["sweep"] = [c for c in todo for _ in self.sweep_configs(c)]
            chance = _chance(runs)
            grow = []
            for c in todo:
                weights = [w for w in self.sweep_weights[c] if w > 0]
                row = self._choose(c, runs[runs["sweep"] == c], chance, retain)
                if (row is not None and added[c] < self.sweep_bracket and row["weight"] == max(weights)
                        and row["retained"] >= retain):
                    step = weights[-1] / weights[-2] if len(weights) > 1 else 10.0
                    self.sweep_weights[c] = (*self.sweep_weights[c], float(f"{weights[-1] * step:.6g}"))
                    added[c] += 1
                    grow.append(c)
            self._bracketed.update(c for c in todo if c not in grow)
            todo = grow

    def sweep(self, constraint: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Weights x seeds for one constraint (bracketed, see :meth:`bracket`); weight-0 rows are the baseline runs."""
        self.bracket([constraint])
        runs, history = self.run(self.sweep_configs(constraint), desc=constraint)
        runs["sweep"] = constraint
        runs["weight"] = [c.constraints.active().get(constraint, 0.0) for c in self.sweep_configs(constraint)]
        return runs, history

    def sweeps(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """All sweeps in one grid (one progress bar, all cores busy), tagged by ``sweep``."""
        self.bracket()
        frames = [self.sweep(c) for c in self.sweep_weights]  # cached runs load instantly; train the rest together
        return pd.concat([f[0] for f in frames], ignore_index=True), pd.concat([f[1] for f in frames], ignore_index=True)

    def train_all_sweeps(self) -> None:
        """Train every sweep run in one parallel grid (and bracket them) before the per-constraint frames are read."""
        self.bracket()

    def chosen_weights(self, retain: float = 0.5) -> pd.DataFrame:
        """See :meth:`_choose_weights`; computed once per study and ``retain`` (a copy each call)."""
        if retain not in self._chosen:
            self._chosen[retain] = self._choose_weights(retain)
        return self._chosen[retain].copy()

    def _choose_weights(self, retain: float) -> pd.DataFrame:
        """One weight per constraint: the largest swept weight that keeps ``retain`` of the baseline's
        accuracy above chance — it costs accuracy without destroying the model.

        ``retained = (acc_w - chance) / (acc_baseline - chance)`` on mean test accuracy over seeds,
        chance being the mean over tasks of majority-class accuracy. If no weight retains enough,
        the smallest non-zero weight is taken (and the table says so).
        """
        self.train_all_sweeps()
        runs, _ = self.sweeps()
        chance = _chance(runs)
        rows = [self._choose(c, runs[runs["sweep"] == c], chance, retain) for c in self.sweep_weights]
        return pd.DataFrame([r for r in rows if r is not None])

    @staticmethod
    def _choose(c: str, r: pd.DataFrame, chance: float, retain: float) -> dict | None:
        """The choice rule for one sweep's runs ``r`` (weight-0 rows: the baseline); None without a weight > 0.
        When the chosen weight is the largest tried, ``bracketed`` is False (nothing larger was seen to fail)."""
        done = r[r["status"] == "finished"]  # a diverged run's NaN accuracy must not pick or veto a weight
        means = done.groupby("weight")["test_acc"].mean().reindex(sorted(r["weight"].unique()))
        base = means.get(0.0, np.nan)
        candidates = [w for w in means.index if w > 0]
        if not candidates:
            return None
        retained = {w: (means[w] - chance) / (base - chance) if base > chance else np.nan for w in candidates}
        ok = [w for w in candidates if retained[w] >= retain]
        if ok:
            weight, how = max(ok), f"largest weight retaining >= {retain:.0%} of the gain over chance"
        elif not np.isfinite(base):
            weight, how = min(candidates), "no baseline run finished: smallest non-zero weight"
        else:
            weight, how = min(candidates), f"no weight retains {retain:.0%}: smallest non-zero weight"
        above = [w for w in candidates if w > weight]
        nxt = min(above) if above else np.nan
        m, lo, hi = mean_ci(done.loc[done["weight"] == weight, "test_acc"])
        # How surely the rule decided: the share retained seed by seed (paired with the baseline of the same
        # seed), with its 95% interval, at the chosen weight and at the next one up. Decided when the chosen
        # weight's interval clears the threshold and the next one's stays below it.
        seed_base = done[done["weight"] == 0].set_index("seed")["test_acc"]

        def per_seed(w):
            a = done[done["weight"] == w].set_index("seed")["test_acc"]
            seeds = a.index.intersection(seed_base.index)
            return mean_ci((a.loc[seeds] - chance) / (seed_base.loc[seeds] - chance)) if len(seeds) else (np.nan,) * 3

        _, r_lo, r_hi = per_seed(weight)
        _, n_lo, n_hi = per_seed(nxt) if above else (np.nan,) * 3
        decided = bool(ok and r_lo >= retain and (not above or n_hi < retain))
        return {"constraint": c, "weight": weight, "test_acc": m, "ci_low": lo, "ci_high": hi,
                "baseline_acc": base, "retained": retained[weight], "rule": how,
                "n": int((done["weight"] == weight).sum()), "excluded": int((r["weight"] == weight).sum() - (done["weight"] == weight).sum()),
                "retained_low": r_lo, "retained_high": r_hi, "bracketed": bool(above), "next_weight": nxt,
                "next_retained": retained[nxt] if above else np.nan, "next_retained_low": n_lo, "next_retained_high": n_hi,
                "decided": decided}

    def chosen_configs(self, seed: int, retain: float = 0.5) -> dict[str, RunConfig]:
        """The baseline and each constraint at its chosen weight, for one seed."""
        chosen = self.chosen_weights(retain)
        out = {"baseline": self.config(seed=seed)}
        for row in chosen.itertuples():
            out[row.constraint] = self.config(row.constraint, row.weight, seed)
        return out

    def costliest(self, retain: float = 0.5, margin: float = 0.01) -> dict | None:
        """The costly constraint (chosen weight costs >= ``margin`` of mean test accuracy) whose cost is surest:
        the upper end of its accuracy interval over seeds (the mean with one seed) furthest below the
        baseline's mean; None when none is costly. With the runner-up and the margin of the choice: per seed,
        the runner-up's accuracy minus the chosen arm's at their chosen weights, mean and 95% interval;
        ``decided`` when that interval lies above 0 (the chosen arm surely costs more)."""
        chosen = self.chosen_weights(retain)
        sure_cost = _by_sure_cost(chosen, margin)
        ranked = list(sure_cost)
        if not ranked:
            return None
        out = {"constraint": ranked[0], "sure_cost": sure_cost[ranked[0]], "runner_up": None, "runner_up_sure_cost": np.nan,
               "margin": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": 0, "decided": len(ranked) == 1}
        if len(ranked) > 1:
            runs, _ = self.sweeps()
            weights = dict(zip(chosen["constraint"], chosen["weight"]))

            def acc(c):
                r = runs[(runs["sweep"] == c) & (runs["weight"] == weights[c]) & (runs["status"] == "finished")]
                return r.set_index("seed")["test_acc"]

            a, b = acc(ranked[0]), acc(ranked[1])
            seeds = a.index.intersection(b.index)
            m, lo, hi = mean_ci(b.loc[seeds] - a.loc[seeds])
            out.update(runner_up=ranked[1], runner_up_sure_cost=sure_cost[ranked[1]], margin=m, ci_low=lo, ci_high=hi,
                       n=len(seeds), decided=bool(np.isfinite(lo) and lo > 0))
        return out

    def capacity(self, axes: Mapping[str, Sequence], retain: float = 0.5, arms: str = "all",
                 margin: float = 0.01) -> tuple[pd.DataFrame, pd.DataFrame]:
        """For each axis (a dotted model field) and size: the baseline and the constraints at their chosen
        weights, all seeds. Rows carry ``axis``, ``size``, ``default_size`` and ``grown``; the default
        size's runs are the sweeps' own.

        ``arms="all"`` grows every constraint along every axis. ``arms="costly"`` grows only the
        constraints whose chosen weight costs at least ``margin`` of mean test accuracy at the default size
        (from the sweeps): a constraint that costs nothing has nothing for capacity to win back, so its
        larger and smaller models would say nothing about the claim. ``arms="costliest"`` grows only the
        costly one that *surely* costs the most: whose accuracy interval (over seeds) has its upper end
        furthest below the baseline's mean, so a noisy arm whose interval reaches the baseline is not
        mistaken for a costly one; one arm is what a 2-core CPU budget affords. Arms not grown are still in the frame at the default
        size (``grown`` False): the recovery table reports them as ``no cost`` or ``not grown``.
        """
        problems = [f"axes: {a!r} is not a model field (e.g. 'model.d_ff')" for a in axes
                    if not a.startswith("model.") or a.split(".", 1)[1] not in self.base.model.field_names()]
        problems += [] if arms in ARMS else [f"arms={arms!r} is not one of {list(ARMS)}"]
        if problems:
            raise ConfigError(problems)
        chosen = self.chosen_weights(retain)
        cost = dict(zip(chosen["constraint"], chosen["test_acc"] - chosen["baseline_acc"]))
        costly = [c for c, v in cost.items() if v <= -margin]
        if arms == "costliest":
            costly = list(_by_sure_cost(chosen, margin))[:1]
        grow = {"baseline": True, **{c: arms == "all" or c in costly for c in cost}}
        weights = {"baseline": 0.0, **dict(zip(chosen["constraint"], chosen["weight"]))}
        configs, tags = [], []
        for axis, sizes in axes.items():
            default = self.base.to_dict()["model"][axis.split(".", 1)[1]]
            for size in sizes:
                for name, weight in weights.items():
                    if not grow[name] and size != default:
                        continue
                    for s in self.seeds:
                        configs.append(self.config(name, weight, s, **{axis: size}))
                        tags.append((axis, size, default, grow[name]))
        runs, history = self.run(configs, desc="capacity")
        runs["axis"] = [t[0] for t in tags]
        runs["size"] = [t[1] for t in tags]
        runs["default_size"] = [t[2] for t in tags]
        runs["grown"] = [t[3] for t in tags]
        return runs, history


def costs_vs_baseline(runs: pd.DataFrame, metrics: Sequence[str], paired: bool = True) -> pd.DataFrame:
    """For each non-zero weight and metric: mean(metric at weight) - mean(metric at weight 0), with a 95% interval.

    ``paired``: seeds are matched (same seed, same data order and initial weights) and the interval is
    a t-interval of the per-seed differences; otherwise Welch's interval for independent groups.
    Rows: ``constraint``, ``weight``, ``metric``, ``effect``, ``ci_low``, ``ci_high``, ``n``, ``what``.
    """
    from .stats import diff_ci

    rows = []
    # A metric no run recorded (every run diverged) is NaN, not a KeyError; n counts the runs compared.
    runs = runs.reindex(columns=[*runs.columns, *[m for m in metrics if m not in runs]])
    constraint = runs["sweep"].iloc[0] if "sweep" in runs else runs["constraint"].iloc[0]
    base = runs[runs["weight"] == 0].set_index("seed")
    for w in sorted(x for x in runs["weight"].unique() if x > 0):
        arm = runs[runs["weight"] == w].set_index("seed")
        for m in metrics:
            if paired:
                seeds = arm.index.intersection(base.index)
                d = (arm.loc[seeds, m] - base.loc[seeds, m]).to_numpy(dtype=float)
                effect, lo, hi = mean_ci(d)
                n = int(np.isfinite(d).sum())
            else:
                effect, lo, hi = diff_ci(arm[m], base[m])
                n = int(arm[m].notna().sum())
            rows.append({"constraint": constraint, "weight": w, "metric": m, "effect": effect, "ci_low": lo,
                         "ci_high": hi, "n": n, "what": f"w={w:g} {m.replace('test_acc/', '').replace('test_acc', 'all tasks')}"})
    return pd.DataFrame(rows)


def accuracy_table(runs: pd.DataFrame, tasks: Sequence[str], splits: Sequence[str] = ("test", "ood")) -> pd.DataFrame:
    """Per task (and "all"): mean accuracy over the runs' seeds with its 95% interval, per split, and chance.

    Columns per split ``s``: ``s``, ``s_low``, ``s_high``; plus ``chance``, ``n`` (finished runs, the only
    ones the means are over) and ``excluded`` (diverged or failed runs, left out). Every column is present
    even when no run finished (then NaN: a split a diverged run never measured is not a missing column).
    """
    rows = []
    finished = runs[runs["status"] == "finished"] if "status" in runs else runs
    for task in ["all", *tasks]:
        row: dict = {"task": task}
        for split in splits:
            col = f"{split}_acc" if task == "all" else f"{split}_acc/{task}"
            values = finished[col] if col in finished else []
            row[split], row[f"{split}_low"], row[f"{split}_high"] = mean_ci(values)
        chance_cols = [f"chance/{t}" for t in tasks] if task == "all" else [f"chance/{task}"]
        present = [c for c in chance_cols if c in runs]
        row["chance"] = float(np.nanmean(runs[present].iloc[0].to_numpy(dtype=float))) if len(runs) and present else np.nan
        row["n"] = len(finished)
        row["excluded"] = len(runs) - len(finished)
        rows.append(row)
    return pd.DataFrame(rows).set_index("task")


def measures_by_weight(runs: pd.DataFrame, measures: Sequence[str]) -> pd.DataFrame:
    """Mean of each measure per constraint weight over the finished runs; NaN where none finished (a run that
    diverged has no test measures, and its last training values are not comparable)."""
    finished = runs[runs["status"] == "finished"] if "status" in runs else runs
    table = pd.DataFrame({m: pd.to_numeric(finished[m], errors="coerce") if m in finished else np.nan
                          for m in measures}, index=finished.index)
    table["weight"] = finished["weight"]
    return table.groupby("weight")[list(measures)].mean().reindex(sorted(runs["weight"].unique()))


def contribution_overlap(result) -> float:
    """Contribution orthogonality (cos² of z_h W_O[h], :func:`constraints.orthogonality_contributions`) of a
    finished run's final model on its test split, over the global layers (size-weighted mean over batches);
    computed after training and kept with the run (``derived``), so cached runs get it too."""
    import torch

    from .constraints import orthogonality_contributions
    from .data import iter_batches

    def compute(r) -> float:
        model, split = r.load_model(), r.data().splits["test"]
        layers = range(model.cfg.local_layers, model.cfg.n_layers)
        total = 0.0
        with torch.no_grad():
            for b in iter_batches(split, 250, "cpu"):
                out = model(b["tokens"], b["padding_mask"], capture="head_contrib", segments=b["segments"])
                loss = orthogonality_contributions([out.head_contrib[i] for i in layers], b["padding_mask"]).loss
                total += float(loss) * len(b["tokens"])
        return total / len(split)

    return result.derived("contribution_overlap", compute)


def loophole_table(runs_by_variant: dict[str, pd.DataFrame], measures: Sequence[str]) -> pd.DataFrame:
    """Per orthogonality variant and non-zero weight: each measure's mean over finished runs minus the
    baseline's (weight 0, taken from the first frame that has it). The re-basing loophole of output
    orthogonality shows as output overlap falling while attention-map overlap rises (section 02)."""
    frames = list(runs_by_variant.values())
    base_runs = next((f[f["weight"] == 0] for f in frames if (f["weight"] == 0).any()), None)
    if base_runs is None:
        raise ValueError("no baseline (weight 0) runs among the frames: the changes need one")
    base = measures_by_weight(base_runs, measures).iloc[0]
    rows = []
    for variant, frame in runs_by_variant.items():
        by_weight = measures_by_weight(frame[frame["weight"] > 0], measures)
        for w, r in by_weight.iterrows():
            rows.append({"variant": variant, "weight": float(w), **{m: float(r[m] - base[m]) for m in measures}})
    return pd.DataFrame(rows, columns=["variant", "weight", *measures])


def arm_results(study: Study, retain: float = 0.5) -> list[tuple[str, float, int, object]]:
    """(arm, weight, seed, RunResult) for the baseline and every constraint at its chosen weight, all seeds.

    The runs are trained (or loaded) in one grid first, so the per-run loads below hit the cache.
    """
    from .train import run as cached_run

    chosen = study.chosen_weights(retain)
    arms = [("baseline", 0.0)] + [(r.constraint, r.weight) for r in chosen.itertuples()]
    configs = [(arm, w, s, study.config(arm, w, s)) for arm, w in arms for s in study.seeds]
    study.run([c for *_, c in configs], desc="chosen arms")
    return [(arm, w, s, cached_run(cfg, study.cache_dir)) for arm, w, s, cfg in configs]


def _head_frames_of_model(result) -> dict[str, pd.DataFrame]:
    from . import analysis

    model, data = result.load_model(), result.data()
    test = data.splits["test"]
    return {
        "metrics": analysis.head_attention_metrics(model, test, data, tasks=data.tasks),
        "importance": analysis.head_importance(model, test, data.tasks),
        "usage": analysis.head_usage(model, test, tasks=data.tasks),
    }


def collect_head_frames(arm_runs, **tags) -> dict[str, pd.DataFrame]:
    """Per-head attention metrics, ablation importance and usage of every finished model of ``arm_runs``
    (rows ``(arm, weight, seed, RunResult)``), concatenated with ``model`` (run id), ``constraint`` (arm),
    ``weight`` and ``seed`` columns (and any ``tags``, e.g. a per-row list under ``setting=``).

    Each model's frames are computed once and kept with its run (``RunResult.derived``), so sections 07,
    08 and 11 share them.
    """
    frames: dict[str, list[pd.DataFrame]] = {}
    for i, (arm, weight, seed, result) in enumerate(arm_runs):
        if result.status != "finished":
            continue
        extra = {k: v[i] for k, v in tags.items()}
        for name, frame in result.derived("head_frames_v1", _head_frames_of_model).items():
            frames.setdefault(name, []).append(frame.assign(model=result.run_id, constraint=arm, weight=weight, seed=seed, **extra))
    # Every key, even when no model finished (all diverged): empty frames, which the verdicts report as untestable.
    return {name: pd.concat(frames[name], ignore_index=True) if name in frames else pd.DataFrame()
            for name in ("metrics", "importance", "usage")}


def head_frames(study: Study, retain: float = 0.5) -> dict[str, pd.DataFrame]:
    """:func:`collect_head_frames` of every model of :func:`arm_results` (the baseline and each constraint
    at its chosen weight, all seeds)."""
    return collect_head_frames(arm_results(study, retain))


# ------------------------------------------------------------------------- runs that did not finish


def arm_statuses(arm_runs: Sequence[tuple[str, float, int, object]]) -> pd.DataFrame:
    """:func:`arm_results` rows as a frame: ``constraint``, ``weight``, ``seed``, ``status`` (one row per run)."""
    return pd.DataFrame([{"constraint": a, "weight": float(w), "seed": s, "status": r.status} for a, w, s, r in arm_runs],
                        columns=["constraint", "weight", "seed", "status"])


def first_finished(arm_runs: Sequence[tuple[str, float, int, object]]) -> dict[str, object]:
    """Per arm, the RunResult of its first seed (in the study's order) that finished; arms with no finished
    run are absent (a diverged model has no weights worth analysing)."""
    out: dict[str, object] = {}
    for arm, _, _, result in arm_runs:
        if arm not in out and result.status == "finished":
            out[arm] = result
    return out


def unfinished(runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm (``constraint``, ``weight``) with a run that did not finish: ``runs`` (all of the arm's runs,
    counted once per run id when there is one) and one count per status other than finished."""
    if "run_id" in runs:
        runs = runs.drop_duplicates("run_id")
    weight = runs["weight"] if "weight" in runs else pd.Series(0.0, index=runs.index)
    frame = pd.DataFrame({"constraint": runs["constraint"], "weight": weight, "status": runs["status"]})
    table = frame.pivot_table(index=["constraint", "weight"], columns="status", aggfunc="size", fill_value=0, sort=False)
    table.columns.name = None
    table["runs"] = table.sum(axis=1)
    table = table[table.get("finished", 0) < table["runs"]]
    return table.drop(columns=["finished"], errors="ignore").reset_index()


NONE_FINISHED = "there is no accuracy to report, and every verdict below is inconclusive for want of a finished run"


def excluded_text(runs: pd.DataFrame, left_out_of: str = "every table, figure and verdict below",
                  if_none: str = NONE_FINISHED) -> str:
    """One Markdown sentence saying which runs did not finish (per arm and status) and that they are left out
    (``if_none``: what follows when no run finished); empty when every run finished. ``runs``: a runs frame
    with ``constraint``, ``status`` (and ``weight``)."""
    if "status" not in runs or (runs["status"] == "finished").all():
        return ""
    if "run_id" in runs:
        runs = runs.drop_duplicates("run_id")  # the capacity grid lists a default-size run once per axis
    table = unfinished(runs)
    statuses = [c for c in table.columns if c not in ("constraint", "weight", "runs")]
    parts = []
    for r in table.to_dict("records"):
        name = get_label(r["constraint"], None if r["constraint"] == "baseline" else r["weight"])
        parts.append(f"{name}: " + ", ".join(f"{r[s]} of {r['runs']} {s}" for s in statuses if r[s]))
    n_out, n = len(runs) - int((runs["status"] == "finished").sum()), len(runs)
    if n_out == n:
        return f"**None of the {n} runs finished** ({'; '.join(parts)}): {if_none}."
    return f"**{n_out} of {n} runs did not finish** ({'; '.join(parts)}) and are left out of {left_out_of}."
