"""Section 09 (the real bAbI tasks): published reference numbers with their sources, the decision to skip
the section, the bAbI runs, and the tables the notebook shows.

    reason = skip_reason(babi_dir, tasks)            # None, or why the section cannot run (never raises)
    size = dataset_size(babi_dir, tasks)             # "1k" or "10k", from the training files themselves
    configs = babi_configs(study, chosen, ...)       # baseline + each constraint at its chosen weight, all seeds
    runs, history = study.run(configs, desc="bAbI")
    errors = error_table(runs, tasks)                # test error (%) per arm and task, 95% interval over seeds
    shown = comparison_table(errors, tasks, size)    # next to the published per-task numbers

Errors are in percent, ``100 * (1 - accuracy)``; a run's "mean" is the unweighted mean of its per-task
errors (the convention of the published tables), and intervals are Student-t over seeds (:mod:`stats`).

Reference numbers
-----------------
Only numbers read in a source text are listed; where none could be read the tables show "n/a".

* :data:`UT_REFERENCES` -- Dehghani et al., "Universal Transformers", ICLR 2019 (arXiv:1807.03819v3),
  Appendix E "bAbI Detailed Results": two tables, "Best seed run for each task (out of 10 runs)" and
  "Average (± var) over all seeds (for 10 runs)", each with columns 10K / 1K x train single / train joint.
  The appendix does not name the model in the tables; their "avg err" row (0.21 / 0.29 / 4.55 / 7.78)
  is what Table 1 reports for "UT w/ dynamic halting", so that is the model. Read in a copy of the
  paper's ar5iv rendering (https://ar5iv.labs.arxiv.org/html/1807.03819).
* :data:`PUBLISHED_AVERAGES` -- Table 1 of the same paper: mean error over the 20 tasks (number of
  failed tasks, error > 5%) for the Transformer, the UT, the UT with dynamic halting and the MemN2N
  entry it cites. Table 1 has averages only, no per-task numbers.
* :data:`MEMN2N_REFERENCES` -- Sukhbaatar et al., "End-To-End Memory Networks", NeurIPS 2015
  (arXiv:1503.08895v5), Table 1: the best 1k model (one model trained jointly on all 20 tasks, 3 hops,
  position encoding, linear start, random noise: "PE LS RN", joint). The per-task values could NOT be
  read in the paper itself here; they are copied from the "Paper Result" column of the README of
  github.com/lucaslingle/memn2n, which quotes that table. Cross-check: their mean (12.4) and number of
  failed tasks (11) equal the "MemN2N, 1K, train joint: 12.4 (11/20)" entry of UT Table 1, a primary
  source read here. The 10k per-task MemN2N numbers found online disagreed with each other, so none
  are listed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..data.babi import find_file, resolve_dir
from ..arms import ARMS, label
from ..arms import get as get_arm
from ..config import ConfigError, RunConfig
from ..stats import fmt, mean_ci, verdict

BABI_TASKS = tuple(f"qa{i}" for i in range(1, 21))
TASK_NAMES = {
    "qa1": "single supporting fact", "qa2": "two supporting facts", "qa3": "three supporting facts",
    "qa4": "two argument relations", "qa5": "three argument relations", "qa6": "yes/no questions",
    "qa7": "counting", "qa8": "lists/sets", "qa9": "simple negation", "qa10": "indefinite knowledge",
    "qa11": "basic coreference", "qa12": "conjunction", "qa13": "compound coreference",
    "qa14": "time reasoning", "qa15": "basic deduction", "qa16": "basic induction",
    "qa17": "positional reasoning", "qa18": "size reasoning", "qa19": "path finding",
    "qa20": "agent's motivations",
}  # fmt: skip
SIZES = ("1k", "10k")
# Training questions per task in the official files: 1000 (en, hn, shuffled) or 10000 (the -10k folders).
_SIZE_THRESHOLD = 5000


@dataclass(frozen=True)
class Reference:
    """One published column of per-task bAbI test errors (%)."""

    key: str
    model: str
    setting: str  # e.g. "train joint, best of 10 seeds"
    size: str  # "1k" or "10k": training questions per task
    errors: Mapping[str, float]  # task id ("qa1") -> test error in %
    published_mean: float  # mean over the 20 tasks as printed in the source
    published_failed: int | None  # tasks with error > 5%, as printed (None when not printed)
    source: str  # paper, table, column
    verified: str = "read in the source"  # or how far the numbers could be checked
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.model} ({self.setting}, {self.size})"


def _column(values: Sequence[float]) -> dict[str, float]:
    if len(values) != 20:
        raise ValueError(f"a bAbI reference column needs 20 values, got {len(values)}")
    return dict(zip(BABI_TASKS, map(float, values)))


_UT = "Dehghani et al., Universal Transformers, ICLR 2019 (arXiv:1807.03819v3), Appendix E"
_UT_BEST = f"{_UT}, table 'Best seed run for each task (out of 10 runs)'"
_UT_AVG = f"{_UT}, table 'Average (± var) over all seeds (for 10 runs)' (means; the ± var values are not kept)"
_UT_MODEL = "UT w/ dynamic halting"  # the appendix tables' averages are Table 1's "UT w/ dynamic halting" row

# fmt: off
UT_REFERENCES: tuple[Reference, ...] = (
    Reference("ut_act_best_single_10k", _UT_MODEL, "train single, best of 10 seeds", "10k", _column(
        [0.0, 0.0, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.4, 0.6, 0.0, 2.8, 0.0]),
        0.21, 0, f"{_UT_BEST}, column 10K / train single"),
    Reference("ut_act_best_joint_10k", _UT_MODEL, "train joint, best of 10 seeds", "10k", _column(
        [0.0, 0.0, 1.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.2, 0.2, 0.0, 3.1, 0.0]),
        0.29, 0, f"{_UT_BEST}, column 10K / train joint"),
    Reference("ut_act_best_single_1k", _UT_MODEL, "train single, best of 10 seeds", "1k", _column(
        [0.0, 0.0, 3.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.8, 32.0, 0.0, 47.1, 2.4]),
        4.55, 3, f"{_UT_BEST}, column 1K / train single"),
    Reference("ut_act_best_joint_1k", _UT_MODEL, "train joint, best of 10 seeds", "1k", _column(
        [0.0, 0.5, 5.4, 0.0, 0.5, 0.5, 3.2, 1.6, 0.2, 0.4, 0.1, 0.0, 0.6, 3.8, 5.9, 15.4, 42.9, 4.1, 68.2, 2.4]),
        7.78, 5, f"{_UT_BEST}, column 1K / train joint"),
    Reference("ut_act_mean_single_10k", _UT_MODEL, "train single, mean of 10 seeds", "10k", _column(
        [0.0, 0.2, 1.8, 0.1, 0.2, 0.1, 0.3, 0.3, 0.0, 0.1, 0.0, 0.2, 0.2, 1.8, 2.1, 1.9, 1.6, 0.3, 3.4, 0.0]),
        0.73, None, f"{_UT_AVG}, column 10K / train single"),
    Reference("ut_act_mean_joint_10k", _UT_MODEL, "train joint, mean of 10 seeds", "10k", _column(
        [0.0, 1.7, 4.6, 0.2, 0.8, 0.1, 1.1, 0.5, 0.0, 0.5, 0.1, 0.4, 0.3, 1.3, 1.6, 0.9, 1.4, 0.7, 6.1, 0.0]),
        1.12, None, f"{_UT_AVG}, column 10K / train joint"),
    Reference("ut_act_mean_single_1k", _UT_MODEL, "train single, mean of 10 seeds", "1k", _column(
        [0.2, 3.2, 9.1, 0.3, 1.1, 1.2, 0.0, 0.1, 0.1, 0.7, 0.4, 0.6, 0.8, 0.1, 0.3, 9.1, 43.7, 2.3, 50.2, 3.2]),
        6.34, None, f"{_UT_AVG}, column 1K / train single"),
    Reference("ut_act_mean_joint_1k", _UT_MODEL, "train joint, mean of 10 seeds", "1k", _column(
        [0.1, 4.3, 14.3, 0.4, 4.3, 0.8, 4.1, 3.9, 0.3, 1.3, 0.3, 0.3, 1.1, 4.7, 10.3, 34.1, 51.1, 12.8, 73.1, 2.6]),
        11.21, None, f"{_UT_AVG}, column 1K / train joint"),
)

MEMN2N_REFERENCES: tuple[Reference, ...] = (
    Reference("memn2n_pe_ls_rn_joint_1k", "MemN2N (3 hops, PE LS RN)", "train joint, best of 10 runs", "1k", _column(
        [0.0, 11.4, 21.9, 13.4, 14.4, 2.8, 18.3, 9.3, 1.9, 6.5, 0.3, 0.1, 0.2, 6.9, 0.0, 2.7, 40.4, 9.4, 88.0, 0.0]),
        12.4, 11,
        "Sukhbaatar et al., End-To-End Memory Networks, NeurIPS 2015 (arXiv:1503.08895v5), Table 1, the jointly "
        "trained 3-hop PE LS RN model on 1k; per-task values as quoted ('Paper Result') in the README of "
        "github.com/lucaslingle/memn2n",
        verified="per-task values not read in the paper itself; their mean 12.4 and 11 failed tasks match "
                 "UT Table 1's entry 'MemN2N, 1K, train joint: 12.4 (11/20)'"),
)
# fmt: on

REFERENCES: tuple[Reference, ...] = UT_REFERENCES + MEMN2N_REFERENCES

_UT_TABLE1 = "Dehghani et al., Universal Transformers, ICLR 2019 (arXiv:1807.03819v3), Table 1"
# Mean error (%) over the 20 tasks and failed tasks (error > 5%), as printed in UT Table 1 (no per-task numbers).
PUBLISHED_AVERAGES = pd.DataFrame(
    [
        ("Transformer (Vaswani et al.)", "10k", "train single", 15.2, 10),
        ("Transformer (Vaswani et al.)", "10k", "train joint", 22.1, 12),
        ("Transformer (Vaswani et al.)", "1k", "train single", 21.8, 5),
        ("Transformer (Vaswani et al.)", "1k", "train joint", 26.8, 14),
        ("Universal Transformer", "10k", "train single", 0.23, 0),
        ("Universal Transformer", "10k", "train joint", 0.47, 0),
        ("Universal Transformer", "1k", "train single", 5.31, 5),
        ("Universal Transformer", "1k", "train joint", 8.50, 8),
        ("UT w/ dynamic halting", "10k", "train single", 0.21, 0),
        ("UT w/ dynamic halting", "10k", "train joint", 0.29, 0),
        ("UT w/ dynamic halting", "1k", "train single", 4.55, 3),
        ("UT w/ dynamic halting", "1k", "train joint", 7.78, 5),
        ("MemN2N (Sukhbaatar et al.)", "1k", "train joint", 12.4, 11),
    ],
    columns=["model", "size", "setting", "mean_error", "failed"],
).assign(source=_UT_TABLE1)

# The reference columns shown next to our runs: jointly trained models (ours train one model on all the
# section's tasks), best seed and mean over seeds.
SHOWN_REFERENCES = {
    "1k": ("ut_act_mean_joint_1k", "ut_act_best_joint_1k", "memn2n_pe_ls_rn_joint_1k"),
    "10k": ("ut_act_mean_joint_10k", "ut_act_best_joint_10k"),
}


def reference(key: str) -> Reference:
    for r in REFERENCES:
        if r.key == key:
            return r
    raise KeyError(f"no reference {key!r} (have: {[r.key for r in REFERENCES]})")


def sources_table(size: str | None = None) -> pd.DataFrame:
    """One row per reference column (of ``size`` if given): what it is, where it comes from, how checked."""
    rows = [{"column": r.label, "size": r.size, "published mean (20 tasks)": r.published_mean,
             "source": r.source, "checked": r.verified} for r in REFERENCES if size is None or r.size == size]  # fmt: skip
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------- skip / detect


def how_to_point() -> str:
    """How a reader points the section at a copy of bAbI (Markdown)."""
    return ("Point `babi_dir` at a directory of bAbI v1.2 files: the `en/` (1k) or `en-10k/` folder of "
            "`tasks_1-20_v1-2.tar.gz`, holding files such as `qa1_single-supporting-fact_train.txt`. Either "
            "`python -m disentangle.report --profile default --babi-dir /path/to/babi/en` (or "
            "`make report ARGS=\"--babi-dir /path/to/babi/en\"`), or set `babi_dir` under `sections: 09_babi:` "
            "in `params/<profile>.yaml`; a relative path is taken from the repository root.")  # fmt: skip


def skip_reason(babi_dir: str | None, tasks: Sequence[str]) -> str | None:
    """None when the section can run; otherwise a Markdown message saying why not and how to fix it.

    Missing data is not an error (an empty ``babi_dir``, a missing directory or missing task files give
    a message); a parameter that is wrong whatever the data (``tasks`` empty or not bAbI ids) raises a
    ConfigError naming it. A malformed file is left to the reader, which names the file and line.
    """
    why = babi_dir_problem(babi_dir, tasks, partial_ok=True)
    if why is None:
        return None
    return f"**This section was skipped:** {why}.\n\n{how_to_point()}"


def babi_dir_problem(babi_dir: str | None, tasks: Sequence[str], partial_ok: bool = False) -> str | None:
    """Why ``babi_dir`` cannot be used for ``tasks`` (plain text), or None: what :func:`skip_reason` shows, and
    what the report runner refuses up front for a ``--babi-dir`` the user gave (only the profile's default
    path may be skipped). ``partial_ok``: some tasks without files are no problem (the section leaves them
    out by name, :func:`missing_tasks`), only all of them; the runner asks for every task of a directory
    the user named. Bad ``tasks`` raise a ConfigError, as in :func:`skip_reason`."""
    bad = [t for t in tasks if t not in BABI_TASKS]
    if not tasks or bad:
        raise ConfigError([f"babi_tasks={list(tasks)!r}: " + (f"{bad} are not bAbI task ids" if bad else "empty")
                           + " (allowed: qa1 .. qa20)"])  # fmt: skip
    if not babi_dir or not str(babi_dir).strip():
        return "no bAbI directory was given (`babi_dir` is empty)"
    try:
        resolve_dir(str(babi_dir))
        missing = missing_tasks(babi_dir, tasks)
    except (FileNotFoundError, OSError) as err:
        return f"`babi_dir={babi_dir!r}` cannot be used: {err}"
    if missing and (len(missing) == len(tasks) or not partial_ok):
        return f"`babi_dir={babi_dir!r}` cannot be used: {'; '.join(missing.values())}"
    return None


def missing_tasks(babi_dir: str, tasks: Sequence[str]) -> dict[str, str]:
    """The tasks of ``tasks`` whose train or test file is not in ``babi_dir``, each with the error that names
    the file (the shared ``en-10k`` copy has no qa3 train file): the section leaves them out, says so, and
    reports the others."""
    root = resolve_dir(str(babi_dir))
    out = {}
    for t in tasks:
        for kind in ("train", "test"):
            try:
                find_file(root, t, kind)
            except FileNotFoundError as err:
                out[t] = str(err)
                break
    return out


def questions_per_task(babi_dir: str, tasks: Sequence[str]) -> dict[str, int]:
    """Questions in each task's training file (a question line holds a tab)."""
    root = resolve_dir(babi_dir)
    out = {}
    for t in tasks:
        with find_file(root, t, "train").open(encoding="utf-8") as f:
            out[t] = sum("\t" in line for line in f)
    return out


def canonical_dir(babi_dir: str) -> str:
    """``babi_dir`` as an absolute path (found as :func:`babi.resolve_dir` finds it), so that the run configs,
    hence their cache entries, do not depend on how the path was spelled."""
    return str(resolve_dir(str(babi_dir)).resolve())


def data_summary(info: Mapping, tasks: Sequence[str]) -> pd.DataFrame:
    """Per task, from ``TaskData.info`` of the bAbI data: questions per split and how many stories were cut
    to ``babi_max_sentences`` (supporting sentences are always kept)."""
    rows = []
    for t in tasks:
        row = {"task": t, "bAbI task": TASK_NAMES.get(t, "")}
        for split in ("train", "val", "test"):
            row[f"{split} questions"] = info["sizes"][split][t]
        for split in ("train", "test"):
            n = info["sizes"][split][t]
            row[f"{split} stories cut"] = f"{info['truncated_stories'][split][t] / n:.0%}" if n else "n/a"
        rows.append(row)
    return pd.DataFrame(rows).set_index("task")


def dataset_size(babi_dir: str, tasks: Sequence[str]) -> str:
    """"1k" or "10k": which published columns apply, from the training questions per task in the files
    (1000 in en/, 10000 in en-10k/), not from the directory's name."""
    counts = questions_per_task(babi_dir, tasks)
    return "10k" if float(np.median(list(counts.values()))) >= _SIZE_THRESHOLD else "1k"


# ----------------------------------------------------------------------------------------- configs


def arms(chosen: pd.DataFrame) -> list[tuple[str, float]]:
    """("baseline", 0.0) and (constraint, chosen weight) for each row of ``Study.chosen_weights()``."""
    return [("baseline", 0.0)] + [(r.constraint, float(r.weight)) for r in chosen.itertuples()]


def data_changes(babi_dir: str, tasks: Sequence[str], max_sentences: int, steps: int, n_train: int = 0,
                 n_test: int = 0) -> dict:
    """Dotted changes that turn the study's base config into the bAbI one (data source and training length)."""
    return {"data.source": "babi", "data.tasks": tuple(tasks), "data.babi_dir": str(babi_dir),
            "data.n_train": int(n_train), "data.n_test": int(n_test),
            "data.babi_max_sentences": int(max_sentences), "train.steps": int(steps)}  # fmt: skip


def babi_configs(study, chosen: pd.DataFrame, changes: Mapping, max_len: int,
                 architectures: Sequence[str] = (), settings: Mapping[str, Mapping] | None = None) -> list[RunConfig]:
    """Every bAbI run: each arm (baseline + constraints at their chosen weights, then each architectural arm
    of ``architectures`` at its registry setting, with ``settings[arm]``'s dotted fields over it, as section
    11's ``alt_settings``) x every seed of ``study``, built with ``study.config`` so they share hashes (and
    cache entries) across notebooks."""
    changes = {**changes, "model.max_len": int(max_len)}
    configs = [study.config(name, weight, seed, **changes) for name, weight in arms(chosen) for seed in study.seeds]
    for name in architectures:
        arm = get_arm(name)
        if arm.kind != "architecture":
            raise ValueError(f"babi_alt_arms: {name!r} is not an architectural arm (allowed: "
                             f"{[a for a in ARMS if ARMS[a].kind == 'architecture']})")
        arm_changes = {**dict(arm.changes), **dict((settings or {}).get(name, {}))}  # one replace: validated as a whole
        configs += [study.config(seed=seed, **changes, **arm_changes) for seed in study.seeds]
    return configs


def needed_max_len(study, changes: Mapping) -> int:
    """The model's max_len for the bAbI runs: the base value, or the longest bAbI input if that is longer."""
    from ..train import load_data

    cfg = study.config(**changes)
    return max(study.base.model.max_len, load_data(cfg.data, study.cache_dir).max_len)


# ------------------------------------------------------------------------------------------ tables


def run_errors(runs: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """One row per run: ``constraint``, ``weight``, ``seed``, ``status``, test error (%) per task and ``mean``
    (the unweighted mean of the per-task errors; NaN when any task is missing)."""
    acc = runs.reindex(columns=[f"test_acc/{t}" for t in tasks]).to_numpy(float)  # a missing task -> NaN
    err = 100.0 * (1.0 - acc)
    out = runs[["constraint", "weight", "seed", "status"]].reset_index(drop=True).copy()
    for i, t in enumerate(tasks):
        out[t] = err[:, i]
    out["mean"] = err.mean(axis=1)  # NaN propagates: a diverged run has no mean
    return out


def error_table(runs: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """Long frame: per arm (``constraint``, ``weight``) and task (each of ``tasks``, then ``"mean"``):
    ``error`` (mean over seeds, %), ``ci_low``, ``ci_high`` (95% t-interval over seeds, clipped to the possible
    range [0, 100]: with 2-3 seeds a t-interval easily overshoots it) and ``n`` (runs with a finite value).
    Arms keep the order in which they first appear in ``runs``."""
    per_run = run_errors(runs, tasks)
    rows = []
    for (name, weight), g in per_run.groupby(["constraint", "weight"], sort=False, dropna=False):
        for t in [*tasks, "mean"]:
            m, lo, hi = _clipped(mean_ci(g[t]), 0.0, 100.0)
            rows.append({"constraint": name, "weight": float(weight), "task": t, "error": m, "ci_low": lo,
                         "ci_high": hi, "n": int(np.isfinite(g[t].to_numpy(float)).sum())})
    return pd.DataFrame(rows)


def _clipped(mci: tuple[float, float, float], low: float, high: float) -> tuple[float, float, float]:
    """(mean, lo, hi) with the interval bounds clipped to [low, high] (NaN stays NaN)."""
    m, lo, hi = mci
    return m, (max(lo, low) if math.isfinite(lo) else lo), (min(hi, high) if math.isfinite(hi) else hi)


def reference_table(tasks: Sequence[str], size: str, keys: Sequence[str] | None = None) -> pd.DataFrame:
    """Published errors (%) for ``tasks`` and their ``"mean"`` over the same tasks (computed from the
    published per-task values), one column per reference label; NaN where a reference has no value."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {list(SIZES)}")
    refs = [reference(k) for k in (keys if keys is not None else SHOWN_REFERENCES[size])]
    out = pd.DataFrame(index=pd.Index([*tasks, "mean"], name="task"))
    for r in refs:
        vals = [r.errors.get(t, math.nan) for t in tasks]
        out[r.label] = [*vals, float(np.mean(vals)) if vals and all(np.isfinite(vals)) else math.nan]
    return out


def arm_label(name: str, weight: float) -> str:
    return label(name, weight)


def comparison_table(errors: pd.DataFrame, tasks: Sequence[str], size: str | None, digits: int = 1) -> pd.DataFrame:
    """Display frame: rows = tasks (with their names) and "mean"; columns = each arm's error "m [lo, hi]"
    (%), then the published columns for ``size`` ("n/a" where none is published; no columns when
    ``size`` is None)."""
    index = [*tasks, "mean"]
    out = pd.DataFrame(index=pd.Index(index, name="task"))
    out["bAbI task"] = [TASK_NAMES.get(t, "") if t != "mean" else f"mean over {len(tasks)} tasks" for t in index]
    for (name, weight), g in errors.groupby(["constraint", "weight"], sort=False, dropna=False):
        g = g.set_index("task")
        out[arm_label(name, weight)] = [fmt(*g.loc[t, ["error", "ci_low", "ci_high"]], digits=digits)
                                        if t in g.index else "n/a" for t in index]  # fmt: skip
    if size is not None:
        refs = reference_table(tasks, size)
        for col in refs.columns:
            out[f"published: {col}"] = [f"{v:.{digits}f}" if np.isfinite(v) else "n/a" for v in refs[col]]
    return out


def chance_errors(runs: pd.DataFrame, tasks: Sequence[str]) -> pd.Series:
    """Error (%) of always answering each task's most frequent test answer, and its mean over tasks."""
    vals = [100.0 * (1.0 - float(runs[f"chance/{t}"].iloc[0])) if f"chance/{t}" in runs and len(runs) else math.nan
            for t in tasks]  # fmt: skip
    return pd.Series([*vals, float(np.mean(vals))], index=[*tasks, "mean"], name="majority-answer error")


def error_summary(errors: pd.DataFrame, runs: pd.DataFrame, tasks: Sequence[str], refs: pd.DataFrame) -> str:
    """The paragraph under the error table (Markdown): the baseline's mean error against the majority answer and
    the published means, its hardest and easiest task, and each constraint's mean error. An arm with no
    finished run (all diverged) shows "n/a", and the baseline's sentence then says why."""
    base = errors[errors["constraint"] == "baseline"].set_index("task")
    per_task = base["error"].reindex(list(tasks)).dropna()
    chance = chance_errors(runs, tasks)["mean"]
    ref_means = ", ".join(f"{col}: {refs.loc['mean', col]:.1f} %" for col in refs.columns)
    if len(base) and math.isfinite(base.loc["mean", "error"]):
        text = (f"The baseline's mean test error over these {len(tasks)} tasks is "
                f"**{fmt(*base.loc['mean', ['error', 'ci_low', 'ci_high']], digits=1)} %** (majority answer: {chance:.1f} %). "
                f"Published, on the same tasks: {ref_means}. ")
        if len(per_task):
            text += (f"Its hardest task here is {per_task.idxmax()} ({TASK_NAMES[per_task.idxmax()]}, {per_task.max():.1f} %), "
                     f"its easiest {per_task.idxmin()} ({TASK_NAMES[per_task.idxmin()]}, {per_task.min():.1f} %). ")
    else:
        statuses = runs.loc[runs["constraint"] == "baseline", "status"].value_counts()
        text = (f"No baseline run finished ({', '.join(f'{n} {s}' for s, n in statuses.items())}): its test error is not "
                f"available (majority answer: {chance:.1f} %; published, on the same tasks: {ref_means}). ")
    others = errors[(errors["constraint"] != "baseline") & (errors["task"] == "mean")]
    def pct(r) -> str:
        shown = fmt(r.error, r.ci_low, r.ci_high, digits=1)
        return shown if shown == "n/a" else f"{shown} %"

    return text + " ".join(f"With {arm_label(r.constraint, r.weight)}: {pct(r)}." for r in others.itertuples())


# ----------------------------------------------------------------------------------------- findings


def accuracy_costs(runs: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """Per constraint arm: paired per-seed change in mean test accuracy over ``tasks`` (arm − baseline, same
    seed), mean with its 95% t-interval. Columns: ``constraint``, ``weight``, ``effect``, ``ci_low``,
    ``ci_high``, ``n`` (paired seeds where both runs finished) and ``left_out`` (which of the arm's and the
    baseline's runs did not finish, in words; "" when all did): a diverged run has no accuracy."""
    from .findings import left_out

    per_run = run_errors(runs, tasks)
    per_run["acc"] = 1.0 - per_run["mean"] / 100.0
    base = per_run[per_run["constraint"] == "baseline"].set_index("seed")["acc"]
    rows = []
    for (name, weight), g in per_run[per_run["constraint"] != "baseline"].groupby(["constraint", "weight"], sort=False, dropna=False):
        arm = g.set_index("seed")["acc"]
        seeds = arm.index.intersection(base.index)
        d = (arm.loc[seeds] - base.loc[seeds]).to_numpy(float)
        m, lo, hi = mean_ci(d)
        compared = runs[runs["constraint"].isin(["baseline", name])]  # one weight per arm here (NaN: an architecture)
        rows.append({"constraint": name, "weight": float(weight), "effect": m, "ci_low": lo, "ci_high": hi,
                     "n": int(np.isfinite(d).sum()), "left_out": left_out(compared)})
    return pd.DataFrame(rows, columns=["constraint", "weight", "effect", "ci_low", "ci_high", "n", "left_out"])


def verdict_rows(costs: pd.DataFrame, tasks: Sequence[str], size: str | None, margin: float = 0.01) -> list[dict]:
    """Claim "on bAbI, <constraint> degrades accuracy", one per arm of :func:`accuracy_costs`, with
    ``stats.verdict(ci_low, ci_high, expected_sign=-1, margin)``."""
    out = []
    for r in costs.itertuples():
        architecture = r.constraint in ARMS and ARMS[r.constraint].kind == "architecture"
        out.append({
            "claim": f"on bAbI, {label(r.constraint)} degrades accuracy",
            "verdict": verdict(r.ci_low, r.ci_high, expected_sign=-1, margin=margin),
            "effect": r.effect, "ci_low": r.ci_low, "ci_high": r.ci_high,
            "measure": "paired per-seed change in mean test accuracy over the bAbI tasks (" + (
                "the architecture at its registry setting" if architecture else "constraint at its chosen weight")
                + " minus baseline)",
            "detail": ("registry setting" if architecture else f"weight {r.weight:g}") + f"; {r.n} paired seeds; tasks {', '.join(tasks)}; bAbI {size or '?'}; "
                      f"equivalence margin ±{margin:g}" + (f"; {r.left_out}" if getattr(r, "left_out", "") else ""),
        })  # fmt: skip
    return out


# ------------------------------------------------------------------------------- supporting facts


def first_per_task(split, n_tasks: int, per_task: int | None):
    """The first ``per_task`` test examples of each task (all when None), keeping the split's order."""
    if per_task is None:
        return split
    import torch

    keep = []
    for i in range(n_tasks):
        keep += (split.task_ids == i).nonzero().flatten()[:per_task].tolist()
    return split.subset(torch.tensor(sorted(keep), dtype=torch.long))


def support_mass_of_run(result, per_task: int | None = 200) -> pd.DataFrame:
    """Supporting-fact attention of one finished run, per task, over its global heads, from
    :func:`analysis.head_attention_metrics` (the readout query's mass on the tokens of bAbI's own
    supporting sentences, ``Split.support_mask``).

    Columns: ``task``, ``support_mass`` (mean over heads of ``support_mass_cls``), ``support_mass_top`` (the
    most support-focused head; chosen on the same examples, so optimistic), ``chance`` (``support_share``:
    the mass of uniform attention), ``n_heads`` and ``n`` (examples).
    """
    from ..analysis import head_attention_metrics

    model, data = result.load_model(), result.data()
    split = first_per_task(data.splits["test"], len(data.tasks), per_task)
    heads = head_attention_metrics(model, split, data, tasks=data.tasks)
    heads = heads[heads["task"] != "all"]
    g = heads.groupby("task", sort=False)
    return pd.DataFrame({
        "support_mass": g["support_mass_cls"].mean(),
        "support_mass_top": g["support_mass_cls"].max(),
        "chance": g["support_share"].mean(),
        "n_heads": g.size(),
        "n": g["n"].first(),
    }).reset_index()


def support_mass(results: Sequence, per_task: int | None = 200) -> pd.DataFrame:
    """:func:`support_mass_of_run` for every finished result, with ``constraint``, ``weight`` and ``seed``."""
    from ..study import constraint_of

    frames = []
    for r in results:
        if r.status != "finished":
            continue
        name, weight = constraint_of(r.config)
        frames.append(support_mass_of_run(r, per_task).assign(constraint=name, weight=weight, seed=r.config.seed))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["task", "support_mass", "support_mass_top", "chance", "n_heads", "n", "constraint", "weight", "seed"])


def support_table(per_run: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """Per arm and task (and "mean" over tasks, per run first): each of ``support_mass``,
    ``support_mass_top`` and ``chance`` with its 95% t-interval over seeds (``<col>_low`` / ``<col>_high``,
    clipped to [0, 1]) and ``n`` (runs)."""
    cols = ("support_mass", "support_mass_top", "chance")
    means = per_run.groupby(["constraint", "weight", "seed"], sort=False, dropna=False)[list(cols)].mean().reset_index().assign(task="mean")
    df = pd.concat([per_run, means], ignore_index=True)
    rows = []
    for (name, weight), g in df.groupby(["constraint", "weight"], sort=False, dropna=False):
        for t in [*tasks, "mean"]:
            gt = g[g["task"] == t]
            row = {"constraint": name, "weight": float(weight), "task": t, "n": len(gt)}
            for c in cols:
                row[c], row[f"{c}_low"], row[f"{c}_high"] = _clipped(mean_ci(gt[c]), 0.0, 1.0)
            rows.append(row)
    return pd.DataFrame(rows)


def support_display(table: pd.DataFrame, tasks: Sequence[str], column: str = "support_mass", digits: int = 2) -> pd.DataFrame:
    """Display frame of :func:`support_table`: rows = tasks and "mean", one column per arm, plus chance."""
    index = [*tasks, "mean"]
    out = pd.DataFrame(index=pd.Index(index, name="task"))
    for (name, weight), g in table.groupby(["constraint", "weight"], sort=False, dropna=False):
        g = g.set_index("task")
        out[arm_label(name, weight)] = [fmt(*g.loc[t, [column, f"{column}_low", f"{column}_high"]], digits=digits)
                                        if t in g.index else "n/a" for t in index]  # fmt: skip
    chance = table.groupby("task")["chance"].mean()
    out["chance (uniform attention)"] = [f"{chance.get(t, math.nan):.{digits}f}" for t in index]
    return out


__all__ = [
    "BABI_TASKS", "MEMN2N_REFERENCES", "canonical_dir", "data_summary", "PUBLISHED_AVERAGES", "REFERENCES", "Reference", "SHOWN_REFERENCES",
    "TASK_NAMES", "UT_REFERENCES", "accuracy_costs", "arm_label", "arms", "babi_dir_problem", "babi_configs", "chance_errors",
    "comparison_table", "data_changes", "dataset_size", "error_summary", "error_table", "verdict_rows", "how_to_point",
    "needed_max_len", "questions_per_task", "reference", "reference_table", "run_errors", "skip_reason",
    "sources_table", "support_display", "support_mass", "support_mass_of_run", "support_table", "first_per_task",
]  # fmt: skip
