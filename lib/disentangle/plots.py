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


def mi_side_by_side(estimates: pd.DataFrame) -> Figure:
    """Post-hoc MI estimates between heads (mean over head pairs) against weight, one panel per estimator.

    Columns: ``weight``, ``seed``, ``method`` ("infonce" or "club"), ``mi`` (nats); bands over seeds.
    """
    methods = list(dict.fromkeys(estimates["method"]))
    weights = sorted(estimates["weight"].unique())
    fig, axes = plt.subplots(1, len(methods), figsize=(3.8 * len(methods), 3.2), squeeze=False)
    titles = {"infonce": "InfoNCE, trained critic (lower bound)", "club": "CLUB (upper bound)"}
    for ax, method in zip(axes[0], methods):
        m = estimates[estimates["method"] == method]
        by_w = {k: m.loc[m["weight"] == w, "mi"].to_numpy() for k, w in enumerate(weights)}
        _band(ax, range(len(weights)), by_w, colour("mutual_information"), method)
        _weight_axis(ax, weights)
        ax.set_ylabel("MI between heads (nats)")
        ax.set_title(titles.get(method, method), fontsize=10)
    fig.tight_layout()
    return fig


def capacity_curves(cap: pd.DataFrame, metric: str = "test_acc", ylabel: str = "test accuracy") -> Figure:
    """Accuracy against parameter count for a capacity grid (``Study.capacity``): one panel per axis, one
    line per arm (baseline and each constraint at its chosen weight), 95% bands over seeds, log x.

    Ticks read ``size`` over the parameter count. An axis that leaves the parameter count unchanged
    (``n_heads`` at fixed ``d_model``: narrower heads, same weights) is drawn against its size instead.
    Dashed grey: the baseline at the default size, the level a constraint must reach to recover
    (``capacity`` module); dotted: the default size.
    """
    from .capacity import BASELINE, axis_label, reference, seed_values

    axes_ = list(dict.fromkeys(cap["axis"]))
    arms = [BASELINE, *[a for a in dict.fromkeys(cap["constraint"]) if a != BASELINE]]
    fig, axs = plt.subplots(1, len(axes_), figsize=(3.5 * len(axes_), 3.4), sharey=True, squeeze=False)
    ref = reference(cap, metric)
    for ax, axis in zip(axs[0], axes_):
        sub = cap[cap["axis"] == axis]
        default = sub["default_size"].iloc[0]
        sizes = sorted({*sub["size"].tolist(), default})
        params = pd.to_numeric(cap.loc[cap["size"].isin(sizes) & (cap["axis"] == axis), "params"], errors="coerce") \
            .groupby(sub["size"]).median() if "params" in cap else pd.Series(dtype=float)
        params = params.reindex(sizes)
        flat = not np.isfinite(params.to_numpy(dtype=float)).all() or params.max() <= 1.01 * params.min()
        x = {s: float(s if flat else params[s]) for s in sizes}
        for arm in arms:
            if not (cap["constraint"] == arm).any():
                continue
            values = {x[s]: seed_values(cap, arm, axis, s, metric).to_numpy(dtype=float) for s in sizes}
            _band(ax, [x[s] for s in sizes], values, colour(arm), label(arm))
        if np.isfinite(ref["ref"]):
            ax.axhline(ref["ref"], color="#888888", ls="--", lw=1)
        ax.axvline(x[default], color="#888888", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        short = axis.split(".", 1)[-1]
        if flat:
            ax.set_xticks([x[s] for s in sizes], [f"{s}" for s in sizes])
            constant = f" (parameters constant: {params.iloc[0]:,.0f})" if np.isfinite(params.iloc[0]) else ""
            ax.set_xlabel(f"{short}{constant}", fontsize=9)
        else:
            ax.set_xticks([x[s] for s in sizes], [f"{s}\n{params[s] / 1e3:.3g}k" for s in sizes])
            ax.set_xlabel(f"{short} / parameters (log scale)", fontsize=9)
        ax.set_title(axis_label(axis))
    axs[0][0].set_ylabel(ylabel)
    handles, names = axs[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def recovery_heatmap(table: pd.DataFrame) -> Figure:
    """Per axis (panel), constraint (row) and task (column) of ``capacity.recovery_table(cap, tasks)`` (or
    ``per_task_recovery``): colour = gap to the baseline at the default size left at the largest size
    (0: matched; red: still short); text = gap at the default size -> gap at the largest size, and the
    outcome (recovered at a size, no cost, or not reached)."""
    axes_ = list(dict.fromkeys(table["axis"]))
    tasks = list(dict.fromkeys(table["task"]))
    arms = list(dict.fromkeys(table["constraint"]))
    gaps = table[["gap_default", "gap_largest"]].to_numpy(dtype=float)
    lim = max(0.05, float(np.nanmax(np.abs(gaps)))) if np.isfinite(gaps).any() else 0.05
    ncols = min(2, len(axes_))
    nrows = -(-len(axes_) // ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(ncols * (1.25 * len(tasks) + 2.4) + 0.8, nrows * (0.55 * len(arms) + 1.3) + 0.4),
                            sharey=True, squeeze=False)
    for ax in axs.flat[len(axes_):]:
        ax.set_visible(False)
    for i, (ax, axis) in enumerate(zip(axs.flat, axes_)):
        g = table[table["axis"] == axis].set_index(["constraint", "task"])
        values = pd.DataFrame([[g["gap_largest"].get((a, t), np.nan) for t in tasks] for a in arms],
                              index=[label(a) for a in arms], columns=["all tasks" if t == "all" else t for t in tasks])
        text = []
        for a in arms:
            line = []
            for t in tasks:
                if (a, t) not in g.index:
                    line.append("")
                    continue
                r = g.loc[(a, t)]
                outcome = f"at {r['recovered_at']}" if r["outcome"] == "recovered" else r["outcome"]
                line.append(f"{r['gap_default']:+.2f} → {r['gap_largest']:+.2f}\n{outcome}")
            text.append(line)
        sns.heatmap(values.astype(float), ax=ax, cmap="RdBu", center=0, vmin=-lim, vmax=lim, annot=np.array(text, dtype=object),
                    fmt="", annot_kws={"fontsize": 8}, cbar=False, linewidths=0.5, linecolor="white")
        ax.set_title(f"{axis.split('.', 1)[-1]} {g['default_size'].iloc[0]} → {g['largest_size'].iloc[0]}", fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.tick_params(axis="y", rotation=0)
    mappable = next((c for c in axs.flat[0].collections), None)
    fig.suptitle("Gap to the baseline at the default size: at the default size → at the largest size", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.87, 0.97))
    if mappable is not None:
        fig.colorbar(mappable, cax=fig.add_axes((0.89, 0.15, 0.015, 0.7)), label="gap left at the largest size")
    return fig


VERDICT_COLOURS = {"supported": "#2e7d32", "not supported": "#c62828", "inconclusive": "#9e9e9e"}


def findings_forest(table: pd.DataFrame) -> Figure:
    """Every claim's effect with its 95% interval, one panel per group (groups measure different things),
    coloured by verdict. ``table``: findings.table(...) rows."""
    groups = list(dict.fromkeys(table["group"]))
    heights = [max(1, (table["group"] == g).sum()) for g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(8.5, 0.42 * sum(heights) + 1.1 * len(groups)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        rows = table[table["group"] == g].reset_index(drop=True)
        y = np.arange(len(rows))
        for i, r in rows.iterrows():
            c = VERDICT_COLOURS.get(r["verdict"], "#9e9e9e")
            if np.isfinite(r["effect"]):
                lo, hi = (r["ci_low"], r["ci_high"]) if np.isfinite(r["ci_low"]) else (r["effect"], r["effect"])
                ax.plot([lo, hi], [i, i], color=c, lw=2)
                ax.plot(r["effect"], i, "o", color=c, ms=6)
            else:
                ax.text(0, i, "not measured", color=c, va="center", fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [f"{r['claim']}  [{r['verdict']}]" for _, r in rows.iterrows()], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(g, fontsize=10, loc="left")
    fig.tight_layout()
    return fig
