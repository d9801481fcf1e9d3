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

from ..stats import mean_ci
from .. import arms

def setup() -> None:
    """House style; call once at the top of a notebook."""
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.95)
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "figure.autolayout": False})


colour = arms.colour  # one colour per arm, from the registry
label = arms.label


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
        groups = history.groupby(hue, sort=False) if hue in history and "step" in history else []
        if not len(groups):  # every run diverged before its first evaluation: an empty panel that says so
            ax.text(0.5, 0.5, "no evaluations\n(runs diverged)", ha="center", va="center", transform=ax.transAxes)
        for arm, g in groups:
            steps = sorted(g["step"].unique())
            by_step = {s: _column(g, col)[g["step"] == s].to_numpy() for s in steps}
            _band(ax, steps, by_step, colour(str(arm)), label(str(arm)), marker="")
        ax.set_title(title)
        ax.set_xlabel("step")
    np.atleast_1d(axes)[0].set_ylabel("validation accuracy")
    if np.atleast_1d(axes)[-1].get_legend_handles_labels()[0]:
        np.atleast_1d(axes)[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _column(df: pd.DataFrame, col: str) -> pd.Series:
    """``df[col]``, or NaN where no run recorded it (runs that diverged have no test metrics)."""
    return pd.to_numeric(df[col], errors="coerce") if col in df else pd.Series(np.nan, index=df.index)


def _weight_axis(ax, weights: Sequence[float]) -> None:
    ax.set_xticks(range(len(weights)), [f"{w:g}" for w in weights])
    ax.set_xlabel("constraint weight")


def sweep_accuracy(runs: pd.DataFrame, tasks: Sequence[str], constraint: str, metric: str = "test_acc") -> Figure:
    """Test accuracy per task against the constraint's weight (weight 0 = baseline), bands over seeds."""
    weights = sorted(runs["weight"].unique())
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    palette = sns.color_palette("colorblind", len(tasks) + 1)
    for i, (col, name) in enumerate([(metric, "all tasks")] + [(f"{metric}/{t}", t) for t in tasks]):
        by_w = {k: _column(runs, col)[runs["weight"] == w].to_numpy() for k, w in enumerate(weights)}
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
        by_w = {k: _column(runs, col)[runs["weight"] == w].to_numpy() for k, w in enumerate(weights)}
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
    if not len(estimates):  # no finished run to estimate on (all diverged)
        fig, ax = plt.subplots(figsize=(3.8, 3.2))
        ax.text(0.5, 0.5, "no finished runs\n(runs diverged)", ha="center", va="center", transform=ax.transAxes)
        return fig
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
    from ..verdicts.capacity import BASELINE, axis_label, reference, seed_values

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
                largest = "" if r["outcome"] == "not grown" else f" → {r['gap_largest']:+.2f}"
                line.append(f"{r['gap_default']:+.2f}{largest}\n{outcome}")
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


def attention_grid(panels: dict[str, dict], heads: Sequence[tuple[int, int]]) -> Figure:
    """Attention heatmaps of one story: one row per model (``panels``: arm -> analysis.attention_for_story
    output), one column per head; tokens on both axes (rows = queries), supporting tokens in red and
    marked with a bar beside each axis."""
    arms = list(panels)
    first = panels[arms[0]]
    T = len(first["tokens"])
    size = max(2.6, 0.16 * T)
    fig, axes = plt.subplots(len(arms), len(heads), figsize=(size * len(heads), size * len(arms)), squeeze=False)
    support = np.asarray(first["support_mask"], dtype=bool)
    for i, arm in enumerate(arms):
        p = panels[arm]
        for j, head in enumerate(heads):
            ax = axes[i, j]
            ax.imshow(p["attn"][tuple(head)], cmap="viridis", vmin=0, vmax=1, aspect="equal", interpolation="nearest")
            ax.set_xticks(range(T), p["tokens"], rotation=90, fontsize=6)
            ax.set_yticks(range(T), p["tokens"], fontsize=6)
            for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
                for k, tl in enumerate(tick_labels):
                    if support[k]:
                        tl.set_color("#d62728")
                        tl.set_fontweight("bold")
            for k in np.flatnonzero(support):  # a thin red bar outside the matrix marks supporting tokens
                ax.plot([k - 0.5, k + 0.5], [T - 0.3, T - 0.3], color="#d62728", lw=3, clip_on=False)
                ax.plot([-0.7, -0.7], [k - 0.5, k + 0.5], color="#d62728", lw=3, clip_on=False)
            verdict = "correct" if p["correct"] else "wrong"
            ax.set_title(f"{label(arm)} · L{head[0]}H{head[1]} ({verdict})", fontsize=8)
    fig.tight_layout()
    return fig


def sparsity_correctness(metrics: pd.DataFrame, rho: dict | None = None, task: str = "all") -> Figure:
    """The central figure: per head (of every model), sparsity (1 − readout-row entropy) against correctness
    (support mass above chance from the readout query), coloured by constraint; ``rho``: the pooled
    Spearman row (rho, ci_low, ci_high, n) shown in the title."""
    df = metrics[metrics["task"] == task] if "task" in metrics else metrics
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for arm, g in df.groupby("constraint", sort=False):
        ax.scatter(1 - g["entropy_cls"], g["support_excess_cls"], s=18, alpha=0.75, color=colour(str(arm)), label=label(str(arm)))
    ax.axhline(0, color="black", lw=0.8, ls="--")
    ax.set_xlabel("sparsity of the readout query's attention (1 − normalised entropy)")
    ax.set_ylabel("support mass above chance")
    if rho is not None and np.isfinite(rho.get("rho", np.nan)):
        ax.set_title(f"Spearman ρ = {rho['rho']:.2f} [{rho['ci_low']:.2f}, {rho['ci_high']:.2f}], {int(rho['n'])} heads", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def importance_by_task(importance: pd.DataFrame) -> Figure:
    """Accuracy drop when each head is ablated, per task (columns) and head (rows), one panel per arm;
    mean over the arm's models (seeds), which share architecture but not head identities: read it as the
    distribution of importance, not as a head-by-head match."""
    df = importance[importance["task"] != "all"]
    arms = list(dict.fromkeys(df["constraint"]))
    fig, axes = plt.subplots(1, len(arms), figsize=(2.6 * len(arms), 3.6), squeeze=False, sharey=True)
    vmax = max(0.05, float(df["importance"].abs().max()))
    for ax, arm in zip(axes[0], arms):
        g = df[(df["constraint"] == arm) & (df["seed"] == df.loc[df["constraint"] == arm, "seed"].min())]
        mat = g.pivot_table(index=["layer", "head"], columns="task", values="importance")
        sns.heatmap(mat, ax=ax, cmap="RdBu_r", center=0, vmin=-vmax, vmax=vmax, cbar=ax is axes[0, -1],
                    annot=len(mat) <= 16, fmt=".2f", annot_kws={"fontsize": 6})
        ax.set_title(label(arm), fontsize=9)
        ax.set_ylabel("(layer, head)" if ax is axes[0, 0] else "")
    fig.suptitle("Accuracy drop when a head is zeroed (first seed of each arm)", fontsize=10)
    fig.tight_layout()
    return fig


def similarity_matrices(matrices: dict[str, np.ndarray]) -> Figure:
    """One (H, H) head-similarity matrix per arm (cosine of attention rows, mean over real queries)."""
    arms = list(matrices)
    fig, axes = plt.subplots(1, len(arms), figsize=(2.5 * len(arms), 2.6), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        sns.heatmap(matrices[arm], ax=ax, vmin=0, vmax=1, cmap="mako", square=True, cbar=ax is axes[0, -1])
        ax.set_title(label(arm), fontsize=9)
    fig.suptitle("Pairwise similarity of heads' attention (first seed, last layer)", fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ 09_babi (real bAbI)


def _grouped_bars(ax, table: pd.DataFrame, value: str, low: str, high: str, groups: Sequence[str]) -> tuple[np.ndarray, float]:
    """Bars of ``value`` per group (x) and arm (``constraint``, ``weight``: one colour each) with [low, high]
    whiskers; returns the group positions and the bar width."""
    arms_ = list(dict.fromkeys(zip(table["constraint"], table["weight"])))
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(arms_))
    for i, (arm, weight) in enumerate(arms_):
        g = table[(table["constraint"] == arm) & (table["weight"] == weight)].set_index("task").reindex(groups)
        v = g[value].to_numpy(float)
        err = np.vstack([v - g[low].to_numpy(float), g[high].to_numpy(float) - v])
        name = label(arm) if arm == "baseline" else f"{label(arm)} (w={weight:g})"
        ax.bar(x - 0.4 + width * (i + 0.5), v, width, color=colour(arm), alpha=0.8, label=name)
        ax.errorbar(x - 0.4 + width * (i + 0.5), v, yerr=np.nan_to_num(np.abs(err)), fmt="none", ecolor="black",
                    capsize=2, lw=0.8)
    ax.set_xticks(x, groups)
    return x, width


def babi_errors(errors: pd.DataFrame, tasks: Sequence[str], references: pd.DataFrame | None = None) -> Figure:
    """Test error (%) per bAbI task and its mean: one bar per arm (95% interval over seeds as whiskers),
    published reference columns as markers. ``errors``: ``verdicts.babi.error_table``; ``references``:
    ``verdicts.babi.reference_table`` (rows = tasks and "mean", one column per reference)."""
    groups = [*tasks, "mean"]
    fig, ax = plt.subplots(figsize=(max(7.5, 1.2 * len(groups) + 1.5), 5.0))
    x, _ = _grouped_bars(ax, errors, "error", "ci_low", "ci_high", groups)
    markers = ["D", "^", "s", "v", "P"]
    if references is not None:
        for k, col in enumerate(references.columns):
            ax.scatter(x, references[col].reindex(groups).to_numpy(float), marker=markers[k % len(markers)],
                       color="black", facecolor="white" if k % 2 else "black", s=28, zorder=5, label=f"published: {col}")
    ax.set_ylabel("test error (%)")
    ax.set_title("bAbI test error per task (bars: mean over seeds, whiskers: 95% interval)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def babi_support_mass(table: pd.DataFrame, tasks: Sequence[str], value: str = "support_mass") -> Figure:
    """Attention mass of the readout query on bAbI's supporting sentences, per task and arm (mean over
    global heads, 95% interval over seeds), with the chance level (uniform attention) as a black dash.
    ``table``: ``verdicts.babi.support_table``."""
    groups = [*tasks, "mean"]
    fig, ax = plt.subplots(figsize=(max(7.5, 1.2 * len(groups) + 1.5), 4.6))
    x, _ = _grouped_bars(ax, table, value, f"{value}_low", f"{value}_high", groups)
    chance = table.groupby("task")["chance"].mean().reindex(groups).to_numpy(float)
    ax.hlines(chance, x - 0.45, x + 0.45, colors="black", lw=1.6, label="chance (uniform attention)")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mass on supporting tokens")
    ax.set_title("Readout attention on the supporting facts (mean over global heads)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ 11_alternatives


def routing_heatmap(stats: pd.DataFrame) -> Figure:
    """Routing frequency of each head (rows: (layer, head), shared heads marked) per task and per token role
    (columns), one model: how often a token of that group is routed to the head. ``stats``:
    ``analysis.routing_stats`` rows of one model (with a ``shared`` column)."""
    panels = [b for b in ("task", "role") if (stats["by"] == b).any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 0.75 * sum(stats.loc[stats["by"] == b, "group"].nunique() for b in panels), 3.6),
                             squeeze=False, gridspec_kw={"width_ratios": [max(1, stats.loc[stats["by"] == b, "group"].nunique()) for b in panels]})
    for ax, by in zip(axes[0], panels):
        g = stats[(stats["by"] == by) & (stats["group"] != "all")]
        mat = g.pivot_table(index=["layer", "head"], columns="group", values="frequency")
        shared = g.drop_duplicates(["layer", "head"]).set_index(["layer", "head"])["shared"].reindex(mat.index)
        mat.index = [f"{layer}.{head}{' (shared)' if s else ''}" for (layer, head), s in zip(mat.index, shared)]
        sns.heatmap(mat, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=mat.size <= 80, fmt=".2f",
                    annot_kws={"fontsize": 6}, cbar=ax is axes[0, -1])
        ax.set_title(f"by {by}", fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("layer.head" if ax is axes[0, 0] else "")
    fig.suptitle("Routing frequency: share of the group's tokens routed to each head (first seed)", fontsize=10)
    fig.tight_layout()
    return fig


def selectivity_bars(table: pd.DataFrame) -> Figure:
    """Mean selectivity of the routed heads by task and by token role, per arm and setting, with 95%
    intervals over seeds. ``table``: ``alternatives.summary`` rows with ``selectivity_task`` / ``_role``."""
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    names = [label(c) + (f" {s}" if s else "") for c, s in zip(table["constraint"], table["setting"])]
    x = np.arange(len(table))
    for i, (by, col) in enumerate((("by task", "#4c72b0"), ("by token role", "#dd8452"))):
        key = "selectivity_task" if by == "by task" else "selectivity_role"
        v = table[key].to_numpy(float)
        err = np.vstack([v - table[f"{key}_ci_low"].to_numpy(float), table[f"{key}_ci_high"].to_numpy(float) - v])
        ax.bar(x - 0.2 + 0.4 * i, v, 0.4, color=col, label=by)
        ax.errorbar(x - 0.2 + 0.4 * i, v, yerr=np.nan_to_num(np.abs(err)), fmt="none", ecolor="black", capsize=2, lw=0.8)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("selectivity (0 = used alike)")
    ax.set_title("Do routed heads specialise by task or by token role?", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def attractor_scores(table: pd.DataFrame, factors: Sequence[str]) -> Figure:
    """NMI and chance-adjusted MI (AMI) of the Hopfield attractors against each factor, per setting, with
    95% intervals over seeds. ``table``: ``alternatives.summary`` rows with ``nmi_<f>`` / ``ami_<f>``."""
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.0), sharey=True)
    for ax, score in zip(axes, ("nmi", "ami")):
        x = np.arange(len(factors))
        width = 0.8 / max(1, len(table))
        for i, r in enumerate(table.itertuples()):
            v = np.array([getattr(r, f"{score}_{f}", np.nan) for f in factors], float)
            lo = np.array([getattr(r, f"{score}_{f}_ci_low", np.nan) for f in factors], float)
            hi = np.array([getattr(r, f"{score}_{f}_ci_high", np.nan) for f in factors], float)
            name = r.setting or "own setting"
            ax.bar(x - 0.4 + width * (i + 0.5), v, width, color=plt.cm.viridis(i / max(1, len(table))), label=name)
            ax.errorbar(x - 0.4 + width * (i + 0.5), v, yerr=np.nan_to_num(np.abs(np.vstack([v - lo, hi - v]))),
                        fmt="none", ecolor="black", capsize=2, lw=0.8)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x, factors)
        ax.set_title(score.upper() + (" (0 = chance)" if score == "ami" else ""), fontsize=10)
    axes[0].set_ylabel("attractors vs factor")
    axes[1].legend(fontsize=7)
    fig.suptitle("How cleanly Hopfield attractors separate the story's factors (entity tokens)", fontsize=10)
    fig.tight_layout()
    return fig


def arm_plane(table: pd.DataFrame) -> Figure:
    """Every arm on the plane of test accuracy (x) against support mass above chance (y), mean over seeds
    with 95% intervals: the constraints at their chosen weights and the alternatives (section 11)."""
    from .summary import plane

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    plane(ax, table.to_dict("records"))
    fig.tight_layout()
    return fig


def setting_curves(table: pd.DataFrame, arm: str, field: str, measure: str, ylabel: str) -> Figure:
    """Test accuracy and the arm's own measure against one swept field (the arm's own setting included)."""
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.8))
    t = table.sort_values("value")
    for ax, (col, name) in zip(axes, (("test_acc", "test accuracy"), (measure, ylabel))):
        v = t[col].to_numpy(float)
        lo, hi = t[f"{col}_ci_low"].to_numpy(float), t[f"{col}_ci_high"].to_numpy(float)
        ax.errorbar(t["value"].to_numpy(float), v, yerr=np.nan_to_num(np.abs(np.vstack([v - lo, hi - v]))), marker="o",
                    color=colour(arm), capsize=3)
        ax.set_xlabel(field)
        ax.set_ylabel(name)
        if (t["value"] > 0).all() and t["value"].max() / t["value"].min() > 8:
            ax.set_xscale("log")
    fig.suptitle(f"{label(arm)}: sweep of {field}", fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ 10_replication


def replication_accuracy(table: pd.DataFrame) -> Figure:
    """Per configuration and protocol: our mean test accuracy (95% interval of the mean as a thick bar, the
    prediction interval of one seed as a thin one) and the published single-seed number (a red cross)."""
    protocols = list(dict.fromkeys(table["protocol"]))
    fig, axes = plt.subplots(1, len(protocols), figsize=(5.2 * len(protocols), 0.45 * table["name"].nunique() + 1.4),
                             sharey=True, squeeze=False)
    names = list(dict.fromkeys(table["name"]))
    for ax, protocol in zip(axes[0], protocols):
        g = table[table["protocol"] == protocol].set_index("name").reindex(names)
        y = np.arange(len(names))
        ax.hlines(y, g["pi_low"], g["pi_high"], color="#999999", lw=1.2, label="one seed (95% prediction)")
        ax.hlines(y, g["ci_low"], g["ci_high"], color="#1f77b4", lw=4, label="our mean (95% interval)")
        ax.plot(g["mean"], y, "o", color="#1f77b4", ms=4)
        ax.plot(g["published"], y, "x", color="#d62728", ms=8, mew=2, label="published (one seed)")
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy (qa1)")
        ax.set_title("as published" if protocol == "published" else "trained to convergence")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def replication_heatmap(panel: dict) -> Figure:
    """The published protocol (one example, head 0 of the last layer) beside every head's support mass on that
    example: what one map shows and how much the other heads differ."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [3, 1.3]})
    T = len(panel["tokens"])
    sns.heatmap(panel["attn"], ax=ax, cmap="viridis", cbar=True, square=False, xticklabels=panel["tokens"],
                yticklabels=panel["tokens"])
    for k in np.flatnonzero(panel["support"]):
        ax.get_xticklabels()[k].set_color("#d62728")
    ax.tick_params(labelsize=6)
    ax.set_title(f"head 0, last layer (published protocol); support in red; {T} tokens")
    masses = panel["heads_mass"]
    bx.barh(np.arange(len(masses)), masses, color=["#d62728" if h == 0 else "#1f77b4" for h in range(len(masses))])
    bx.axvline(panel["share"], color="#333333", ls="--", lw=1, label="uniform attention")
    bx.set_yticks(np.arange(len(masses)), [f"head {h}" for h in range(len(masses))])
    bx.invert_yaxis()
    bx.set_xlabel("mass on support, mean over queries")
    bx.set_title("same example, every head")
    bx.legend(fontsize=8)
    fig.tight_layout()
    return fig
