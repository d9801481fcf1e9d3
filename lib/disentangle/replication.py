"""Section 10: the original study replicated as published, with many seeds, then trained to convergence.

The original study (``references/seed-study.md``: the public repository 323annali/disentanglement, its
``config.json`` and the outputs of its notebook ``disentanglement_experiment_refactored_final.ipynb``)
trains seven configurations once each (seed 42) on bAbI ``en`` qa1. Here each is a :class:`RunConfig` of
this project's library, not a copy of its code:

- data: ``babi_format="published"`` (sentence separators, the last 180 tokens, vocabulary from train + test),
  the whole train file (``n_val=0``: the study holds nothing out), the whole test file;
- model: sinusoidal positions after scaling embeddings by sqrt(d_model), no attention biases (the FFN keeps
  its own), dropout 0.1 (attention probabilities too), mean-pool readout, no sentence-local layer;
- training: AdamW 3e-4 (betas 0.9 / 0.999, torch's default: the study names none), weight decay 1e-2 on every
  parameter, clipping 1.0, batch 64 from a shuffled epoch (``batch_order="epochs"``), constant learning rate;
  ``epochs`` epochs = ``epochs * ceil(n_train / 64)`` optimiser steps (8 epochs of 1000 questions: 128 steps);
- losses: the four published terms (each arm's ``published`` variant) on the last layer only, weights
  0.1 / 0.05 / 0.02 / 0.02.

"Converged" trains the same configurations with ``val`` questions held out from the end of the train file,
for at most ``max_epochs`` epochs, evaluated every epoch, stopped after ``patience`` epochs without a better
validation accuracy (the model at the stop is the one tested), and never before the published epochs: these
models sit at chance for their first ~7 epochs, and without the floor one stopped there (best validation
accuracy 0.21 at epoch 2) and "converged" below the published run.

Two more arms measure the sign of the published MI term: the published term alone (``mi_published``) and this
project's InfoNCE constraint alone at the same weight (``mi_project``), each beside ``vanilla``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from .config import RunConfig
from .stats import diff_ci, mean_ci

SOURCE = ("the original study's repository 323annali/disentanglement on GitHub: configurations from its config.json, "
          "accuracies from the outputs of its notebook disentanglement_experiment_refactored_final.ipynb "
          "(quoted in references/seed-study.md)")

# The published loss weights (config.json: lambda_ortho, lambda_mi, lambda_attn, lambda_head).
WEIGHTS = {"orthogonality": 0.1, "mutual_information": 0.05, "attention_entropy": 0.02, "head_usage": 0.02}
VARIANT_FIELDS = {"orthogonality": "orthogonality_variant", "mutual_information": "mi_variant",
                  "attention_entropy": "attention_entropy_variant", "head_usage": "head_usage_variant"}
BATCH = 64


@dataclass(frozen=True)
class Published:
    """One configuration of the original study's config.json, and its reported test accuracy (one seed)."""

    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    epochs: int
    losses: tuple[str, ...]  # constraint arms on, at WEIGHTS, variant "published" (MI: see `mi_variant`)
    accuracy: float | None  # published test accuracy; None for the arms added here (the MI sign)
    mi_variant: str = "published"


ALL = tuple(WEIGHTS)
PUBLISHED: dict[str, Published] = {
    "vanilla": Published(128, 8, 2, 256, 8, (), 0.370),
    "ortho_mi": Published(128, 8, 2, 256, 8, ("orthogonality", "mutual_information"), 0.375),
    "ortho_mi_attn_head": Published(128, 8, 2, 256, 8, ALL, 0.371),
    "vanilla_lrg_1": Published(192, 16, 3, 256, 8, (), 0.393),
    "ortho_mi_attn_head_lrg_1": Published(192, 16, 3, 256, 8, ALL, 0.414),
    "ortho_mi_attn_head_lrg_2": Published(128, 8, 2, 512, 8, ALL, 0.360),
    "ortho_mi_attn_head_lrg_3": Published(192, 16, 3, 512, 16, ALL, 0.412),
}
# Not in the study: the MI term alone, as published and as this project's constraint, at the published weight.
MI_ARMS: dict[str, Published] = {
    "mi_published": Published(128, 8, 2, 256, 8, ("mutual_information",), None),
    "mi_project": Published(128, 8, 2, 256, 8, ("mutual_information",), None, mi_variant="infonce"),
}
CONFIGS = {**PUBLISHED, **MI_ARMS}
BASE = ("vanilla", "ortho_mi", "ortho_mi_attn_head")

# The published comparisons, (name, other): constraints against vanilla at each size, larger against base.
CONSTRAINT_CONTRASTS = (("ortho_mi", "vanilla"), ("ortho_mi_attn_head", "vanilla"),
                        ("ortho_mi_attn_head_lrg_1", "vanilla_lrg_1"))
SIZE_CONTRASTS = (("vanilla_lrg_1", "vanilla"), ("ortho_mi_attn_head_lrg_1", "ortho_mi_attn_head"),
                  ("ortho_mi_attn_head_lrg_2", "ortho_mi_attn_head"), ("ortho_mi_attn_head_lrg_3", "ortho_mi_attn_head"))
PROTOCOLS = ("published", "converged")


def steps_per_epoch(n_train: int, batch_size: int = BATCH) -> int:
    """A shuffled loader's batches per epoch, the last one partial: ceil(n / batch_size)."""
    return -(-n_train // batch_size)


def config(name: str, babi_dir: str, seed: int = 0, protocol: str = "published", *, n_train: int = 1000,
           val: int = 100, max_epochs: int = 60, patience: int = 10, epochs: int | None = None,
           overrides: Mapping[str, object] | None = None) -> RunConfig:
    """The RunConfig of configuration ``name`` (of :data:`CONFIGS`) under ``protocol``.

    ``n_train``: the questions of the train file (1000 in bAbI en), to turn epochs into steps; the run reads
    the whole file either way. ``epochs`` replaces the published epochs (the quick profile); ``overrides``:
    dotted RunConfig fields applied last (the quick profile's smaller models).
    """
    if name not in CONFIGS:
        raise KeyError(f"{name!r} is not a replication configuration (known: {list(CONFIGS)})")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not one of {list(PROTOCOLS)}")
    p = CONFIGS[name]
    converged = protocol == "converged"
    held_out = val if converged else 0
    per_epoch = steps_per_epoch(n_train - held_out)
    n_epochs = max_epochs if converged else (epochs or p.epochs)
    constraints: dict[str, object] = {"layers": [p.n_layers - 1]}  # the last layer only
    for arm in p.losses:
        constraints[arm] = WEIGHTS[arm]
        constraints[VARIANT_FIELDS[arm]] = p.mi_variant if arm == "mutual_information" else "published"
    cfg = RunConfig.from_dict({
        "model": {"d_model": p.d_model, "n_heads": p.n_heads, "n_layers": p.n_layers, "local_layers": 0,
                  "d_ff": p.d_ff, "dropout": 0.1, "max_len": 192, "pos_encoding": "sinusoidal", "readout": "mean",
                  "bias": False, "no_bias": "attention", "scale_embeddings": True},
        "data": {"source": "babi", "tasks": ["qa1"], "babi_dir": babi_dir, "n_train": 0, "n_val": held_out,
                 "n_test": 0, "babi_max_sentences": 50, "babi_format": "published", "babi_max_tokens": 180},
        "train": {"steps": n_epochs * per_epoch, "batch_size": BATCH, "lr": 3e-4, "weight_decay": 0.01,
                  "weight_decay_on": "all", "warmup_steps": 0, "min_lr_ratio": 1.0, "grad_clip": 1.0,
                  "eval_every": per_epoch, "early_stopping": patience if converged else 0,
                  # never shorter than the as-published runs (``epochs`` where a profile shortens those)
                  "min_steps": min(epochs or p.epochs, n_epochs) * per_epoch if converged else 0,
                  "batch_order": "epochs", "adam_beta2": 0.999, "amp": "off"},
        "constraints": constraints,
        "seed": seed,
    })
    return cfg.replace(**dict(overrides)) if overrides else cfg


def grid(names: Sequence[str], seeds: Sequence[int], babi_dir: str, protocol: str, **kwargs) -> list[tuple[str, str, int, RunConfig]]:
    """(name, protocol, seed, config) for every name and seed."""
    return [(n, protocol, s, config(n, babi_dir, s, protocol, **kwargs)) for n in names for s in seeds]


def train(points: Sequence[tuple[str, str, int, RunConfig]], cache_dir=None, n_jobs: int | None = None,
          desc: str = "replication") -> tuple[pd.DataFrame, list]:
    """Train (or load from the cache) every point in one grid; returns :func:`frame` and the RunResults."""
    from .train import run, run_grid

    configs = [c for *_, c in points]
    run_grid(configs, cache_dir, n_jobs=n_jobs, desc=desc)
    results = [run(c, cache_dir) for c in configs]  # finished: loads from the cache
    return frame(points, results), results


def frame(points: Sequence[tuple[str, str, int, RunConfig]], results: Sequence) -> pd.DataFrame:
    """One row per run: name, protocol, seed, status, test accuracy, steps done, epochs, best val accuracy."""
    rows = []
    for (name, protocol, seed, cfg), r in zip(points, results):
        per_epoch = cfg.train.eval_every
        rows.append({"name": name, "protocol": protocol, "seed": seed, "status": r.status,
                     "test_acc": r.metrics.get("test_acc", math.nan) if r.status == "finished" else math.nan,
                     "steps": int(r.metrics.get("steps_done", 0)), "epochs": r.metrics.get("steps_done", 0) / per_epoch,
                     "best_val_acc": r.metrics.get("best_val_acc", math.nan), "wall_time": r.wall_time})
    return pd.DataFrame(rows)


def prediction_interval(x: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Where one more seed's value falls with probability ``level``: mean ± t s sqrt(1 + 1/n). A published
    single-seed number is judged against this one, not against the interval of the mean (which shrinks with n)."""
    a = np.asarray(x, float)
    a = a[np.isfinite(a)]
    if len(a) < 2:
        return math.nan, math.nan
    half = sps.t.ppf(0.5 + level / 2, len(a) - 1) * a.std(ddof=1) * math.sqrt(1 + 1 / len(a))
    return float(a.mean() - half), float(a.mean() + half)


def table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (protocol, name): our mean test accuracy with its 95% interval, the 95% prediction interval of one
    seed, n, the published number and whether it is inside each interval."""
    rows = []
    for (protocol, name), g in runs.groupby(["protocol", "name"], sort=False):
        m, lo, hi = mean_ci(g["test_acc"])
        plo, phi = prediction_interval(g["test_acc"])
        pub = CONFIGS[name].accuracy
        inside = lambda a, b: bool(a <= pub <= b) if pub is not None and math.isfinite(a) else None  # noqa: E731
        rows.append({"protocol": protocol, "name": name, "n": int(g["test_acc"].notna().sum()), "mean": m,
                     "ci_low": lo, "ci_high": hi, "pi_low": plo, "pi_high": phi, "published": pub,
                     "published_in_ci": inside(lo, hi), "published_in_pi": inside(plo, phi),
                     "epochs": float(g["epochs"].mean())})
    return pd.DataFrame(rows)


def contrast(runs: pd.DataFrame, name: str, other: str, protocol: str) -> dict:
    """Our ``name`` − ``other`` accuracy under ``protocol``: paired by seed when the two have the same shape
    (same seed: same initial weights and batch order), Welch's interval otherwise; and the published difference."""
    sub = runs[runs["protocol"] == protocol]
    a = sub[sub["name"] == name].set_index("seed")["test_acc"]
    b = sub[sub["name"] == other].set_index("seed")["test_acc"]
    pa, pb = CONFIGS[name], CONFIGS[other]
    same_shape = (pa.d_model, pa.n_heads, pa.n_layers, pa.d_ff, pa.epochs) == (pb.d_model, pb.n_heads, pb.n_layers, pb.d_ff, pb.epochs)
    if same_shape:
        seeds = a.index.intersection(b.index)
        e, lo, hi = mean_ci((a.loc[seeds] - b.loc[seeds]).to_numpy(float))
        n, how = len(seeds), f"paired over {len(seeds)} seeds"
    else:
        e, lo, hi = diff_ci(a.to_numpy(float), b.to_numpy(float))
        n, how = min(len(a), len(b)), f"Welch, {len(a)} vs {len(b)} seeds"
    published = (pa.accuracy - pb.accuracy) if pa.accuracy is not None and pb.accuracy is not None else math.nan
    return {"protocol": protocol, "name": name, "other": other, "effect": e, "ci_low": lo, "ci_high": hi, "n": n,
            "how": how, "published": published}


def contrasts(runs: pd.DataFrame) -> pd.DataFrame:
    """Every published comparison (:data:`CONSTRAINT_CONTRASTS`, :data:`SIZE_CONTRASTS`) that ``runs`` can make."""
    rows = []
    for protocol in PROTOCOLS:
        have = set(runs.loc[runs["protocol"] == protocol, "name"])
        for kind, pairs in (("constraints vs vanilla", CONSTRAINT_CONTRASTS), ("larger vs base", SIZE_CONTRASTS)):
            rows += [{"kind": kind, **contrast(runs, a, b, protocol)} for a, b in pairs if {a, b} <= have]
    return pd.DataFrame(rows, columns=["kind", "protocol", "name", "other", "effect", "ci_low", "ci_high", "n", "how", "published"])


# ------------------------------------------------------------------------------ per-model measures


def last_layer(result) -> int:
    return result.config.model.n_layers - 1


def posthoc_mi(result, steps: int = 300) -> dict[str, float]:
    """Post-hoc MI between the last layer's heads (mean over pairs, nats) from freshly fitted InfoNCE and
    CLUB estimators (:func:`disentangle.analysis.posthoc_mi`) on the run's test split; kept with the run."""
    from . import analysis

    return result.derived(f"replication_mi_{steps}",
                          lambda r: analysis.posthoc_mi(r, layers=[last_layer(r)], steps=steps, seed=0))


@torch.no_grad()
def support_mass(result, batch_size: int = 250) -> dict[str, float]:
    """The measured protocol: the attention mass every real query of the last layer puts on the supporting
    sentence's tokens, averaged over queries, heads and every test example; ``support_excess`` subtracts the
    share of supporting tokens in the input (what uniform attention would give)."""

    def compute(r) -> dict[str, float]:
        model, split = r.load_model(), r.data().splits["test"]
        mass, share, n = 0.0, 0.0, 0
        for start in range(0, len(split), batch_size):
            b = split.batch(slice(start, start + batch_size))
            out = model(b["tokens"], b["padding_mask"], capture="attn", segments=b["segments"])
            A = out.attn[last_layer(r)]  # (B, H, T, T)
            real = (~b["padding_mask"]).float()  # (B, T)
            sup = b["support_mask"].float() * real
            on_support = torch.einsum("bhqk,bk->bhq", A, sup)  # (B, H, T): each query's mass on support
            per_example = (on_support * real[:, None]).sum(-1) / real.sum(-1)[:, None]  # (B, H)
            mass += float(per_example.mean(1).sum())
            share += float((sup.sum(1) / real.sum(1)).sum())
            n += len(b["tokens"])
        return {"support_mass": mass / n, "support_share": share / n, "support_excess": (mass - share) / n}

    return result.derived("replication_support", compute)


@torch.no_grad()
def heatmap(result, index: int = 0, head: int = 0) -> dict:
    """The published protocol: one test example's attention, one head (0) of the last layer. Returns the
    tokens, the (T, T) map, the support mask, the head's mass on the support (mean over queries) and the
    same for every head of that example, to set the one map beside what the others do."""
    model, data = result.load_model(), result.data()
    split = data.splits["test"]
    b = split.batch(slice(index, index + 1))
    out = model(b["tokens"], b["padding_mask"], capture="attn", segments=b["segments"])
    T = int((~b["padding_mask"][0]).sum())
    A = out.attn[last_layer(result)][0, :, :T, :T]  # (H, T, T)
    sup = b["support_mask"][0, :T].float()
    per_head = (A @ sup).mean(-1)  # (H,): mean over queries of the mass on support
    return {"tokens": data.vocab.decode(b["tokens"][0, :T]), "attn": A[head].numpy(), "support": sup.numpy().astype(bool),
            "head_mass": float(per_head[head]), "heads_mass": per_head.numpy(), "share": float(sup.mean()),
            "correct": bool(out.logits[0].argmax() == b["answers"][0]), "question": " ".join(split.stories[index].question)}


def measures(points: Sequence[tuple[str, str, int, RunConfig]], results: Sequence, mi_names: Sequence[str],
             mi_seeds: Sequence[int], mi_steps: int = 300) -> pd.DataFrame:
    """Per finished run: the support mass of the last layer; and post-hoc MI (InfoNCE, CLUB) for the
    as-published runs of ``mi_names`` with ``mi_seeds`` (fitting estimators costs seconds a model; NaN elsewhere)."""
    rows = []
    for (name, protocol, seed, _), r in zip(points, results):
        if r.status != "finished":
            continue
        wanted = name in mi_names and seed in mi_seeds and protocol == "published"
        mi = posthoc_mi(r, mi_steps) if wanted else {"infonce": math.nan, "club": math.nan}
        rows.append({"name": name, "protocol": protocol, "seed": seed, **mi, **support_mass(r)})
    return pd.DataFrame(rows, columns=["name", "protocol", "seed", "infonce", "club", "support_mass", "support_share", "support_excess"])


def paired(models: pd.DataFrame, name: str, other: str, column: str, protocol: str = "published") -> np.ndarray:
    """Per seed: column(name) − column(other) under ``protocol``."""
    sub = models[models["protocol"] == protocol]
    a = sub[sub["name"] == name].set_index("seed")[column]
    b = sub[sub["name"] == other].set_index("seed")[column]
    seeds = a.index.intersection(b.index)
    return (a.loc[seeds] - b.loc[seeds]).to_numpy(float)


__all__ = ["BASE", "CONFIGS", "MI_ARMS", "PUBLISHED", "SOURCE", "WEIGHTS", "config", "contrasts", "frame", "grid",
           "heatmap", "measures", "paired", "posthoc_mi", "prediction_interval", "support_mass", "table"]
