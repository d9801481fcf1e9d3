"""Figures used by the notebooks (matplotlib + seaborn). Each function takes tidy frames and returns a Figure.

Intervals are 95% Student-t intervals over seeds (``stats.mean_ci``) unless a docstring says otherwise.
Colours are fixed per arm (baseline and each constraint), so a constraint has one colour everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .stats import mean_ci
from .study import LABELS

COLOURS = {
    "baseline": "#333333",
    "orthogonality": "#1f77b4",
    "mutual_information": "#ff7f0e",
    "attention_entropy": "#2ca02c",
    "head_usage": "#d62728",
}


def setup() -> None:
    """House style; call once at the top of a notebook."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "figure.autolayout": False})


def colour(arm: str) -> str:
    return COLOURS.get(arm, "#7f7f7f")


def label(arm: str) -> str:
    return LABELS.get(arm, arm)


def _band(ax, x, values_by_x: dict, color: str, name: str, marker: str = "o") -> None:
    """Mean line with a 95% band over the values collected at each x."""
    xs, means, los, his = [], [], [], []
    for xv in x:
        m, lo, hi = mean_ci(values_by_x.get(xv, []))
        xs.append(xv)
        means.append(m)
        los.append(lo if np.isfinite(lo) else m)
        his.append(hi if np.isfinite(hi) else m)
    ax.plot(xs, means, marker=marker, color=color, label=name, lw=1.8, ms=4)
    ax.fill_between(xs, los, his, color=color, alpha=0.18, lw=0)


def learning_curves(history: pd.DataFrame, tasks: Sequence[str], hue: str = "constraint") -> Figure:
    """Validation accuracy per task against training step; one line per ``hue`` value, bands over seeds."""
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(3.4 * (len(tasks) + 1), 3.0), sharey=True)
    columns = ["val_acc", *[f"val_acc/{t}" for t in tasks]]
    titles = ["all tasks", *tasks]
    for ax, col, title in zip(np.atleast_1d(axes), columns, titles):
        for arm, g in history.groupby(hue, sort=False):
            steps = sorted(g["step"].unique())
            by_step = {s: g.loc[g["step"] == s, col].to_numpy() for s in steps}
            _band(ax, steps, by_step, colour(str(arm)), label(str(arm)), marker="")
        ax.set_title(title)
        ax.set_xlabel("step")
    np.atleast_1d(axes)[0].set_ylabel("validation accuracy")
    np.atleast_1d(axes)[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _weight_axis(ax, weights: Sequence[float]) -> None:
    ax.set_xticks(range(len(weights)), [f"{w:g}" for w in weights])
    ax.set_xlabel("constraint weight")


def sweep_accuracy(runs: pd.DataFrame, tasks: Sequence[str], constraint: str, metric: str = "test_acc") -> Figure:
    """Test accuracy per task against the constraint's weight (weight 0 = baseline), bands over seeds."""
    weights = sorted(runs["weight"].unique())
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    palette = sns.color_palette("colorblind", len(tasks) + 1)
    for i, (col, name) in enumerate([(metric, "all tasks")] + [(f"{metric}/{t}", t) for t in tasks]):
        by_w = {k: runs.loc[runs["weight"] == w, col].to_numpy() for k, w in enumerate(weights)}
        _band(ax, range(len(weights)), by_w, palette[i], name)
    _weight_axis(ax, weights)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Accuracy under {label(constraint)}")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def sweep_measures(runs: pd.DataFrame, measures: dict[str, str], constraint: str) -> Figure:
    """The constraint's own measure(s) on the test set against weight: does the loss do what it says?"""
    weights = sorted(runs["weight"].unique())
    fig, axes = plt.subplots(1, len(measures), figsize=(3.6 * len(measures), 3.2), squeeze=False)
    for ax, (col, title) in zip(axes[0], measures.items()):
        by_w = {k: runs.loc[runs["weight"] == w, col].to_numpy() for k, w in enumerate(weights)}
        _band(ax, range(len(weights)), by_w, colour(constraint), label(constraint))
        _weight_axis(ax, weights)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"Measured on the test set, by {label(constraint)} weight", fontsize=11)
    fig.tight_layout()
    return fig


def effect_bars(costs: pd.DataFrame, title: str, xlabel: str = "change in test accuracy vs baseline") -> Figure:
    """Horizontal bars of ``effect`` with [ci_low, ci_high] whiskers, one per row label ``what``."""
    fig, ax = plt.subplots(figsize=(6.2, 0.35 * len(costs) + 1.2))
    y = np.arange(len(costs))
    colours = [colour(a) for a in costs.get("constraint", ["baseline"] * len(costs))]
    ax.barh(y, costs["effect"], color=colours, alpha=0.75)
    err = np.vstack([costs["effect"] - costs["ci_low"], costs["ci_high"] - costs["effect"]])
    ax.errorbar(costs["effect"], y, xerr=np.nan_to_num(err), fmt="none", ecolor="black", capsize=3, lw=1)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, costs["what"])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def answer_distributions(answers: pd.DataFrame) -> Figure:
    """Share of each answer per task (columns ``task``, ``answer``)."""
    tasks = list(dict.fromkeys(answers["task"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 2.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        share = answers.loc[answers["task"] == task, "answer"].value_counts(normalize=True).sort_index()
        ax.bar(share.index, share.to_numpy(), color="#4c72b0")
        ax.set_title(task)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
        ax.set_ylabel("share of test answers")
    fig.tight_layout()
    return fig


def length_histogram(lengths: pd.DataFrame) -> Figure:
    """Distribution of real tokens per input, per split (columns ``split``, ``tokens``)."""
    fig, ax = plt.subplots(figsize=(6.2, 2.8))
    sns.histplot(lengths, x="tokens", hue="split", element="step", stat="density", common_norm=False, ax=ax, discrete=True)
    ax.set_xlabel("tokens per input (CLS + story + SEP + question + SEP)")
    fig.tight_layout()
    return fig
