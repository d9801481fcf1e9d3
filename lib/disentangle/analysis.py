"""Interpretability metrics for attention heads: attention correctness, sparsity, sinks, similarity,
ablation importance, usage, linear probes and how exclusively factors map to heads.

The study's claim to test: constraints make attention *sparser* but not more *correct*. Heatmaps cannot
settle that; the ground-truth supporting tokens of every example (``Split.support_mask``) can.

Conventions
-----------
* A head is ``(layer, head)``. By default only the **global** layers are analysed
  (``layer >= model.cfg.local_layers``): a sentence-local layer sees one sentence at a time, so "mass on
  the supporting tokens" from the readout query is meaningless there. Every function takes ``layers=``.
* The **readout query** is the CLS token at position 0 (``model.cfg.readout == "cls"``). Metrics named
  ``*_cls`` use that row of the attention matrix whatever the readout is.
* **Real** keys / queries are the non-padding tokens. n = number of real tokens of the example.
* **Sink** tokens are CLS, SEP and punctuation (``data.CLS``, ``data.SEP``, ``data.PUNCTUATION``).
  A supporting sentence's final "." is both supporting and sink: its mass counts in both.
* **Intervals**: frames about one model carry 95 % Student-t intervals over *examples*
  (``<metric>_ci_low`` / ``<metric>_ci_high``, identical to :func:`stats.mean_ci` per group) and ``n``,
  the number of examples. :func:`model_level` gives intervals over *models* (seeds) instead: it first
  averages each model over its heads, then takes the t-interval over the models of a group. Per-head
  values are not averaged across seeds: head 3 of one seed has nothing to do with head 3 of another.
* Several models: compute each frame per model and concatenate with a ``model`` column (and e.g. a
  ``constraint`` column), e.g. ``pd.concat([f.assign(model=name, constraint=c) for ...])``; the
  summarising functions (:func:`sparsity_vs_correctness`, :func:`head_report_card`, :func:`exclusivity_by`,
  :func:`model_level`) understand that column.

Per-example attention metrics (:func:`attention_metrics_from_tensors`; A = attention of one head of one
example, rows = queries, S = supporting-token indicator, K = sink indicator, Q = question tokens):

==========================  =====================================================================================
``entropy``                 mean over real queries q of H(A[q,·]) / log n, H = −Σ_k A log A (0 if n = 1; as the constraint)
``entropy_cls``             the same for the CLS row only
``support_mass_cls``        Σ_k A[0,k] S[k]: mass the readout query puts on supporting tokens
``support_mass_question``   mean over question tokens q of Σ_k A[q,k] S[k] (NaN without question tokens)
``support_share``           Σ_k S[k] / n: chance level of the support mass under uniform attention
``support_excess_cls``      support_mass_cls − support_share: support mass above chance
``topk_precision``          fraction of the CLS row's k' = min(k, n) most attended real keys that are supporting
``sink_mass``               Σ_k A[0,k] K[k]: CLS-query mass on CLS, SEP and punctuation
``sink_share``              Σ_k K[k] / n: chance level of the sink mass
==========================  =====================================================================================

Ties in ``topk_precision`` (e.g. uniform attention) are broken by ``torch.topk`` (implementation-defined).

Typical use (one model; tag each frame with ``model=`` / ``constraint=`` columns to pool several)::

    model, data = result.load_model(), result.data()
    test = data.splits["test"]
    metrics = head_attention_metrics(model, test, data)         # (layer, head, task) rows with intervals
    importance = head_importance(model, test, data.tasks)       # accuracy drop per head and task
    usage = head_usage(model, test)
    probes = probe_heads(model, test, story_factors(test), ["answer", "queried", "task"])
    card = head_report_card(metrics, importance, usage, probes)  # one row per head
    exclusivity(probes)                                          # DCI disentanglement / completeness
    sparsity_vs_correctness(all_models_metrics, by="constraint") # the central figure's statistics
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from torch import Tensor, nn
from torch.nn import functional as F

from . import stats
from .constraints import _EPS, CLUB, _BatchedMLP, _pairs, _standardise, infonce_bound, normalised_row_entropy, pooled_heads
from .data import CLS, PUNCTUATION, SEP, Split, Story, TaskData, Vocab, iter_batches
from .data.procedural import ANIMALS, OBJECTS, PLACES, PRONOUN
from .model import Encoder

Head = tuple[int, int]


# Columns of the per-example attention metrics, in display order.
ATTENTION_METRICS = (
    "entropy",
    "entropy_cls",
    "support_mass_cls",
    "support_mass_question",
    "support_share",
    "support_excess_cls",
    "topk_precision",
    "sink_mass",
    "sink_share",
)

# One line per column, for table captions in the notebooks.
METRICS: dict[str, str] = {
    "entropy": "attention entropy / log n, mean over real queries (1 = uniform, 0 = one-hot)",
    "entropy_cls": "attention entropy / log n of the CLS (readout) query",
    "support_mass_cls": "attention mass of the CLS query on supporting tokens",
    "support_mass_question": "attention mass on supporting tokens, mean over question-token queries",
    "support_share": "share of real tokens that are supporting (support mass of uniform attention)",
    "support_excess_cls": "support_mass_cls − support_share (support mass above chance)",
    "topk_precision": "share of the CLS query's top-k attended tokens that are supporting",
    "sink_mass": "attention mass of the CLS query on CLS, SEP and punctuation",
    "sink_share": "share of real tokens that are sinks (sink mass of uniform attention)",
    "importance": "accuracy drop when the head is zeroed (baseline − ablated)",
    "ce_increase": "cross-entropy increase when the head is zeroed",
    "usage_share": "head's share of its layer's Σ‖contribution‖₂ over real tokens",
    "usage_share_cls": "head's share of its layer's ‖contribution‖₂ at the CLS token",
}

NUMBER_WORDS = {"none": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                "seven": 7, "eight": 8, "nine": 9, "ten": 10}  # fmt: skip


# ----------------------------------------------------------------------------------------------- helpers


def _device(model: Encoder) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: Encoder) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _layers(model: Encoder, layers: Iterable[int] | None) -> list[int]:
    """The analysed layers: the given ones (checked), else the global ones."""
    L = model.cfg.n_layers
    if layers is None:
        return list(range(model.cfg.local_layers, L))
    out = [int(layer) for layer in layers]
    bad = [layer for layer in out if not 0 <= layer < L]
    if bad:
        raise ValueError(f"layers={bad} are not layers of this model (0..{L - 1})")
    if not out:
        raise ValueError("layers is empty: name at least one layer")
    return out


def task_names(split: Split, tasks: Sequence[str] | None = None) -> list[str]:
    """Names of the split's task ids: ``tasks`` (e.g. ``TaskData.tasks``) if given, else read off the stories."""
    n_ids = int(split.task_ids.max()) + 1 if len(split) else 0
    if tasks is not None:
        tasks = list(tasks)
        if len(tasks) < n_ids:
            raise ValueError(f"tasks has {len(tasks)} names but the split has task ids up to {n_ids - 1}")
        return tasks
    names = [f"task{i}" for i in range(n_ids)]
    for tid, story in zip(split.task_ids.tolist(), split.stories):
        names[tid] = story.task
    return names


def sink_token_ids(vocab: Vocab | TaskData) -> list[int]:
    """Ids of CLS, SEP and the punctuation tokens present in ``vocab`` (or in a TaskData's input vocab)."""
    vocab = vocab.vocab if isinstance(vocab, TaskData) else vocab
    return [vocab.stoi[w] for w in (CLS, SEP, *PUNCTUATION) if w in vocab]


def _t_summary(df: pd.DataFrame, keys: list[str], metrics: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """Per group of ``keys``: each metric's mean with a Student-t interval over the group's finite rows
    (vectorised :func:`stats.mean_ci`: NaN bounds with fewer than two values), and ``n`` (rows)."""
    g = df.groupby(keys, sort=True, dropna=False)[list(metrics)]
    mean, std, count = g.mean(), g.std(ddof=1), g.count()
    out = pd.DataFrame(index=mean.index)
    for m in metrics:
        c = count[m].to_numpy(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.where(c >= 2, sps.t.ppf(0.5 + level / 2, np.maximum(c - 1, 1)), np.nan)
            half = t * std[m].to_numpy(float) / np.sqrt(c)
        out[m] = mean[m]
        out[f"{m}_ci_low"] = mean[m] - half
        out[f"{m}_ci_high"] = mean[m] + half
    out["n"] = g.size()
    return out.reset_index()


def _model_keys(*frames: pd.DataFrame) -> list[str]:
    """["model"] when every frame has a model column, [] when none has; else an error."""
    has = [("model" in f.columns) for f in frames]
    if all(has):
        return ["model"]
    if any(has):
        raise ValueError("some frames have a 'model' column and others do not; add it to all of them")
    return []


# --------------------------------------------------------------------------------- attention metrics


@torch.no_grad()
def attention_metrics_from_tensors(
    attn: Tensor,
    padding_mask: Tensor,
    support_mask: Tensor,
    question_mask: Tensor,
    sink_mask: Tensor,
    k: int = 3,
) -> dict[str, Tensor]:
    """Per-example, per-head attention metrics from one layer's attention (the formulas of the module
    docstring).

    attn: (B, H, T, T) probabilities, rows = queries, each real row summing to 1 over the real keys;
    padding_mask: (B, T) bool, True on padding; support_mask, question_mask, sink_mask: (B, T) bool.
    Values at padded keys and in padded query rows are ignored. Returns ``{name: (B, H) float32}`` for
    every name in :data:`ATTENTION_METRICS`.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be (batch, heads, T, T), got {tuple(attn.shape)}")
    B, H, T, _ = attn.shape
    for name, m in (("padding_mask", padding_mask), ("support_mask", support_mask),
                    ("question_mask", question_mask), ("sink_mask", sink_mask)):  # fmt: skip
        if m.shape != (B, T) or m.dtype != torch.bool:
            raise ValueError(f"{name} must be a (B, T) = {(B, T)} bool tensor, got {tuple(m.shape)} {m.dtype}")
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    real = ~padding_mask
    realf = real.float()  # (B, T)
    n = realf.sum(1)  # (B,)
    sup = (support_mask & real).float()
    sink = (sink_mask & real).float()
    qry = (question_mask & real).float()
    A = attn.float() * realf[:, None, None, :]  # padded keys -> 0 (they already are, from the model)

    # Entropy of every row, normalised by log n (0 when n = 1).
    ent = normalised_row_entropy(A, padding_mask)  # (B, H, T), the constraint's own definition
    entropy = (ent * realf[:, None, :]).sum(-1) / n.clamp_min(1.0)[:, None]
    entropy_cls = ent[:, :, 0]

    cls_row = A[:, :, 0, :]  # (B, H, T): the readout query
    support_mass_cls = (cls_row * sup[:, None, :]).sum(-1)
    sink_mass = (cls_row * sink[:, None, :]).sum(-1)

    on_support = torch.einsum("bhqk,bk->bhq", A, sup)  # (B, H, T): each query's mass on support
    n_q = qry.sum(1)  # (B,)
    support_mass_question = (on_support * qry[:, None, :]).sum(-1) / n_q[:, None]  # NaN where n_q = 0
    support_mass_question = torch.where(n_q[:, None] > 0, support_mass_question, float("nan"))

    kk = min(k, T)
    scores = cls_row.masked_fill(padding_mask[:, None, :], float("-inf"))
    idx = scores.topk(kk, dim=-1).indices  # (B, H, kk)
    hit = sup[:, None, :].expand(B, H, T).gather(-1, idx)  # (B, H, kk)
    k_eff = n.clamp(max=k)  # (B,): k capped by the number of real keys
    valid = (torch.arange(kk, device=attn.device)[None, :] < k_eff[:, None]).float()  # (B, kk)
    topk_precision = (hit * valid[:, None, :]).sum(-1) / k_eff.clamp_min(1.0)[:, None]

    support_share = (sup.sum(1) / n.clamp_min(1.0))[:, None].expand(B, H)
    sink_share = (sink.sum(1) / n.clamp_min(1.0))[:, None].expand(B, H)
    return {
        "entropy": entropy,
        "entropy_cls": entropy_cls,
        "support_mass_cls": support_mass_cls,
        "support_mass_question": support_mass_question,
        "support_share": support_share,
        "support_excess_cls": support_mass_cls - support_share,
        "topk_precision": topk_precision,
        "sink_mass": sink_mass,
        "sink_share": sink_share,
    }


def attention_examples(
    model: Encoder,
    split: Split,
    vocab: Vocab | TaskData,
    k: int = 3,
    batch_size: int = 256,
    layers: Iterable[int] | None = None,
    tasks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-example attention metrics: one row per (example, layer, head), one pass with ``capture="attn"``.

    Columns: ``example`` (index in the split), ``task``, ``layer``, ``head`` and every name of
    :data:`ATTENTION_METRICS`. ``vocab``: the input vocabulary (or the TaskData), for the sink-token ids.
    """
    layer_ids = _layers(model, layers)
    sink_ids = torch.tensor(sink_token_ids(vocab), dtype=torch.long)
    device = _device(model)
    sink_ids = sink_ids.to(device)
    H = model.cfg.n_heads
    chunks: dict[str, list[Tensor]] = {m: [] for m in ATTENTION_METRICS}
    with _eval_mode(model):
        for b in iter_batches(split, batch_size, device):
            out = model(b["tokens"], b["padding_mask"], capture="attn", segments=b["segments"])
            sink_mask = torch.isin(b["tokens"], sink_ids)
            per_layer = [attention_metrics_from_tensors(out.attn[layer], b["padding_mask"], b["support_mask"],
                                                        b["question_mask"], sink_mask, k) for layer in layer_ids]  # fmt: skip
            for m in ATTENTION_METRICS:
                chunks[m].append(torch.stack([v[m] for v in per_layer], 1).cpu())  # (B, L_sel, H)
    N, Ls = len(split), len(layer_ids)
    names = np.asarray(task_names(split, tasks), dtype=object)
    frame = pd.DataFrame({
        "example": np.repeat(np.arange(N), Ls * H),
        "task": np.repeat(names[split.task_ids.numpy()], Ls * H),
        "layer": np.tile(np.repeat(np.asarray(layer_ids), H), N),
        "head": np.tile(np.arange(H), N * Ls),
    })
    for m in ATTENTION_METRICS:
        frame[m] = torch.cat(chunks[m]).reshape(-1).numpy().astype(float)
    return frame


def summarise_heads(examples: pd.DataFrame, metrics: Sequence[str] = ATTENTION_METRICS, level: float = 0.95) -> pd.DataFrame:
    """Per-example rows -> one row per (layer, head, task) plus a ``task == "all"`` row per head: each
    metric's mean, ``<metric>_ci_low`` / ``<metric>_ci_high`` (t-interval over examples) and ``n``.
    A ``model`` column, if present, is kept as a key."""
    keys = [*_model_keys(examples), "layer", "head"]
    per_task = _t_summary(examples, [*keys, "task"], metrics, level)
    overall = _t_summary(examples, keys, metrics, level).assign(task="all")
    out = pd.concat([per_task, overall[per_task.columns]], ignore_index=True)
    out["_all"] = out["task"] == "all"  # tasks alphabetically, then "all"
    return out.sort_values([*keys, "_all", "task"], kind="stable").drop(columns="_all").reset_index(drop=True)


def head_attention_metrics(
    model: Encoder,
    split: Split,
    vocab: Vocab | TaskData,
    k: int = 3,
    batch_size: int = 256,
    layers: Iterable[int] | None = None,
    tasks: Sequence[str] | None = None,
    level: float = 0.95,
) -> pd.DataFrame:
    """One row per (layer, head, task) and per (layer, head) with ``task == "all"``: every metric of
    :data:`ATTENTION_METRICS` averaged over the split's examples, with its t-interval over examples
    (``<metric>_ci_low``, ``<metric>_ci_high``) and ``n``. See :func:`attention_examples` for the
    per-example values and the module docstring for the formulas."""
    return summarise_heads(attention_examples(model, split, vocab, k, batch_size, layers, tasks), level=level)


def model_level(
    frame: pd.DataFrame,
    metrics: Sequence[str],
    by: str | Sequence[str] = "constraint",
    task: str = "all",
    level: float = 0.95,
) -> pd.DataFrame:
    """Intervals over models (seeds): average each model's heads, then t-intervals over the models of a group.

    frame: per-head rows of several models (a ``model`` column, the ``by`` columns, ``task`` if present),
    e.g. concatenated :func:`head_attention_metrics`. Keeps the rows of ``task`` (when there is a task
    column), averages each metric over each model's (layer, head) rows, then per group of ``by``: mean,
    ``<metric>_ci_low`` / ``<metric>_ci_high`` (t over models) and ``n`` (models).
    """
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in ["model", *by] if c not in frame.columns]
    if missing:
        raise ValueError(f"frame has no column(s) {missing}; add a 'model' column and the grouping columns")
    df = frame[frame["task"] == task] if "task" in frame.columns else frame
    per_model = df.groupby(["model", *by], sort=True, dropna=False)[list(metrics)].mean().reset_index()
    return _t_summary(per_model, by, metrics, level)


# ------------------------------------------------------------------------------------------ similarity


@torch.no_grad()
def attention_similarity_from_tensors(attn: Tensor, padding_mask: Tensor, queries: str = "all") -> tuple[Tensor, Tensor]:
    """Sum over examples and queries of cos(A_i[q, ·], A_j[q, ·]) for every head pair, and the query count.

    attn: (B, H, T, T); padding_mask: (B, T). Keys: real ones; queries: every real query (``"all"``) or the
    CLS row only (``"cls"``). Returns (sum (H, H), count (scalar)), both float64; their ratio is the mean
    cosine. A row that is all zero has cosine 0 with everything (and 0 on the diagonal).

    What holds by definition holds by construction, on any CPU: the sum is accumulated in float64 and
    symmetrised, and its diagonal is the count of nonzero rows itself (a row's cosine with itself is 1), not
    a float32 sum of squared unit vectors, which lands on 1 only within rounding that depends on the kernel.
    """
    if queries not in ("all", "cls"):
        raise ValueError(f"queries={queries!r} is not one of ['all', 'cls']")
    realf = (~padding_mask).double()
    A = attn.double() * realf[:, None, None, :]
    if queries == "cls":
        A, qw = A[:, :, :1], realf[:, :1]
    else:
        qw = realf
    norm = torch.linalg.vector_norm(A, dim=-1, keepdim=True)  # (B, H, Tq, 1)
    unit = A / norm.clamp_min(_EPS)  # (B, H, Tq, T)
    unit = unit * qw[:, None, :, None]  # drop padded queries
    sums = torch.einsum("bhqk,bgqk->hg", unit, unit)
    sums = (sums + sums.T) / 2
    nonzero = ((norm[..., 0] > 0).double() * qw[:, None, :]).sum((0, 2))  # (H,) rows whose cosine with themselves is 1
    sums = sums - torch.diag(sums.diagonal()) + torch.diag(nonzero)
    return sums, qw.sum()


def linear_cka(x: Tensor) -> Tensor:
    """Linear CKA (Kornblith et al. 2019) between heads' representations of the same examples.

    x: (N, H, d). With X_h the (N, d) centred representation of head h:
    ``CKA(h, g) = ‖X_hᵀ X_g‖_F² / (‖X_hᵀ X_h‖_F ‖X_gᵀ X_g‖_F)`` ∈ [0, 1], invariant to rotations and
    isotropic scaling of each head's coordinates (unlike a raw cosine, which compares coordinates that
    different heads use differently). Returns (H, H); NaN where a head's representation is constant.
    """
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    cross = torch.einsum("nhd,nge->hgde", x, x)  # (H, H, d, d)
    sq = cross.square().sum((-1, -2))  # ‖X_hᵀ X_g‖_F²
    sq = (sq + sq.T) / 2  # symmetric by definition; the einsum's two orders may round differently
    self_norm = sq.diagonal().sqrt()  # ‖X_hᵀ X_h‖_F
    denom = self_norm[:, None] * self_norm[None, :]
    cka = torch.where(denom > 0, sq / denom.clamp_min(_EPS), float("nan"))
    # CKA(h, h) = 1 by definition; sqrt(x)² need not round back to x, so set it rather than compute it.
    defined = self_norm > 0
    cka.diagonal().copy_(torch.where(defined, 1.0, float("nan")))
    return cka.float()


def head_similarity(
    model: Encoder,
    split: Split,
    layers: Iterable[int] | None = None,
    kind: str = "attention",
    queries: str = "all",
    batch_size: int = 256,
) -> dict[int, np.ndarray]:
    """Per layer, an (H, H) matrix of pairwise similarity between heads.

    ``kind="attention"``: mean over examples and real queries (``queries="all"``, or ``"cls"`` for the
    readout row only) of the cosine between two heads' attention rows over real keys — the quantity the
    attention-orthogonality constraint penalises (1 = same positions in the same proportions, 0 = disjoint).
    ``kind="cka"``: linear CKA between the heads' pooled outputs (mean over real tokens, constraints.pooled_heads)
    across the split's examples (see :func:`linear_cka`); 1 = the same representation up to rotation and scale.
    """
    if kind not in ("attention", "cka"):
        raise ValueError(f"kind={kind!r} is not one of ['attention', 'cka']")
    layer_ids = _layers(model, layers)
    device = _device(model)
    H = model.cfg.n_heads
    sums = {layer: torch.zeros(H, H, device=device, dtype=torch.float64) for layer in layer_ids}
    count = torch.zeros((), device=device, dtype=torch.float64)
    pooled: dict[int, list[Tensor]] = {layer: [] for layer in layer_ids}
    with _eval_mode(model):
        for b in iter_batches(split, batch_size, device):
            capture = "attn" if kind == "attention" else "head_out"
            out = model(b["tokens"], b["padding_mask"], capture=capture, segments=b["segments"])
            for layer in layer_ids:
                if kind == "attention":
                    s, c = attention_similarity_from_tensors(out.attn[layer], b["padding_mask"], queries)
                    sums[layer] += s
                else:
                    pooled[layer].append(pooled_heads(out.head_out[layer], b["padding_mask"]).cpu())
            if kind == "attention":
                count += c
    if kind == "attention":
        return {layer: (sums[layer] / count.clamp_min(1.0)).cpu().numpy() for layer in layer_ids}
    return {layer: linear_cka(torch.cat(pooled[layer])).numpy() for layer in layer_ids}


# ------------------------------------------------------------------------------------------ importance


@torch.no_grad()
def _correct_and_loss(model: Encoder, split: Split, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per example: 1.0 if the prediction is right, and the cross-entropy."""
    device = _device(model)
    correct, losses = [], []
    for b in iter_batches(split, batch_size, device):
        logits = model(b["tokens"], b["padding_mask"], segments=b["segments"]).logits.float()
        correct.append((logits.argmax(-1) == b["answers"]).float().cpu())
        losses.append(torch.nn.functional.cross_entropy(logits, b["answers"], reduction="none").cpu())
    return torch.cat(correct).numpy().astype(float), torch.cat(losses).numpy().astype(float)


def head_importance(
    model: Encoder,
    split: Split,
    tasks: Sequence[str] | None = None,
    layers: Iterable[int] | None = None,
    batch_size: int = 500,
    small: float = 0.01,
    large: float = 0.05,
    level: float = 0.95,
) -> pd.DataFrame:
    """Accuracy drop when each head is zeroed (``model.ablate_heads``), per task and overall.

    One row per (layer, head, task) and per (layer, head) with ``task == "all"``:

    * ``importance`` = acc(intact) − acc(head ablated) on the task's examples, with ``importance_ci_low``
      / ``importance_ci_high``: the t-interval of the per-example paired difference
      correct_intact − correct_ablated ∈ {−1, 0, 1};
    * ``ce_increase`` = mean CE(ablated) − CE(intact), with its interval likewise;
    * ``base_acc``, ``ablated_acc``, ``n`` (examples);
    * the per-head context-dependence summary of :func:`context_dependence` (``importance_mean``,
      ``importance_max``, ``max_task``, ``context_dependent``), repeated on the head's rows.

    ``tasks``: names of the task ids (e.g. ``TaskData.tasks``); default read off the stories.
    """
    layer_ids = _layers(model, layers)
    names = np.asarray(task_names(split, tasks), dtype=object)
    task_col = names[split.task_ids.numpy()]
    rows = []
    with _eval_mode(model):
        base_correct, base_loss = _correct_and_loss(model, split, batch_size)
        for layer in layer_ids:
            for head in range(model.cfg.n_heads):
                with model.ablate_heads([(layer, head)]):
                    abl_correct, abl_loss = _correct_and_loss(model, split, batch_size)
                rows.append(pd.DataFrame({
                    "layer": layer, "head": head, "task": task_col,
                    "importance": base_correct - abl_correct, "ce_increase": abl_loss - base_loss,
                    "base_acc": base_correct, "ablated_acc": abl_correct,
                }))  # fmt: skip
    per_example = pd.concat(rows, ignore_index=True)
    summary = summarise_heads(per_example, ("importance", "ce_increase", "base_acc", "ablated_acc"), level)
    summary = summary.drop(columns=[c for c in summary.columns if c.startswith(("base_acc_", "ablated_acc_"))])
    flags = context_dependence(summary, small, large)
    return summary.merge(flags, on=["layer", "head"], how="left")


def context_dependence(importance: pd.DataFrame, small: float = 0.01, large: float = 0.05) -> pd.DataFrame:
    """Heads that matter a lot for one task although their average importance is small.

    importance: rows (layer, head, task, importance) as from :func:`head_importance` (an ``all`` task row
    is ignored; a ``model`` column is kept as a key). Per head:

    * ``importance_mean`` = unweighted mean over tasks of the per-task importance;
    * ``importance_max`` = max over tasks, ``max_task`` = the task where it is reached;
    * ``context_dependent`` = importance_mean < ``small`` and importance_max > ``large``.

    Such a head looks idle on average — what head-usage sparsity would prune — yet one task needs it.
    Note: with K tasks and non-negative drops, importance_mean ≥ importance_max / K, so the flag can fire
    only when K > large / small (6 tasks with the defaults); with fewer tasks rank heads by
    ``importance_max − importance_mean`` instead.
    """
    keys = [*_model_keys(importance), "layer", "head"]
    df = importance[importance["task"] != "all"].reset_index(drop=True)
    if df.empty:
        raise ValueError("importance has no per-task rows")
    g = df.groupby(keys, sort=True)
    out = g["importance"].mean().rename("importance_mean").to_frame()
    out["importance_max"] = g["importance"].max()
    out["max_task"] = df.loc[g["importance"].idxmax().to_numpy(), [*keys, "task"]].set_index(keys)["task"]
    out["context_dependent"] = (out["importance_mean"] < small) & (out["importance_max"] > large)
    return out.reset_index()


# ----------------------------------------------------------------------------------------------- usage


def head_usage(
    model: Encoder,
    split: Split,
    layers: Iterable[int] | None = None,
    batch_size: int = 256,
    tasks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Each head's share of its layer's work, as in constraints.head_usage_entropy.

    One row per (layer, head, task) and (layer, head, "all"): ``usage`` = Σ over the examples and real
    tokens t of ‖c_h(t)‖₂ (c_h = the head's contribution to the residual stream), ``usage_share`` =
    usage / Σ_g usage_g over the layer's heads; ``usage_cls`` / ``usage_share_cls`` the same at the CLS
    token only (what the readout reads in the last layer); ``n`` examples. Pooled ratios, no intervals.
    """
    layer_ids = _layers(model, layers)
    device = _device(model)
    names = task_names(split, tasks)
    n_tasks, H = len(names), model.cfg.n_heads
    usage = torch.zeros(len(layer_ids), n_tasks, H, dtype=torch.float64)
    usage_cls = torch.zeros_like(usage)
    with _eval_mode(model):
        for b in iter_batches(split, batch_size, device):
            out = model(b["tokens"], b["padding_mask"], capture="head_contrib", segments=b["segments"])
            onehot = torch.nn.functional.one_hot(b["task_ids"], n_tasks).double()  # (B, n_tasks)
            for i, layer in enumerate(layer_ids):
                norms = torch.linalg.vector_norm(out.head_contrib[layer].float(), dim=-1)  # (B, H, T)
                norms = norms.masked_fill(b["padding_mask"][:, None, :], 0.0).double()
                usage[i] += (onehot.T @ norms.sum(-1)).cpu()
                usage_cls[i] += (onehot.T @ norms[:, :, 0]).cpu()
    counts = torch.bincount(split.task_ids, minlength=n_tasks)
    rows = []
    for i, layer in enumerate(layer_ids):
        for t, name in enumerate([*names, "all"]):
            u = usage[i].sum(0) if name == "all" else usage[i, t]
            uc = usage_cls[i].sum(0) if name == "all" else usage_cls[i, t]
            n = len(split) if name == "all" else int(counts[t])
            if n == 0:
                continue
            share, share_cls = u / u.sum().clamp_min(_EPS), uc / uc.sum().clamp_min(_EPS)
            for h in range(H):
                rows.append({"layer": layer, "head": h, "task": name, "usage": float(u[h]),
                             "usage_share": float(share[h]), "usage_cls": float(uc[h]),
                             "usage_share_cls": float(share_cls[h]), "n": n})  # fmt: skip
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- factors


def _entity_lexicons() -> list[tuple[str, set[str]]]:
    return [("person", set(PRONOUN)), ("object", set(OBJECTS)), ("animal", set(ANIMALS)), ("place", set(PLACES))]


# Question words that are never the queried entity (procedural and bAbI question templates).
_QUESTION_WORDS = {"where", "what", "who", "whom", "how", "many", "much", "is", "are", "was", "were", "the", "a",
                   "an", "of", "to", "in", "there", "more", "or", "boys", "girls", "afraid", "carrying", "objects",
                   "before", "after", "did", "does", "do", "give", "gave", "received", "receive", "color", "colour",
                   "yes", "no", "?", ".", ","}  # fmt: skip


def queried_entity(question: Sequence[str]) -> tuple[str | None, str | None]:
    """(entity, kind) that a question asks about.

    The first question token found in the procedural lexicons, tried in the order person, object, animal,
    place (so "where was the apple before the bathroom ?" gives the apple, and "are there more boys or
    girls in the kitchen ?" the kitchen); failing that (bAbI words outside the lexicons), the last token
    that is not a question word or punctuation, kind ``"other"``; (None, None) if there is none.
    """
    tokens = [t.lower() for t in question]
    for kind, words in _entity_lexicons():
        for t in tokens:
            if t in words:
                return t, kind
    rest = [t for t in tokens if t not in _QUESTION_WORDS]
    return (rest[-1], "other") if rest else (None, None)


def story_factors(split: Split | Sequence[Story]) -> pd.DataFrame:
    """Ground-truth factors of every example, one row per example in split order.

    Columns: ``task``; ``answer`` (the answer word, e.g. the answer place); ``queried`` and
    ``queried_kind`` (see :func:`queried_entity`: the person / object / animal / place the question asks
    about); ``n_sentences`` (story sentences, after any truncation); ``n_supporting``; ``count`` (the
    answer as a number when it is a number word, i.e. counting tasks; NaN otherwise). Factors that do not
    apply are None / NaN.
    """
    stories = split.stories if isinstance(split, Split) else list(split)
    rows = []
    for s in stories:
        entity, kind = queried_entity(s.question)
        rows.append({
            "task": s.task, "answer": s.answer, "queried": entity, "queried_kind": kind,
            "n_sentences": len(s.sentences), "n_supporting": len(s.supporting),
            "count": float(NUMBER_WORDS[s.answer]) if s.answer in NUMBER_WORDS else math.nan,
        })  # fmt: skip
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- probes


def probe_representations(
    reps: np.ndarray,
    heads: Sequence[Head],
    factors: pd.DataFrame,
    factor_names: Sequence[str],
    cv: int = 3,
    seed: int = 0,
    max_examples: int | None = 3000,
    C: float = 1.0,
) -> pd.DataFrame:
    """Cross-validated linear probes from each head's representation to each factor.

    reps: (N, n_heads, d) array, column i holding ``heads[i]``; factors: N rows aligned with reps.
    For each factor: keep the examples where it is defined (not None/NaN), draw at most ``max_examples``
    of them (seeded, the same draw for every head), treat the values as class labels, and drop classes
    with fewer than ``cv`` examples (stratified folds need one per fold). Then per head: ``acc`` = mean
    accuracy over ``cv`` stratified folds (shuffled with ``seed``) of
    ``StandardScaler → LogisticRegression(C, max_iter=2000, random_state=seed)``; ``acc_std`` over folds.

    One row per (layer, head, factor) with ``acc``, ``acc_std``, ``majority`` (frequency of the most
    common class among the probed examples: the accuracy of always guessing it), ``gain`` = acc − majority,
    ``norm_gain`` = gain / (1 − majority) (1 = perfect, 0 = no better than the majority guess),
    ``n`` examples and ``n_classes``. A factor with fewer than two classes left gives NaN scores.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    reps = np.asarray(reps, dtype=float)
    if reps.ndim != 3 or reps.shape[1] != len(heads):
        raise ValueError(f"reps must be (N, len(heads)={len(heads)}, d), got {reps.shape}")
    if len(factors) != reps.shape[0]:
        raise ValueError(f"factors has {len(factors)} rows but reps {reps.shape[0]} examples")
    missing = [f for f in factor_names if f not in factors.columns]
    if missing:
        raise ValueError(f"factor(s) {missing} are not columns of factors (columns: {list(factors.columns)})")
    rng = np.random.default_rng(seed)
    rows = []
    for name in factor_names:
        values = factors[name].reset_index(drop=True)
        keep = np.flatnonzero(values.notna().to_numpy())
        if max_examples is not None and len(keep) > max_examples:
            keep = np.sort(rng.choice(keep, max_examples, replace=False))
        labels = values.iloc[keep].astype(str).to_numpy()
        classes, counts = np.unique(labels, return_counts=True)
        ok = np.isin(labels, classes[counts >= cv])
        keep, labels = keep[ok], labels[ok]
        classes, counts = np.unique(labels, return_counts=True)
        base = {"factor": name, "n": len(keep), "n_classes": len(classes)}
        majority = counts.max() / counts.sum() if len(classes) else math.nan
        for i, (layer, head) in enumerate(heads):
            row = {"layer": layer, "head": head, **base, "majority": majority}
            if len(classes) < 2:
                rows.append({**row, "acc": math.nan, "acc_std": math.nan})
                continue
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
            folds = StratifiedKFold(cv, shuffle=True, random_state=seed)
            # One BLAS thread: these fits are (1000 x d_head); OpenBLAS splitting them over threads made one
            # fit 15-27x slower here (0.86 s vs 0.057 s with the other core busy), probes the slowest analysis.
            with warnings.catch_warnings(), threadpool_limits(limits=1):
                warnings.simplefilter("ignore", ConvergenceWarning)
                scores = cross_val_score(probe, reps[keep, i], labels, cv=folds)
            rows.append({**row, "acc": float(scores.mean()), "acc_std": float(scores.std())})
    out = pd.DataFrame(rows)
    out["gain"] = out["acc"] - out["majority"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["norm_gain"] = np.where(out["majority"] < 1, out["gain"] / (1 - out["majority"]), np.nan)
    cols = ["layer", "head", "factor", "acc", "acc_std", "majority", "gain", "norm_gain", "n", "n_classes"]
    return out[cols]


def pooled_head_outputs(
    model: Encoder, split: Split, layers: Iterable[int] | None = None, pool: str = "mean", batch_size: int = 256
) -> tuple[np.ndarray, list[Head]]:
    """Each head's output z_h (before W_O) per example: (N, n_heads, d_head) and the (layer, head) of each
    column. ``pool="mean"``: mean over the real tokens (constraints.pooled_heads); ``"cls"``: at the CLS token."""
    if pool not in ("mean", "cls"):
        raise ValueError(f"pool={pool!r} is not one of ['mean', 'cls']")
    layer_ids = _layers(model, layers)
    device = _device(model)
    chunks = []
    with _eval_mode(model):
        for b in iter_batches(split, batch_size, device):
            out = model(b["tokens"], b["padding_mask"], capture="head_out", segments=b["segments"])
            per_layer = [pooled_heads(out.head_out[layer], b["padding_mask"]) if pool == "mean"
                         else out.head_out[layer][:, :, 0].float() for layer in layer_ids]  # fmt: skip
            chunks.append(torch.cat(per_layer, 1).cpu())  # (B, L_sel * H, d_head)
    heads = [(layer, h) for layer in layer_ids for h in range(model.cfg.n_heads)]
    return torch.cat(chunks).numpy(), heads


def probe_heads(
    model: Encoder,
    split: Split,
    factors: pd.DataFrame,
    factor_names: Sequence[str] = ("answer", "queried", "task"),
    layers: Iterable[int] | None = None,
    cv: int = 3,
    seed: int = 0,
    max_examples: int | None = 3000,
    pool: str = "mean",
    batch_size: int = 256,
) -> pd.DataFrame:
    """Linear probes from each head's pooled output to ground-truth factors (:func:`story_factors`).

    Representations from :func:`pooled_head_outputs` (``pool="mean"``: mean over real tokens, shape
    (N, d_head) per head); scores as in :func:`probe_representations`.
    """
    reps, heads = pooled_head_outputs(model, split, layers, pool, batch_size)
    return probe_representations(reps, heads, factors, factor_names, cv, seed, max_examples)


def posthoc_mi(
    result,
    split: Split | None = None,
    methods: Sequence[str] = ("infonce", "club"),
    seed: int = 0,
    layers: Iterable[int] | None = None,
    steps: int = 300,
    batch_size: int = 256,
    **kwargs,
) -> dict[str, float]:
    """Mutual information between heads after training, re-estimated with fresh estimators.

    ``result``: a ``train.RunResult`` (its final model on its test split) or an :class:`Encoder` (then
    ``split`` is required). Each head's output is pooled per example (mean over real tokens, as in
    :func:`pooled_head_outputs`) over the whole split; then per method, :func:`estimate_pooled_head_mi`
    (``"infonce"``: trained separable critic, a lower bound; ``"club"``: Cheng et al. 2020, an upper bound;
    ``steps``, ``seed`` and ``kwargs`` go to it) gives an (H, H) matrix per analysed layer. Returns
    ``{method: mean over layers and head pairs i<j of the estimate}`` in nats.
    """
    if isinstance(result, Encoder):
        if split is None:
            raise ValueError("posthoc_mi(model, ...) needs split= (or pass a RunResult)")
        model = result
    else:
        model = result.load_model()
        split = split if split is not None else result.data().splits["test"]
    reps, heads = pooled_head_outputs(model, split, layers, "mean", batch_size)
    H = model.cfg.n_heads
    x = torch.from_numpy(reps).float()
    pooled = [x[:, i : i + H] for i in range(0, len(heads), H)]  # per layer (N, H, d_head)
    iu = np.triu_indices(H, k=1)
    out = {}
    for method in methods:
        mats = estimate_pooled_head_mi(pooled, method, steps, seed, **kwargs)
        values = np.concatenate([m.numpy()[iu] for m in mats])
        out[method] = float(np.nanmean(values)) if len(values) else math.nan
    return out


# ----------------------------------------------------------------------------------------- exclusivity


def _normalised_entropy(p: np.ndarray, axis: int, n: int) -> np.ndarray:
    """−Σ p log p / log n along ``axis`` (p already normalised; 0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -plogp.sum(axis) / math.log(n)


def exclusivity_from_matrix(R: np.ndarray) -> dict:
    """DCI-style disentanglement and completeness (Eastwood & Williams 2018) of an importance matrix.

    R: (n_heads, K) non-negative, R[h, f] = how much head h tells about factor f. With
    P[h, f] = R[h, f] / Σ_f R[h, f] and Q[h, f] = R[h, f] / Σ_h R[h, f]:

    * per head ``D_h = 1 − H(P[h, :]) / log K`` (1 = the head informs one factor only), and
      ``disentanglement = Σ_h ρ_h D_h`` with ρ_h = Σ_f R[h, f] / Σ R (heads that inform nothing weigh 0);
    * per factor ``C_f = 1 − H(Q[:, f]) / log n_heads`` (1 = one head alone carries the factor), and
      ``completeness = Σ_f w_f C_f`` with w_f = Σ_h R[h, f] / Σ R.

    Both are NaN when R is all zero; D needs K ≥ 2 factors and C n_heads ≥ 2. Returns the two scores and
    the per-head / per-factor arrays ``D_h``, ``C_f``.
    """
    R = np.clip(np.asarray(R, dtype=float), 0.0, None)
    if R.ndim != 2:
        raise ValueError(f"R must be (n_heads, n_factors), got shape {R.shape}")
    n_heads, K = R.shape
    total = R.sum()
    row, col = R.sum(1), R.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        P = R / row[:, None]
        Q = R / col[None, :]
    D_h = 1 - _normalised_entropy(P, 1, K) if K >= 2 else np.full(n_heads, np.nan)
    C_f = 1 - _normalised_entropy(Q, 0, n_heads) if n_heads >= 2 else np.full(K, np.nan)
    D_h = np.where(row > 0, D_h, np.nan)
    C_f = np.where(col > 0, C_f, np.nan)
    if total <= 0:
        return {"disentanglement": math.nan, "completeness": math.nan, "D_h": D_h, "C_f": C_f}
    rho, w = row / total, col / total
    D = float(np.nansum(rho * D_h)) if K >= 2 else math.nan
    C = float(np.nansum(w * C_f)) if n_heads >= 2 else math.nan
    return {"disentanglement": D, "completeness": C, "D_h": D_h, "C_f": C_f}


def exclusivity(probes: pd.DataFrame, value: str = "gain", min_gain: float = 0.0) -> dict:
    """How exclusively factors map to heads, for one model's :func:`probe_heads` frame.

    Importance R[h, f] = ``value`` (default the probe's gain over the majority baseline) where it exceeds
    ``min_gain``, else 0 — a threshold of a few hundredths keeps probe noise out of the entropies. Each
    head is probed alone, so a factor that several heads carry redundantly lowers completeness, as it
    should for a claim about exclusivity (DCI fits one regressor on all codes instead). Formulas:
    :func:`exclusivity_from_matrix`.

    Returns ``disentanglement``, ``completeness``, ``informativeness`` (mean over factors of the best
    head's ``value``), ``n_heads``, ``n_factors``, and Series ``per_head`` (D_h, indexed by (layer, head))
    and ``per_factor`` (C_f).
    """
    if "model" in probes.columns and probes["model"].nunique() > 1:
        raise ValueError("probes holds several models; use exclusivity_by(probes, 'model')")
    table = probes.pivot_table(index=["layer", "head"], columns="factor", values=value, aggfunc="mean")
    raw = table.to_numpy(float)
    R = np.where(np.isfinite(raw) & (raw > min_gain), raw, 0.0)
    scores = exclusivity_from_matrix(R)
    return {
        "disentanglement": scores["disentanglement"],
        "completeness": scores["completeness"],
        "informativeness": float(np.nanmean(np.nanmax(raw, 0))) if raw.size else math.nan,
        "n_heads": R.shape[0],
        "n_factors": R.shape[1],
        "per_head": pd.Series(scores["D_h"], index=table.index, name="D_h"),
        "per_factor": pd.Series(scores["C_f"], index=table.columns, name="C_f"),
    }


def exclusivity_by(probes: pd.DataFrame, by: str | Sequence[str] = "model", value: str = "gain", min_gain: float = 0.0) -> pd.DataFrame:
    """:func:`exclusivity` of every group of ``by`` (e.g. one row per model): the scalar scores as columns."""
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for key, g in probes.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        e = exclusivity(g.drop(columns=["model"], errors="ignore"), value, min_gain)
        rows.append({**dict(zip(by, key)), **{k: v for k, v in e.items() if not isinstance(v, pd.Series)}})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------- sparsity vs correctness


def sparsity_vs_correctness(
    metrics: pd.DataFrame,
    sparsity: str | Sequence[str] = ("entropy_cls", "entropy"),
    correctness: Sequence[str] = ("support_mass_cls", "support_excess_cls"),
    task: str = "all",
    by: str | Sequence[str] | None = None,
    margin: float = 0.1,
    level: float = 0.95,
) -> pd.DataFrame:
    """Is sparser attention more correct? Spearman correlation over heads, with a Fisher-z interval.

    metrics: per-head rows (e.g. :func:`head_attention_metrics` of one or several models concatenated
    with ``model`` / ``constraint`` columns); the rows of ``task`` are used, one point per head per model.
    Sparsity of a head = 1 − an entropy column; ``sparsity`` names one or several: ``"entropy_cls"`` (the
    primary one: the readout row, the same row whose correctness is measured) and ``"entropy"`` (the
    all-query mean that the attention-entropy constraint penalises). For each (sparsity, correctness)
    pair: ``rho`` = Spearman(sparsity, correctness), ``ci_low`` / ``ci_high`` (:func:`stats.spearman_ci`,
    standard error 1.06 / √(n − 3)), ``n`` heads, and ``verdict`` on the claim "sparser heads are more
    correct" (:func:`stats.verdict`, expected sign +1, equivalence ``margin``). ``by``: also one row per
    group (e.g. ``"constraint"``); the pooled row has group ``"all"``.

    ``support_mass_cls`` and ``support_excess_cls`` rank heads identically when every head was measured on
    the same examples (the chance level ``support_share`` is then one constant); they differ on frames
    that mix splits or tasks. Caveat: heads of one model are not independent samples, so the interval is
    optimistic; intervals over seeds come from :func:`model_level`.
    """
    df = metrics[metrics["task"] == task] if "task" in metrics.columns else metrics
    sparsity = [sparsity] if isinstance(sparsity, str) else list(sparsity)
    correctness = [correctness] if isinstance(correctness, str) else list(correctness)
    by = [] if by is None else [by] if isinstance(by, str) else list(by)
    if metrics.empty:  # no finished model (every run diverged): no heads, no correlation
        return pd.DataFrame(columns=[*by, "sparsity", "correctness", "rho", "ci_low", "ci_high", "n", "verdict"])
    missing = [c for c in [*sparsity, *correctness] if c not in df.columns]
    if missing:
        raise ValueError(f"metrics has no column(s) {missing}")
    groups: list[tuple[dict, pd.DataFrame]] = [({c: "all" for c in by}, df)]
    if by:
        groups += [(dict(zip(by, k if isinstance(k, tuple) else (k,))), g) for k, g in df.groupby(by, sort=True)]
    rows = []
    for key, g in groups:
        for s in sparsity:
            x = 1 - g[s].to_numpy(float)
            for c in correctness:
                y = g[c].to_numpy(float)
                rho, lo, hi = stats.spearman_ci(x, y, level)
                n = int((np.isfinite(x) & np.isfinite(y)).sum())
                rows.append({**key, "sparsity": f"1 - {s}", "correctness": c, "rho": rho, "ci_low": lo,
                             "ci_high": hi, "n": n, "verdict": stats.verdict(lo, hi, +1, margin)})  # fmt: skip
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------- report card


def head_report_card(
    metrics: pd.DataFrame,
    importance: pd.DataFrame,
    usage: pd.DataFrame,
    probes: pd.DataFrame | None = None,
    task: str = "all",
) -> pd.DataFrame:
    """One row per head (per model, when the frames have a ``model`` column), the ``task`` rows of:

    ``entropy``, ``entropy_cls``, ``support_mass_cls``, ``support_excess_cls``, ``topk_precision``,
    ``sink_mass`` (from :func:`head_attention_metrics`); ``importance`` (on ``task``), ``importance_mean``,
    ``importance_max``, ``max_task``, ``context_dependent`` (from :func:`head_importance`); ``usage_share``
    and ``usage_share_cls`` (from :func:`head_usage`); ``best_factor``, ``best_gain`` and ``best_acc``
    (the factor this head's probe beats the majority baseline on most, from :func:`probe_heads`).
    """
    frames = [metrics, importance, usage] + ([probes] if probes is not None else [])
    keys = [*_model_keys(*frames), "layer", "head"]
    pick = lambda df: df[df["task"] == task] if "task" in df.columns else df  # noqa: E731
    m_cols = ["entropy", "entropy_cls", "support_mass_cls", "support_excess_cls", "topk_precision", "sink_mass"]
    card = pick(metrics)[keys + m_cols]
    imp_cols = ["importance", "importance_mean", "importance_max", "max_task", "context_dependent"]
    card = card.merge(pick(importance)[keys + imp_cols], on=keys, how="outer")
    card = card.merge(pick(usage)[keys + ["usage_share", "usage_share_cls"]], on=keys, how="outer")
    if probes is not None and len(probes):
        p = probes.dropna(subset=["gain"]).reset_index(drop=True)
        best = p.loc[p.groupby(keys)["gain"].idxmax(), keys + ["factor", "gain", "acc"]]
        best = best.rename(columns={"factor": "best_factor", "gain": "best_gain", "acc": "best_acc"})
        card = card.merge(best, on=keys, how="left")
    return card.sort_values(keys).reset_index(drop=True)


# ----------------------------------------------------------------------------------------- heatmaps


def random_heads(
    n_layers: int, n_heads: int, k: int, seed: int = 0, layers: Iterable[int] | None = None, local_layers: int = 0
) -> list[Head]:
    """``k`` distinct (layer, head) pairs drawn with ``seed``, sorted; from ``layers`` (default: layers
    ``local_layers .. n_layers − 1``). The same arguments give the same heads, so models with the same
    architecture show the same heads."""
    layer_ids = list(range(local_layers, n_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layer_ids if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"layers={bad} are not in 0..{n_layers - 1}")
    candidates = [(layer, h) for layer in layer_ids for h in range(n_heads)]
    if not 0 <= k <= len(candidates):
        raise ValueError(f"k={k} must be in [0, {len(candidates)}] (heads in layers {layer_ids})")
    pick = np.random.default_rng(seed).choice(len(candidates), k, replace=False)
    return sorted(candidates[i] for i in pick)


def story_tokens(story: Story) -> list[str]:
    """The input as words: ``[<cls>, *sentences, <sep>, *question, <sep>]`` (as data.encode lays it out)."""
    return [CLS, *(w for s in story.sentences for w in s), SEP, *story.question, SEP]


def attention_for_story(model: Encoder, split: Split, index: int, heads: Sequence[Head]) -> dict:
    """Everything a heatmap of one example needs (the plotting lives in plots.py).

    Returns ``tokens`` (T real words, from the story's text, so out-of-vocabulary words keep their
    spelling), ``attn``: {(layer, head): (T, T) numpy array, rows = queries}, ``support_mask``,
    ``question_mask``, ``sink_mask`` and ``sentence_ids`` (T,) numpy, ``story``, ``task``, ``answer`` (class
    id), ``predicted`` (class id) and ``correct``.
    """
    if not 0 <= index < len(split):
        raise IndexError(f"index={index} is out of range for a split of {len(split)} examples")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    bad = [hd for hd in heads if not (0 <= hd[0] < L and 0 <= hd[1] < H)]
    if bad:
        raise ValueError(f"heads {bad} do not exist: layers 0..{L - 1}, heads 0..{H - 1}")
    device = _device(model)
    b = {k: v.to(device) for k, v in split.batch(slice(index, index + 1)).items()}
    with _eval_mode(model):
        out = model(b["tokens"], b["padding_mask"], capture="attn", segments=b["segments"])
    T = int((~b["padding_mask"][0]).sum())
    story = split.stories[index]
    tokens = story_tokens(story)
    if len(tokens) != T:
        raise ValueError(f"example {index}: the story has {len(tokens)} tokens but the input {T}")
    attn = {(int(layer), int(head)): out.attn[layer][0, head, :T, :T].cpu().numpy() for layer, head in heads}
    return {
        "tokens": tokens,
        "attn": attn,
        "support_mask": split.support_mask[index, :T].numpy(),
        "question_mask": split.question_mask[index, :T].numpy(),
        "sink_mask": np.array([t in (CLS, SEP, *PUNCTUATION) for t in tokens]),
        "sentence_ids": split.sentence_ids[index, :T].numpy(),
        "story": story,
        "task": story.task,
        "answer": int(split.answers[index]),
        "predicted": int(out.logits[0].argmax()),
        "correct": bool(out.logits[0].argmax().item() == int(split.answers[index])),
    }


# ------------------------------------------------------------------- routed heads and Hopfield attractors


def token_kinds(split: Split, vocab: Vocab) -> np.ndarray:
    """(N, T) the role of every token: ``person``, ``object``, ``animal`` or ``place`` (the procedural
    lexicons), ``question`` (other question tokens), ``special`` (CLS, SEP), ``other`` (the rest of the story)
    and ``pad``."""
    words = np.array(vocab.to_list(), dtype=object)[split.tokens.numpy()]  # (N, T)
    kinds = np.full(words.shape, "other", dtype=object)
    for kind, lexicon in reversed(_entity_lexicons()):  # the first lexicon wins, as in queried_entity
        kinds[np.isin(words, list(lexicon))] = kind
    kinds[split.question_mask.numpy() & (kinds == "other")] = "question"
    kinds[np.isin(words, [CLS, SEP])] = "special"
    kinds[split.padding_mask.numpy()] = "pad"
    return kinds


@torch.no_grad()
def routing_stats(
    model: Encoder,
    split: Split,
    vocab: Vocab,
    tasks: Sequence[str] | None = None,
    layers: Iterable[int] | None = None,
    batch_size: int = 256,
) -> pd.DataFrame:
    """How routed heads are used: one row per (layer, head, group) where group is a task (``by="task"``), a
    token role (``by="role"``, :func:`token_kinds`) or ``"all"``.

    ``frequency``: fraction of the group's real tokens whose gate for the head is > 0 (routed to it, or a
    shared head); ``mean_gate``: the mean gate over them; ``routing_entropy`` (same for every head of a layer
    and group): the mean over tokens of the entropy of the normalised gates over heads, / log H (1 = every
    head alike, 0 = one head). A plain layer has every gate 1: frequency 1, entropy 1.
    """
    layer_ids = _layers(model, layers)
    names = task_names(split, tasks)
    kinds = token_kinds(split, vocab)
    device = _device(model)
    H = model.cfg.n_heads
    gates = {layer: [] for layer in layer_ids}
    with _eval_mode(model):
        for b in iter_batches(split, batch_size, device):
            out = model(b["tokens"], b["padding_mask"], capture="gates", segments=b["segments"])
            for layer in layer_ids:  # batches are trimmed to their longest story: pad back to the split's length
                g = out.gates[layer].float().cpu()  # (B, H, T_batch)
                gates[layer].append(F.pad(g, (0, split.tokens.shape[1] - g.shape[-1])))
    real = ~split.padding_mask.numpy()
    task_of_token = np.broadcast_to(np.array(names, dtype=object)[split.task_ids.numpy()][:, None], real.shape)
    rows = []
    for layer in layer_ids:
        g = torch.cat(gates[layer]).permute(0, 2, 1).numpy()[real]  # (n_tokens, H)
        share = g / np.clip(g.sum(1, keepdims=True), _EPS, None)
        ent = -(share * np.log(np.clip(share, 1e-30, None))).sum(1) / math.log(H) if H > 1 else np.zeros(len(g))
        for by, labels in (("task", task_of_token[real]), ("role", kinds[real])):
            for group in ["all", *sorted(set(labels))] if by == "task" else sorted(set(labels)):
                sel = np.ones(len(g), bool) if group == "all" else labels == group
                if not sel.any():
                    continue
                for h in range(H):
                    rows.append({"layer": layer, "head": h, "by": by, "group": group, "frequency": float((g[sel, h] > 0).mean()),
                                 "mean_gate": float(g[sel, h].mean()), "routing_entropy": float(ent[sel].mean()),
                                 "n_tokens": int(sel.sum())})
    return pd.DataFrame(rows)


def selectivity(stats: pd.DataFrame, by: str = "task") -> pd.DataFrame:
    """Per (layer, head): how much a head's routing frequency depends on the group (from :func:`routing_stats`):
    ``selectivity`` = 1 − normalised entropy of its frequencies across the groups (0 = used alike by every
    task / role, 1 = by one only), and ``top_group``. Routing that specialises heads by task (or by role)
    shows as high selectivity with ``by="task"`` (``"role"``)."""
    df = stats[(stats["by"] == by) & (stats["group"] != "all")]
    rows = []
    for (layer, head), g in df.groupby(["layer", "head"]):
        f = g["frequency"].to_numpy(dtype=float)
        p = f / f.sum() if f.sum() > 0 else np.full(len(f), 1.0 / len(f))
        ent = -(p * np.log(np.clip(p, 1e-30, None))).sum() / math.log(len(p)) if len(p) > 1 else 0.0
        rows.append({"layer": layer, "head": head, "by": by, "selectivity": float(1 - ent),
                     "top_group": g["group"].iloc[int(np.argmax(f))]})
    return pd.DataFrame(rows)


def _entity_factors(split: Split, vocab: Vocab) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, T) each token's kind and word, the entity-token mask, and each token's role (question or story)."""
    kinds = token_kinds(split, vocab)
    words = np.array(vocab.to_list(), dtype=object)[split.tokens.numpy()]
    entity = np.isin(kinds, [k for k, _ in _entity_lexicons()])
    return kinds, words, entity, np.where(split.question_mask.numpy(), "question", "story")


def attractor_factors(
    model: Encoder,
    split: Split,
    vocab: Vocab,
    layers: Iterable[int] | None = None,
    batch_size: int = 256,
) -> pd.DataFrame:
    """How cleanly Hopfield attractors separate the stories' ground-truth factors.

    Over the entity tokens (person, object, animal, place: :func:`token_kinds`), per layer with memory and
    factor: ``nmi`` (normalised mutual information between attractor id and the factor, arithmetic mean
    normalisation, 0 = independent, 1 = one-to-one), ``purity`` (fraction of tokens whose attractor's most
    common factor value is theirs), ``metastable`` (fraction of tokens with no dominant pattern; they count
    as one more attractor) and ``n_attractors`` used. Factors: ``kind`` (entity type), ``entity`` (the word:
    entity identity), ``role`` (the token is in the question, or in the story).
    """
    layer_ids = [layer for layer in _layers(model, layers) if model.blocks[layer].memory is not None]
    if not layer_ids:
        raise ValueError("the model has no Hopfield memory in these layers (ModelConfig.hopfield_patterns = 0)")
    kinds, words, entity, role = _entity_factors(split, vocab)
    device = _device(model)
    found = {layer: [] for layer in layer_ids}
    with _eval_mode(model):
        for b in iter_batches(split, batch_size, device):
            out = model(b["tokens"], b["padding_mask"], capture="attractors", segments=b["segments"])
            for layer in layer_ids:  # padded back to the split's length, with "no memory" (never an entity token)
                a = out.attractors[layer].cpu()  # (B, T_batch)
                found[layer].append(F.pad(a, (0, split.tokens.shape[1] - a.shape[-1]), value=-2))
    rows = []
    for layer in layer_ids:
        a = torch.cat(found[layer]).numpy()[entity]
        for factor, values in (("kind", kinds[entity]), ("entity", words[entity]), ("role", role[entity])):
            rows.append({"layer": layer, "factor": factor, **factor_scores(a, values.astype(str)),
                         "metastable": float((a == -1).mean()), "n_attractors": int(len(set(a.tolist()) - {-1})),
                         "n_tokens": int(len(a))})
    return pd.DataFrame(rows)


def state_clusters(
    model: Encoder,
    split: Split,
    vocab: Vocab,
    n_clusters: int,
    layers: Iterable[int] | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> pd.DataFrame:
    """The control for :func:`attractor_factors`: how cleanly a plain clustering of a model's token states
    separates the same factors. Per layer (default: the global ones), the residual stream after attention
    (where a Hopfield memory reads), layer-normalised without gain as the memory normalises its state, at the
    same entity tokens, clustered by k-means into ``n_clusters`` (seeded; 4 starts), scored with
    :func:`factor_scores` against ``kind``, ``entity`` and ``role``. An attractor assignment that separates
    the factors no better than this says nothing the states did not already."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    if n_clusters < 1:
        raise ValueError(f"n_clusters={n_clusters} must be >= 1")
    layer_ids = _layers(model, layers)
    kinds, words, entity, role = _entity_factors(split, vocab)
    device = _device(model)
    found = {layer: [] for layer in layer_ids}
    with _eval_mode(model):
        for b in iter_batches(split, batch_size, device):
            out = model(b["tokens"], b["padding_mask"], capture="resid_mid", segments=b["segments"])
            for layer in layer_ids:
                x = F.layer_norm(out.resid_mid[layer].float(), out.resid_mid[layer].shape[-1:]).cpu()  # (B, T_batch, d)
                found[layer].append(F.pad(x, (0, 0, 0, split.tokens.shape[1] - x.shape[1])))
    rows = []
    for layer in layer_ids:
        states = torch.cat(found[layer]).numpy()[entity].astype(np.float64)  # (N_entity_tokens, d)
        k = min(n_clusters, len(states))
        with threadpool_limits(limits=1):  # small fits: one BLAS thread (see probe_representations)
            assigned = KMeans(k, n_init=4, random_state=seed).fit_predict(states) if k else np.zeros(0, int)
        for factor, values in (("kind", kinds[entity]), ("entity", words[entity]), ("role", role[entity])):
            rows.append({"layer": layer, "factor": factor, **factor_scores(assigned, values.astype(str)),
                         "n_clusters": int(k), "n_tokens": int(len(assigned))})
    return pd.DataFrame(rows)


def factor_scores(assigned: np.ndarray, values: np.ndarray) -> dict[str, float]:
    """``nmi`` (scikit-learn's, arithmetic normalisation), ``ami`` (the same, adjusted for chance: 0 is what
    a random clustering of the same cluster sizes scores in expectation, 1 one-to-one; NMI alone grows with
    the number of clusters) and ``purity`` = Σ over clusters of the count of their most common value / N, of
    a clustering ``assigned`` against ground-truth ``values``."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    if len(assigned) == 0:
        return {"nmi": math.nan, "ami": math.nan, "purity": math.nan}
    table = pd.crosstab(assigned, values)
    return {"nmi": float(normalized_mutual_info_score(values, assigned)),
            "ami": float(adjusted_mutual_info_score(values, assigned)),
            "purity": float(table.max(axis=1).sum() / len(assigned))}


@torch.no_grad()
def attention_zeros(model: Encoder, split: Split, layers: Iterable[int] | None = None, batch_size: int = 256) -> pd.DataFrame:
    """Sparsity by construction: per (layer, head), ``zero_share`` = the share of real keys a real query gives
    exactly 0 attention (mean over real queries of every example), ``zero_share_cls`` the same for the readout
    query. Softmax never gives an exact 0 (0 for every softmax model); entmax does."""
    layer_ids = _layers(model, layers)
    device = _device(model)
    H = model.cfg.n_heads
    sums = {layer: torch.zeros(2, H, dtype=torch.float64) for layer in layer_ids}
    n_rows = torch.zeros((), dtype=torch.float64)
    n_ex = 0
    with _eval_mode(model):
        for b in iter_batches(split, batch_size, device):
            out = model(b["tokens"], b["padding_mask"], capture="attn", segments=b["segments"])
            real = (~b["padding_mask"]).float()  # (B, T)
            n = real.sum(1)  # (B,)
            for layer in layer_ids:
                zero = ((out.attn[layer] == 0).float() * real[:, None, None, :]).sum(-1) / n[:, None, None]  # (B, H, T)
                rows = (zero * real[:, None, :]).sum((0, 2))  # (H,) over real queries
                sums[layer][0] += rows.double().cpu()
                sums[layer][1] += zero[:, :, 0].sum(0).double().cpu()
            n_rows += real.sum().double().cpu()
            n_ex += len(b["tokens"])
    return pd.DataFrame([{"layer": layer, "head": h, "zero_share": float(sums[layer][0, h] / n_rows),
                          "zero_share_cls": float(sums[layer][1, h] / max(n_ex, 1))}
                         for layer in layer_ids for h in range(H)])


# ------------------------------------------------------------------------- post-hoc mutual information


class SeparableCritic(nn.Module):
    """n learnable critics s(x, y) = g(x)ᵀ h(y), g and h small MLPs (Poole et al. 2019's separable critic).

    Scores all N² pairs with two MLP passes over N samples, so training it costs O(N) network evaluations,
    not O(N²). ``forward(x (n, N, d_x), y (n, N, d_y)) -> (n, N, N)``, for :func:`infonce_bound`.
    """

    def __init__(
        self, n: int, d_x: int, d_y: int, hidden: int = 64, embed: int = 32, generator: torch.Generator | None = None
    ):
        super().__init__()
        self.g = _BatchedMLP(n, d_x, hidden, embed, generator)
        self.h = _BatchedMLP(n, d_y, hidden, embed, generator)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.g(x) @ self.h(y).transpose(-1, -2)




def estimate_mi(
    x: Tensor,
    y: Tensor,
    method: str = "infonce",
    steps: int = 300,
    seed: int = 0,
    batch_size: int = 256,
    hidden: int = 64,
    lr: float = 3e-3,
    holdout: float = 0.5,
) -> Tensor:
    """MI estimates for n independent problems with a freshly trained critic (InfoNCE) or q (CLUB).

    x: (n, N, d_x), y: (n, N, d_y), N paired samples each. Both are standardised per feature; a random
    ``holdout`` fraction of the samples is kept out of training and the estimate is computed on it
    (so the critic cannot overfit its way above the truth). Training: ``steps`` Adam steps at ``lr``
    on random minibatches of ``batch_size``, seeded by ``seed`` (deterministic on a given machine).

    - ``"infonce"``: :class:`SeparableCritic`, estimate = mean of :func:`infonce_bound` over held-out
      batches of min(batch_size, held-out size) samples; a lower bound, capped at log(batch size).
    - ``"club"``: :class:`CLUB` fitted by maximum likelihood; estimate = I_CLUB on all held-out samples.

    Returns (n,) in nats, on x's device. Trains with gradients enabled even when called under
    ``torch.no_grad()`` or ``torch.inference_mode()``.
    """
    if method not in ("infonce", "club"):
        raise ValueError(f"method={method!r} is not one of ['infonce', 'club']")
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        x, y = x.detach().float().clone(), y.detach().float().clone()
        return _estimate_mi(x, y, method, steps, seed, batch_size, hidden, lr, holdout)


def _estimate_mi(
    x: Tensor, y: Tensor, method: str, steps: int, seed: int, batch_size: int, hidden: int, lr: float, holdout: float
) -> Tensor:
    """:func:`estimate_mi` proper, on fresh float32 copies, with autograd on."""
    n, N = x.shape[:2]
    gen = torch.Generator().manual_seed(seed)
    x, y = _standardise(x), _standardise(y)
    order = torch.randperm(N, generator=gen)
    n_eval = max(2, int(round(N * holdout)))
    if N - n_eval < 2:
        raise ValueError(f"need more samples: N={N} leaves {N - n_eval} for training with holdout={holdout}")
    eval_idx, train_idx = order[:n_eval].to(x.device), order[n_eval:]
    if method == "infonce":
        net: nn.Module = SeparableCritic(n, x.shape[-1], y.shape[-1], hidden, generator=gen).to(x.device)
    else:
        net = CLUB(n, x.shape[-1], y.shape[-1], hidden, generator=gen).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    b = min(batch_size, len(train_idx))
    for _ in range(steps):
        idx = train_idx[torch.randperm(len(train_idx), generator=gen)[:b]].to(x.device)
        xb, yb = x[:, idx], y[:, idx]
        objective = infonce_bound(xb, yb, critic=net) if method == "infonce" else net.log_likelihood(xb, yb)
        opt.zero_grad(set_to_none=True)
        (-objective.sum()).backward()  # a sum, so each problem's gradient ignores the others
        opt.step()
    with torch.no_grad():
        xe, ye = x[:, eval_idx], y[:, eval_idx]
        if method == "club":
            return net(xe, ye)
        be = min(batch_size, n_eval)
        chunks = torch.arange(n_eval // be * be, device=x.device).view(-1, be)  # (n_batches, be)
        return torch.stack([infonce_bound(xe[:, c], ye[:, c], critic=net) for c in chunks]).mean(0)


def estimate_pooled_head_mi(
    pooled: list[Tensor], method: str = "infonce", steps: int = 300, seed: int = 0, **kwargs
) -> list[Tensor]:
    """Per layer (H, H) matrix of MI estimates between heads, from pooled representations.

    pooled: per layer (N, H, d_head), e.g. :func:`pooled_heads` of many batches concatenated along N.
    Entry (i, j) = (j, i) = :func:`estimate_mi` of (head i, head j) for i<j (CLUB conditions head j on
    head i); the diagonal is NaN (a head's MI with itself is its entropy, not an estimate of anything
    here). All pairs of all layers are fitted together, one independent critic each. kwargs go to
    :func:`estimate_mi`.
    """
    P = torch.stack([p.detach().float() for p in pooled])  # (L, N, H, dh)
    L, _, H, _ = P.shape
    i, j = _pairs(H, P.device)
    x = P[:, :, i].transpose(1, 2).flatten(0, 1)  # (L·P, N, dh)
    y = P[:, :, j].transpose(1, 2).flatten(0, 1)
    est = estimate_mi(x, y, method, steps, seed, **kwargs).view(L, -1).cpu() if len(i) else torch.empty(L, 0)
    out = torch.full((L, H, H), float("nan"))
    out[:, i.cpu(), j.cpu()] = est
    out[:, j.cpu(), i.cpu()] = est
    return list(out)


def estimate_head_mi(
    head_out: list[Tensor], padding_mask: Tensor, method: str = "infonce", steps: int = 300, seed: int = 0, **kwargs
) -> list[Tensor]:
    """Per layer (H, H) MI estimates between heads' pooled outputs in one batch: head_out per layer
    (B, H, T, d_head), padding_mask (B, T). See :func:`estimate_pooled_head_mi` (use it directly to pool
    over many batches: more samples, tighter estimates)."""
    return estimate_pooled_head_mi([pooled_heads(z, padding_mask) for z in head_out], method, steps, seed, **kwargs)


__all__ = [
    "attractor_factors",
    "factor_scores",
    "routing_stats",
    "selectivity",
    "token_kinds",
    "SeparableCritic",
    "estimate_head_mi",
    "estimate_mi",
    "estimate_pooled_head_mi",
    "ATTENTION_METRICS",
    "METRICS",
    "attention_examples",
    "attention_for_story",
    "attention_metrics_from_tensors",
    "attention_similarity_from_tensors",
    "context_dependence",
    "exclusivity",
    "exclusivity_by",
    "exclusivity_from_matrix",
    "head_attention_metrics",
    "head_importance",
    "head_report_card",
    "head_similarity",
    "head_usage",
    "linear_cka",
    "model_level",
    "pooled_head_outputs",
    "posthoc_mi",
    "probe_heads",
    "probe_representations",
    "queried_entity",
    "random_heads",
    "sink_token_ids",
    "sparsity_vs_correctness",
    "story_factors",
    "story_tokens",
    "summarise_heads",
    "task_names",
]
