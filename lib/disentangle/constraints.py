"""The four head constraints and their variants, each a plain function of the model's captured internals.

The model knows nothing about them (x-transformers style): a constraint reads per-layer tensors from
:class:`~disentangle.model.EncoderOutput` (and the padding mask) and returns a :class:`ConstraintResult`
(a scalar loss, per-token values where the loss is token-level, a few diagnostics). The training loss is

    L = CE + Σ_c w_c · L_c          (weights w_c from the run's ConstraintConfig; 0 = off)

and :class:`~disentangle.objective.Constraints` (built from the arms registry, :mod:`disentangle.arms`)
is the object the training loop holds::

    constraints = Constraints(cfg.constraints, model_cfg, device=device)
    out = model(tokens, padding_mask, capture=constraints.captures)   # only what the active losses read
    penalty, terms = constraints.loss(out, padding_mask, model)       # terms: raw values, for logging
    (F.cross_entropy(out.logits, answers) + penalty).backward(); opt.step()
    constraints.auxiliary_step(out, padding_mask)                     # CLUB's q, in alternation

| constraint | function | reads |
|---|---|---|
| orthogonality, variant ``outputs`` | :func:`orthogonality_outputs` | ``head_out`` |
| orthogonality, variant ``weights`` | :func:`orthogonality_weights` | ``model.per_head_weights`` |
| orthogonality, variant ``attention`` | :func:`orthogonality_attention` | ``attn`` |
| mutual information, ``infonce`` | :func:`infonce_mi` | ``head_out`` |
| mutual information, ``club`` | :class:`CLUB` (held by :class:`MIEstimator`) | ``head_out`` |
| attention-entropy sparsity | :func:`attention_entropy` | ``attn`` |
| head-usage sparsity | :func:`head_usage_entropy` | ``head_contrib`` |

Conventions. ``padding_mask`` is (B, T) bool, True on padding. Whatever finite values sit at padded
positions (padded query rows, padded key columns, padded tokens) change neither a loss nor a gradient:
they are masked out of every sum, and the gradient there is exactly 0. All arithmetic runs in (at
least) float32 with autocast off (half-precision inputs are upcast; float64 stays, for gradient
checks): entropies and log-sum-exps in bf16 are too coarse for a penalty whose useful range is a few
hundredths. Everything is vectorised over samples, heads and head pairs (pairs i<j come from
``torch.triu_indices``); the only Python loop is over the (few) layers, which avoids stacking copies
of the largest tensors. The attention tensor (B, H, T, T) dominates the cost, so the two constraints
on it have hand-written backward passes (:class:`_RowEntropy`, :class:`_PairCosineSum`) that touch it
about half as often as autograd would; ``benchmarks/bench_constraints.py`` measures the result.

:data:`FORMULAS` holds each formula as short Markdown in Unicode math (no LaTeX) for the notebooks;
:func:`measure` evaluates every constraint on any model (constrained or not); ``analysis.estimate_head_mi``
gives post-hoc InfoNCE and CLUB estimates with freshly trained critics.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .model import Encoder, EncoderOutput

# Smallest positive float32: clamping probabilities to it before the log keeps p·log p (and its
# gradient log p + 1) finite at p = 0, where attention to padding keys is exactly 0.
_TINY = torch.finfo(torch.float32).tiny
# Keeps divisions by norms and standard deviations finite for all-zero inputs (then the result is 0).
_EPS = 1e-12

ORTHOGONALITY_VARIANTS = ("outputs", "weights", "attention", "contributions", "published")
MI_VARIANTS = ("infonce", "club", "published")
ENTROPY_VARIANTS = ("normalised", "published")
USAGE_VARIANTS = ("contributions", "published")
PUBLISHED_TEMPERATURE = 0.2  # the original study's InfoNCE logits r_i r_jᵀ / 0.2

FORMULAS: dict[str, str] = {
    "orthogonality_outputs": (
        "**Head-output orthogonality** — L = mean over layers ℓ, real tokens t and head pairs i<j of "
        "cos²(zᵢ(t), zⱼ(t)), with cos(a, b) = a·b / (‖a‖ ‖b‖) and zᵢ(t) ∈ ℝ^d_head head i's output at "
        "token t before W_O. 0 when the heads write orthogonal vectors, 1 when they write the same direction."
    ),
    "orthogonality_weights": (
        "**Projection-subspace orthogonality** — for each projection P ∈ {Q, K, V} and layer, with "
        "Wᵢ ∈ ℝ^(d_model × d_head) head i's block: Gᵢⱼ² = ⟨WᵢWᵢᵀ, WⱼWⱼᵀ⟩_F / (‖WᵢWᵢᵀ‖_F ‖WⱼWⱼᵀ‖_F) "
        "= ‖Ŵᵢᵀ Ŵⱼ‖_F², Ŵᵢ = Wᵢ / ‖WᵢWᵢᵀ‖_F^½. L = mean over projections, layers and pairs i<j of Gᵢⱼ². "
        "0 iff the heads read orthogonal subspaces of the residual stream, 1 iff the same subspace with "
        "the same shape; unchanged by Wᵢ → Wᵢ R for any rotation R."
    ),
    "orthogonality_attention": (
        "**Attention-map orthogonality** — L = mean over layers, real queries q and head pairs i<j of "
        "cos(Aᵢ[q, ·], Aⱼ[q, ·]) = Σₖ Aᵢ[q,k] Aⱼ[q,k] / (‖Aᵢ[q, ·]‖ ‖Aⱼ[q, ·]‖), k over real keys. "
        "0 when the heads attend to disjoint positions, 1 when to the same ones in the same proportions."
    ),
    "orthogonality_contributions": (
        "**Contribution orthogonality** — L = mean over layers ℓ, real tokens t and head pairs i<j of "
        "cos²(cᵢ(t), cⱼ(t)), with cᵢ(t) = zᵢ(t) W_O[i] ∈ ℝ^d_model head i's contribution to the residual "
        "stream. Unlike head-output orthogonality it is unchanged by W_V[i] → W_V[i] R, W_O[i] → Rᵀ W_O[i] "
        "(any rotation R), which changes nothing the model computes: it cannot be met by re-basing a head."
    ),
    "orthogonality_published": (
        "**Orthogonality as published** — per head h, rₕ = the mean over real tokens of zₕ, L2-normalised; "
        "G[h, h′] = rₕ · rₕ′; L = mean over samples and all (h, h′) of (G − I)². Pooled per sample before "
        "comparing (this project's variants compare every token), diagonal and both orders included, "
        "last layer only in the published runs. Like head-output orthogonality, met by re-basing a head."
    ),
    "infonce": (
        "**InfoNCE mutual information** (minimised) — per layer and head pair i<j, pooled head outputs "
        "xₙ = mean over real tokens of zᵢ, yₙ = same for zⱼ (n = 1…N samples of the batch), standardised; critic "
        "s(a, b) = cos(g(a), h(b)) / τ with small networks g, h per pair, trained in alternation to maximise "
        "I_NCE = log N + (1/N) Σₙ [ s(xₙ, yₙ) − log Σₘ exp s(xₙ, yₘ) ] while the model minimises it. "
        "L = mean over layers and pairs of max(I_NCE, 0). A lower bound on I(x; y), never above log N."
    ),
    "club": (
        "**CLUB mutual information** (minimised, Cheng et al. 2020) — with a variational Gaussian "
        "q(y | x) = N(μ(x), diag σ²(x)) per head pair, trained by maximum likelihood in alternation: "
        "I_CLUB = (1/N) Σₙ log q(yₙ | xₙ) − (1/N²) Σₙ Σₘ log q(yₘ | xₙ), x and y standardised per feature. "
        "L = mean over layers and pairs of max(I_CLUB, 0). "
        "An upper bound on I(x; y) when q is close to p(y | x)."
    ),
    "mi_published": (
        "**The published \"InfoNCE MI proxy\"** — rₕ as in published orthogonality; per head pair i<j, "
        "the cross-entropy CE of the logits rᵢ rⱼᵀ / 0.2 (N × N over the batch) against the diagonal; "
        "L = mean over pairs of CE, minimised. Since I_NCE = log N − CE, minimising CE maximises the "
        "InfoNCE lower bound on I(rᵢ; rⱼ): as published the term makes heads more dependent, not less."
    ),
    "attention_entropy_published": (
        "**Attention entropy as published** — L = mean over samples and heads of the mean over real queries "
        "of −Σₖ A[q,k] log A[q,k] (k over real keys), in nats: not divided by log n, so longer stories "
        "weigh more than in this project's normalised version."
    ),
    "head_usage_published": (
        "**Head usage as published** — aₕ = mean over samples of the mean over real tokens of ‖zₕ(t)‖₂ "
        "(the head output before W_O); p = a / Σ a; L = −Σₕ pₕ log pₕ in nats. This project's version "
        "uses the contributions zₕ W_O[h] (what a head adds to the residual stream) and divides by log H."
    ),
    "attention_entropy": (
        "**Attention-entropy sparsity** — L = mean over layers, heads and real queries q of "
        "H(A[q, ·]) / log n, with H(p) = −Σₖ pₖ log pₖ over real keys and n the number of real tokens "
        "of the sample (0 when n = 1). 1 = uniform attention, 0 = one-hot."
    ),
    "head_usage": (
        "**Head-usage sparsity** — per layer, usage uₕ = Σ over samples and real tokens of ‖cₕ(t)‖₂, "
        "cₕ(t) = head h's contribution to the residual stream; pₕ = uₕ / Σₖ uₖ; "
        "L = mean over layers of −Σₕ pₕ log pₕ / log H. 1 = every head used equally, 0 = one head does all the work."
    ),
}


@dataclass
class ConstraintResult:
    """What every constraint returns."""

    loss: Tensor  # 0-dim float32, differentiable
    per_token: Tensor | None  # (B, T) for token-level losses (0 on padding); None for batch-level ones
    diagnostics: dict[str, float]


# ----------------------------------------------------------------------------------------------- helpers


def _full_precision(fn: Callable) -> Callable:
    """Run ``fn`` with autocast off (see module docstring) on the device of its first argument, a
    tensor or a list of tensors."""

    @functools.wraps(fn)
    def wrapper(first: Tensor | list[Tensor], *args, **kwargs):
        # (An empty list falls through to the function, which raises a clear error about it.)
        device = first.device if isinstance(first, Tensor) else first[0].device if first else torch.device("cpu")
        with torch.autocast(device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapper


def _upcast(t: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; float32 and float64 stay (float64 lets tests gradcheck the losses)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_layers(tensors: Sequence[Tensor], what: str) -> None:
    if len(tensors) == 0:
        raise ValueError(f"{what}: got no layers (an empty list)")


def _pairs(n_heads: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Indices (i, j) of the head pairs i<j, each (P,), P = H(H-1)/2."""
    i, j = torch.triu_indices(n_heads, n_heads, offset=1, device=device)
    return i, j


def _pair_mean(values: Tensor, dim: int = -1) -> Tensor:
    """Mean over a pair axis; 0 (not NaN) when there are no pairs (a single head)."""
    return values.sum(dim) / max(values.shape[dim], 1)


def _token_mean(per_token: Tensor, padding_mask: Tensor) -> Tensor:
    """Mean of a (B, T) tensor over the real tokens of the batch."""
    real = (~padding_mask).float()
    return (per_token * real).sum() / real.sum().clamp_min(1.0)


def _max(values: Tensor) -> Tensor:
    return values.max() if values.numel() else values.new_zeros(())


def _token_level(per_layer: list[Tensor], padding_mask: Tensor, **extra: Tensor) -> ConstraintResult:
    """Assemble a token-level result from per-layer (B, T) values: per_token = their mean (0 on
    padding), loss = its mean over real tokens; diagnostics ``layer_<k>`` (the k-th given layer's mean)
    plus ``extra``."""
    per_token = torch.stack(per_layer).mean(0).masked_fill(padding_mask, 0.0)
    layer_means = {f"layer_{k}": _token_mean(v, padding_mask) for k, v in enumerate(per_layer)}
    return ConstraintResult(_token_mean(per_token, padding_mask), per_token, _floats(**layer_means, **extra))


# Off inside the stacked engine: there the losses run under torch.func.vmap, where a tensor cannot become a
# Python float, and the diagnostics (logging only) would be one device sync per step besides.
_DIAGNOSTICS = contextvars.ContextVar("constraint_diagnostics", default=True)


@contextlib.contextmanager
def no_diagnostics() -> Iterator[None]:
    """Within the block, every constraint returns empty ``diagnostics`` (its loss is unchanged)."""
    token = _DIAGNOSTICS.set(False)
    try:
        yield
    finally:
        _DIAGNOSTICS.reset(token)


def _floats(**values: Tensor) -> dict[str, float]:
    """Tensors -> Python floats with a single device sync ({} under :func:`no_diagnostics`)."""
    if not values or not _DIAGNOSTICS.get():
        return {}
    return dict(zip(values, torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()))


def _plogp(p: Tensor) -> Tensor:
    """p · log p with 0 · log 0 = 0 and a finite gradient at p = 0."""
    return p * p.clamp_min(_TINY).log()


class _RowEntropy(torch.autograd.Function):
    """ent[..., q] = −Σ_k A[..., q, k] · log A[..., q, k] over the keys not in ``pad_keys``.

    A: (B, H, T, T) non-negative; pad_keys: (B, 1, 1, T) bool. Backward: ∂ent/∂A = −(log A + 1), 0 on
    padded keys. Written by hand because autograd would save and traverse clamp, log, mask and product
    separately over the largest tensor of the step; this needs log A only. log is taken of A clamped to
    the smallest float, so p = 0 (every padded key) gives 0 · log 0 = 0 and a finite gradient.

    In ``setup_context`` form with ``generate_vmap_rule``, so it runs per run inside the stacked engine's
    ``vmap``: what backward needs (log A) is a second, non-differentiable output. Call :func:`_row_entropy`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(A: Tensor, pad_keys: Tensor) -> tuple[Tensor, Tensor]:
        log_a = A.clamp_min(_TINY).log().masked_fill(pad_keys, 0.0)
        return -torch.linalg.vecdot(A, log_a), log_a  # finite values on padded keys meet log_a = 0

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], inputs[1])

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_log_a: Tensor | None) -> tuple[Tensor, None]:
        log_a, pad_keys = ctx.saved_tensors
        return (log_a + 1.0).mul(-grad.unsqueeze(-1)).masked_fill(pad_keys, 0.0), None


def _row_entropy(A: Tensor, pad_keys: Tensor) -> Tensor:
    return _RowEntropy.apply(A, pad_keys)[0]


class _PairCosineSum(torch.autograd.Function):
    """c[b, q] = Σ_{i<j} cos(A[b, i, q, :], A[b, j, q, :]) over the keys not in ``pad_keys``.

    A: (B, H, T, T); pad_keys: (B, 1, 1, T) bool. With â_h the unit rows and s = Σ_h â_h,
    Σ_{i<j} â_i·â_j = (‖s‖² − Σ_h ‖â_h‖²) / 2, and ‖â_h‖² is 1 (0 for an all-zero row): O(H) work per
    query instead of O(H²) pairs. Backward: ∂c/∂a_h = (s − (s·â_h) â_h) / ‖a_h‖ (the −â_h of
    ∂c/∂â_h is orthogonal to the sphere and drops out), 0 on padded keys and all-zero rows.

    vmap-able like :class:`_RowEntropy` (the saved â, s and 1/‖a‖ are non-differentiable outputs). Call
    :func:`_pair_cosine_sum`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(A: Tensor, pad_keys: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        unit = A.masked_fill(pad_keys, 0.0)
        norm = torch.linalg.vector_norm(unit, dim=-1)  # (B, H, T)
        inv = torch.where(norm > 0, 1.0 / norm.clamp_min(_TINY), 0.0)
        unit = unit * inv.unsqueeze(-1)
        s = unit.sum(1)  # (B, T, T)
        return (torch.linalg.vecdot(s, s) - (norm > 0).sum(1)) / 2, unit, s, inv

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output[1:])

    @staticmethod
    def backward(ctx, grad: Tensor, *_unused: Tensor | None) -> tuple[Tensor, None]:
        unit, s, inv = ctx.saved_tensors
        s = s.unsqueeze(1)
        along = torch.linalg.vecdot(s, unit).unsqueeze(-1)  # s·â_h, (B, H, T, 1)
        scale = (grad.unsqueeze(1) * inv).unsqueeze(-1)  # upstream / ‖a_h‖
        # Padded keys need no mask here: s and â_h are both 0 there.
        return torch.addcmul(s, along, unit, value=-1.0).mul_(scale), None


def _pair_cosine_sum(A: Tensor, pad_keys: Tensor) -> Tensor:
    return _PairCosineSum.apply(A, pad_keys)[0]


# ----------------------------------------------------------------------------------------- orthogonality


@_full_precision
def orthogonality_outputs(head_out: list[Tensor], padding_mask: Tensor) -> ConstraintResult:
    """Mean squared cosine similarity between different heads' outputs at the same real token.

    head_out: per layer (B, H, T, d_head), the heads' outputs before W_O; padding_mask: (B, T).

        L = mean_{ℓ, real t, i<j} cos²(z_ℓi(t), z_ℓj(t)),   cos(a, b) = a·b / (‖a‖ ‖b‖)

    Normalisation: cos² ∈ [0, 1], so L = 0 when the heads' outputs are orthogonal at every token and
    1 when they are identical (or opposite: a head that writes −z carries the same information).
    Squared, so that the penalty does not reward anti-aligned heads. Each token weighs the same (mean
    over all real tokens of the batch, then layers and pairs); a zero output has cosine 0 with everything.
    Note the heads' d_head coordinates are compared as they are, with no alignment between heads: this
    is redundancy *in the concatenated space W_O reads*, not MI (see :func:`infonce_mi` for that).

    per_token: (B, T), mean over layers and pairs; diagnostics: ``layer_<k>`` (mean on the k-th given
    layer), ``max_pair`` (largest per-pair mean).
    """
    _check_layers(head_out, "head_out")
    B, H, T, dh = head_out[0].shape
    i, j = _pairs(H, padding_mask.device)
    # Pairs are gathered by multiplying with one-hot (P, H) selectors rather than by indexing: the
    # gradient of an index is a scatter-add, the slowest op of this loss in profiles; that of a matmul
    # is a matmul.
    sel_i, sel_j = F.one_hot(i, H), F.one_hot(j, H)
    per_layer, pair_means = [], []
    real = (~padding_mask).float()
    for z in head_out:
        z = _upcast(z)  # (B, H, T, dh)
        si, sj = sel_i.to(z.dtype), sel_j.to(z.dtype)
        flat = z.reshape(B, H, T * dh)
        # cos² from raw dot products and squared norms: no normalised copy of z is needed.
        dots = torch.linalg.vecdot((si @ flat).view(B, -1, T, dh), (sj @ flat).view(B, -1, T, dh))  # (B, P, T)
        sq = torch.linalg.vecdot(z, z)  # (B, H, T)
        cos2 = dots.square() / ((si @ sq) * (sj @ sq)).clamp_min(_TINY)  # 0 for a zero vector
        per_layer.append(torch.where(padding_mask, 0.0, _pair_mean(cos2, dim=1)))
        pair_means.append(torch.einsum("bpt,bt->p", cos2.detach(), real.to(cos2.dtype)) / real.sum().clamp_min(1.0))
    return _token_level(per_layer, padding_mask, max_pair=_max(torch.cat(pair_means)))


@_full_precision
def orthogonality_weights(weights: list[Tensor]) -> ConstraintResult:
    """Mean squared off-diagonal entry of the Gram matrix of the heads' normalised projection subspaces.

    weights: a list of (H, d_model, d_head) blocks, e.g. ``model.per_head_weights("q")`` (one per layer;
    pass the blocks of several projections together to average over them). For heads i, j of one block:

        Ŵ_i  = W_i / ‖W_i W_iᵀ‖_F^½
        G_ij = ‖Ŵ_iᵀ Ŵ_j‖_F,      G_ij² = ⟨W_iW_iᵀ, W_jW_jᵀ⟩_F / (‖W_iW_iᵀ‖_F ‖W_jW_jᵀ‖_F) ∈ [0, 1]
        L    = mean over blocks and pairs i<j of G_ij²        (G is symmetric, so = mean over i≠j)

    (using ‖W_iᵀW_j‖_F² = tr(W_jᵀW_iW_iᵀW_j) = ⟨W_iW_iᵀ, W_jW_jᵀ⟩_F; G_ii = 1.) W_iW_iᵀ is the (d_model,
    d_model) quadratic form through which head i reads the residual stream, so G_ij = 0 iff the heads read
    orthogonal subspaces and G_ij = 1 iff the same subspace with the same shape (W_iW_iᵀ ∝ W_jW_jᵀ).
    It is invariant to W_i → W_i R for any rotation R of the head's d_head coordinates (which leaves
    the attention scores, for Q with K rotated alike, and the head's function, for V with W_O rotated
    alike, unchanged) and to scaling each head.

    Why not the Gram matrix of the flattened blocks vec(W_i)? Two random blocks are almost orthogonal
    as d_model·d_head-vectors (cos² ≈ 1/(d_model·d_head)), so that penalty is near 0 from the start, and
    it is blind to rotations inside a shared subspace: W_i and W_i R read exactly the same subspace yet
    vec(W_i)·vec(W_i R) = tr(W_iᵀW_i R) can be 0. Here i.i.d. Gaussian blocks give G_ij² ≈
    d_head / (d_model + d_head) (≈ 0.2 at the default sizes), and 0 is reachable whenever
    H·d_head ≤ d_model.

    Batch-level (per_token None); diagnostics: ``max_pair``.
    """
    _check_layers(weights, "weights")
    W = torch.stack([_upcast(w) for w in weights])  # (n, H, d, dh): small, stacking is free
    S = torch.einsum("nhdk,ngdl->nhgkl", W, W).square().sum((-1, -2))  # ‖W_iᵀW_j‖_F², (n, H, H)
    norm = S.diagonal(dim1=-2, dim2=-1).clamp_min(_EPS).sqrt()  # ‖W_iW_iᵀ‖_F, (n, H)
    i, j = _pairs(W.shape[1], W.device)
    g2 = S[:, i, j] / (norm[:, i] * norm[:, j])  # (n, P)
    return ConstraintResult(_pair_mean(g2).mean(), None, _floats(max_pair=_max(g2)))


@_full_precision
def orthogonality_attention(attn: list[Tensor], padding_mask: Tensor) -> ConstraintResult:
    """Overlap of different heads' attention distributions for the same real query (Li et al. 2018).

    attn: per layer (B, H, T, T) attention probabilities (rows = queries); padding_mask: (B, T).

        L = mean_{ℓ, real q, i<j} cos(A_i[q,:], A_j[q,:]),
        cos(a, b) = Σ_k a_k b_k / (‖a‖ ‖b‖),  k over the sample's real keys

    Normalisation: attention is non-negative, so cos ∈ [0, 1]: 0 when the heads look at disjoint
    positions, 1 when at the same positions in the same proportions, however sharp or diffuse.

    Why not the paper's raw overlap Σ_k A_i[q,k] A_j[q,k]? It is bounded by ‖A_i[q,:]‖ ‖A_j[q,:]‖, and
    ‖a‖² = Σ_k a_k² is smallest (1/n) for the uniform distribution: two *identical* uniform heads score
    1/n while two identical one-hot heads score 1. Minimising the raw overlap therefore rewards diffuse
    attention as much as disagreement, i.e. it confounds disagreement with (and fights) the
    attention-entropy constraint. The cosine divides that sharpness out, leaving position disagreement only.

    per_token: (B, T), mean over layers and pairs; diagnostics: ``layer_<k>``.
    """
    _check_layers(attn, "attn")
    n_pairs = attn[0].shape[1] * (attn[0].shape[1] - 1) // 2
    pad_keys = padding_mask[:, None, None, :]
    per_layer = [
        torch.where(padding_mask, 0.0, _pair_cosine_sum(_upcast(A), pad_keys) / max(n_pairs, 1))
        for A in attn
    ]
    return _token_level(per_layer, padding_mask)


def orthogonality_contributions(head_contrib: list[Tensor], padding_mask: Tensor) -> ConstraintResult:
    """Mean squared cosine similarity between different heads' contributions to the residual stream.

    head_contrib: per layer (B, H, T, d_model), c_h(t) = z_h(t) W_O[h]; padding_mask: (B, T).

        L = mean_{ℓ, real t, i<j} cos²(c_ℓi(t), c_ℓj(t))

    The basis-invariant version of :func:`orthogonality_outputs`: head outputs z_h can be made orthogonal
    by rotating a head's W_V and counter-rotating its W_O (z_h → z_h R, W_O[h] → Rᵀ W_O[h]) without
    changing the model's function, which a penalty on z_h rewards; c_h is unchanged by that rotation, so
    this penalty can only be lowered by heads that really write different directions. Same
    normalisation, per-token values and diagnostics as :func:`orthogonality_outputs` (it is that
    function on c_h instead of z_h).
    """
    return orthogonality_outputs(head_contrib, padding_mask)


# ------------------------------------------------------------------------------------ mutual information


def pooled_heads(head_out: Tensor, padding_mask: Tensor) -> Tensor:
    """(B, H, T, d_head) -> (B, H, d_head): each head's output averaged over the sample's real tokens."""
    z = _upcast(head_out).masked_fill(padding_mask[:, None, :, None], 0.0)
    n_real = (~padding_mask).sum(1).clamp_min(1).float()  # (B,)
    return z.sum(2) / n_real[:, None, None]


def _head_pairs(head_out: list[Tensor], padding_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Pooled representations of every head pair i<j of every layer: x, y each (L·P, B, d_head)."""
    pooled = torch.stack([pooled_heads(z, padding_mask) for z in head_out])  # (L, B, H, dh)
    i, j = _pairs(pooled.shape[2], pooled.device)
    x = pooled[:, :, i].transpose(1, 2).flatten(0, 1)  # (L·P, B, dh)
    y = pooled[:, :, j].transpose(1, 2).flatten(0, 1)
    return x, y


def infonce_bound(x: Tensor, y: Tensor, critic: nn.Module | None = None, temperature: float = 0.1) -> Tensor:
    """InfoNCE lower bound on I(x; y) from N paired samples (van den Oord et al. 2018; Poole et al. 2019).

    x: (..., N, d_x), y: (..., N, d_y), rows paired (x_n, y_n) ~ p(x, y); leading axes are independent
    problems. Returns (...,):

        I_NCE = log N + (1/N) Σ_n [ s(x_n, y_n) − log Σ_m exp s(x_n, y_m) ]

    critic: a module with ``critic(x, y) -> (..., N, N)`` scores s(x_n, y_m) for all pairs (e.g.
    :class:`SeparableCritic`); default the fixed cosine critic s(a, b) = cos(a, b) / temperature.
    For any critic, E[I_NCE] ≤ I(x; y), and I_NCE ≤ log N always (each term is the log of a softmax
    probability, ≤ 0); it is close to I(x; y) only with a good critic and I(x; y) ≪ log N.
    """
    if critic is None:
        s = F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(-1, -2) / temperature
    else:
        s = critic(x, y)
    n = s.shape[-1]
    return math.log(n) + (s.diagonal(dim1=-2, dim2=-1) - s.logsumexp(-1)).mean(-1)


@_full_precision
def infonce_mi(
    head_out: list[Tensor], padding_mask: Tensor, temperature: float, critic: CosineCritic | None = None
) -> ConstraintResult:
    """InfoNCE estimate of the mutual information between heads of a layer, to be minimised.

    head_out: per layer (B, H, T, d_head); padding_mask: (B, T). For each layer and head pair i<j,
    x_n = pooled head i, y_n = pooled head j of sample n (mean over its real tokens, :func:`pooled_heads`),
    N = B. With a trained ``critic`` (:class:`CosineCritic`, one per pair, what training uses), x and y
    are standardised over the batch and s(a, b) = cos(g(a), h(b)) / τ with the critic's learned g, h
    (frozen here: this loss sends no gradient to it). Without one, s(a, b) = cos(a, b) / τ on the raw
    pooled outputs, which is blind to dependence between heads whose outputs live in different bases
    (on trained models it sits at or below 0 whatever the heads share): kept for tests and as a
    reference, not as a training signal.

        I_NCE = log N + (1/N) Σ_n [ s(x_n, y_n) − logsumexp_m s(x_n, y_m) ]
        L     = mean over layers and pairs of max(I_NCE, 0)

    Normalisation: nats, L ∈ [0, log N] (log B: 4.16 for B = 64). The clamp at 0: with a fixed critic,
    I_NCE < 0 only says that paired samples look *less* alike than unpaired ones, which is dependence
    too (y_n = −x_n gives I_NCE ≈ −1/τ for well-separated samples); since I(x; y) ≥ 0, max(I_NCE, 0)
    is still a lower bound, and without the clamp minimising I_NCE would drive heads towards exactly that anti-aligned,
    fully dependent solution. A pair whose estimate is ≤ 0 gets no gradient.

    Caveat: a lower bound with a *fixed* critic. Minimising it makes head j's pooled output no more
    cosine-similar to head i's of the same sample than to other samples' — it need not lower the true
    MI (a rotation of one head's outputs defeats the critic). :class:`CLUB` is the upper-bound variant.

    Batch-level (per_token None); diagnostics: ``raw_mean`` (mean I_NCE before the clamp), ``max_pair``,
    ``log_n`` (the ceiling).
    """
    x, y = _head_pairs(head_out, padding_mask)
    if critic is None:
        est = infonce_bound(x, y, temperature=temperature)  # (L·P,)
    else:
        est = infonce_bound(_standardise(x), _standardise(y), critic=lambda a, b: critic(a, b, frozen=True))
    diagnostics = _floats(raw_mean=_pair_mean(est), max_pair=_max(est), log_n=torch.tensor(math.log(x.shape[1])))
    return ConstraintResult(_pair_mean(est.clamp_min(0.0)), None, diagnostics)


class _BatchedMLP(nn.Module):
    """n independent one-hidden-layer ReLU MLPs run as batched matmuls: (n, N, d_in) -> (n, N, d_out)."""

    def __init__(self, n: int, d_in: int, hidden: int, d_out: int, generator: torch.Generator | None = None):
        super().__init__()

        def uniform(*shape: int, fan_in: int) -> nn.Parameter:  # nn.Linear's default initialisation
            bound = 1.0 / math.sqrt(fan_in)
            return nn.Parameter(torch.empty(shape).uniform_(-bound, bound, generator=generator))

        self.w1, self.b1 = uniform(n, d_in, hidden, fan_in=d_in), uniform(n, 1, hidden, fan_in=d_in)
        self.w2, self.b2 = uniform(n, hidden, d_out, fan_in=hidden), uniform(n, 1, d_out, fan_in=hidden)

    def forward(self, x: Tensor, frozen: bool = False) -> Tensor:
        # frozen: use detached weights, so that a loss through this net sends no gradient to it.
        w1, b1, w2, b2 = (p.detach() if frozen else p for p in (self.w1, self.b1, self.w2, self.b2))
        return torch.baddbmm(b2, torch.baddbmm(b1, x, w1).relu(), w2)


class CosineCritic(nn.Module):
    """n learnable InfoNCE critics s(x, y) = cos(g(x), h(y)) / τ, g and h one-hidden-layer MLPs.

    The cosine/temperature critic of SimCLR-style InfoNCE, on learned projections: trained to *maximise*
    I_NCE (MIEstimator.auxiliary_step, on detached representations), it makes InfoNCE a (lower-bound)
    MI estimate between two heads; the model then minimises I_NCE with the critic frozen. The cosine
    bounds every score to [−1/τ, 1/τ], which keeps the adversarial game tame.
    ``forward(x (n, N, d_x), y (n, N, d_y), frozen) -> (n, N, N)``.
    """

    def __init__(self, n: int, d_x: int, d_y: int, hidden: int, temperature: float, generator: torch.Generator | None = None):
        super().__init__()
        self.temperature = temperature
        self.g = _BatchedMLP(n, d_x, hidden, hidden, generator)
        self.h = _BatchedMLP(n, d_y, hidden, hidden, generator)

    def forward(self, x: Tensor, y: Tensor, frozen: bool = False) -> Tensor:
        gx = F.normalize(self.g(x, frozen), dim=-1)
        hy = F.normalize(self.h(y, frozen), dim=-1)
        return gx @ hy.transpose(-1, -2) / self.temperature


class CLUB(nn.Module):
    """Contrastive Log-ratio Upper Bound on I(x; y) (Cheng et al. 2020), for n independent pairs at once.

    A variational conditional q(y | x) = N(μ(x), diag σ²(x)) per pair: one hidden-layer ReLU MLP
    d_x → hidden → 2·d_y giving μ and log σ² (soft-bounded to (−5, 5) so that a stale q cannot produce
    huge gradients). With N paired samples (x_n, y_n):

        I_CLUB = (1/N) Σ_n log q(y_n | x_n) − (1/N²) Σ_n Σ_m log q(y_m | x_n)
               = ½ (1/N) Σ_n Σ_d [ Var(y)_d + (ȳ_d − μ_nd)² − (y_nd − μ_nd)² ] / σ²_nd

    (the second line is exact: mean_m (y_m − μ)² = Var(y) + (ȳ − μ)², with the biased batch variance,
    and the log σ² and log 2π terms cancel), so all N² pairs cost O(N·d). It is an upper bound on
    I(x; y) when q ≈ p(y | x); for a Gaussian p(y | x) itself it equals d·ρ²/(1−ρ²) on correlated
    unit Gaussians (true MI −(d/2)·log(1−ρ²)), i.e. it is loose for strong dependence.

    Usage: q is trained by maximum likelihood (:meth:`log_likelihood`) on *detached* representations;
    the model minimises ``forward(x, y, frozen=True)``, which sends no gradient to q.
    """

    def __init__(self, n: int, d_x: int, d_y: int, hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        self.net = _BatchedMLP(n, d_x, hidden, 2 * d_y, generator)

    def q(self, x: Tensor, frozen: bool = False) -> tuple[Tensor, Tensor]:
        """μ(x), log σ²(x): each (n, N, d_y)."""
        mu, raw = self.net(x, frozen).chunk(2, dim=-1)
        return mu, 5.0 * torch.tanh(raw / 5.0)

    def log_likelihood(self, x: Tensor, y: Tensor) -> Tensor:
        """(1/N) Σ_n log q(y_n | x_n), per pair: (n,). Maximised to fit q."""
        mu, logvar = self.q(x)
        ll = -0.5 * ((y - mu).square() * torch.exp(-logvar) + logvar + math.log(2 * math.pi))
        return ll.sum(-1).mean(-1)

    def forward(self, x: Tensor, y: Tensor, frozen: bool = False) -> Tensor:
        """I_CLUB per pair: (n,). x: (n, N, d_x), y: (n, N, d_y)."""
        mu, logvar = self.q(x, frozen)
        y_mean = y.mean(-2, keepdim=True)
        y_var = y.var(-2, unbiased=False, keepdim=True)
        gap = (y_var + (y_mean - mu).square() - (y - mu).square()) * torch.exp(-logvar)
        return 0.5 * gap.sum(-1).mean(-1)


def _standardise(x: Tensor) -> Tensor:
    """Zero mean, unit variance per feature over the sample axis (-2). MI is invariant to it, and it
    stops the model from lowering CLUB by shrinking its outputs below the scale q was fitted on."""
    return (x - x.mean(-2, keepdim=True)) / (x.var(-2, unbiased=False, keepdim=True) + _EPS).sqrt()


class MIEstimator:
    """The mutual-information constraint's state: one estimator network per head pair of the constrained
    layers, and its Adam, trained in alternation with the model.

    On the pooled head outputs standardised over the batch (lr ``lr``, width ``hidden``): InfoNCE
    (``variant="infonce"``) with a :class:`CosineCritic` that :meth:`auxiliary_step` moves one Adam step
    up I_NCE; CLUB (``"club"``) with a q that it moves one maximum-likelihood step. The model minimises
    the mean over pairs of max(estimate, 0) with the network frozen (:meth:`loss`). The network is
    initialised from the global torch RNG, so the run's seed fixes it.
    """

    def __init__(self, variant: str, n_layers: int, n_heads: int, d_head: int, hidden: int, temperature: float,
                 lr: float, device: torch.device | str | None = None):
        if variant not in MI_VARIANTS:
            raise ValueError(f"mi_variant={variant!r} is not one of {list(MI_VARIANTS)}")
        self.temperature = temperature
        n_pairs = n_layers * n_heads * (n_heads - 1) // 2
        if variant == "club":
            self.estimator: CLUB | CosineCritic = CLUB(n_pairs, d_head, d_head, hidden)
        else:
            self.estimator = CosineCritic(n_pairs, d_head, d_head, hidden, temperature)
        self.estimator = self.estimator.to(device)
        self.optimizer = torch.optim.Adam(self.estimator.parameters(), lr=lr)

    @staticmethod
    def _inputs(head_out: list[Tensor], padding_mask: Tensor, detach: bool = False) -> tuple[Tensor, Tensor]:
        """Standardised pooled outputs of every head pair: x, y (L·P, B, d_head)."""
        x, y = _head_pairs([z.detach() if detach else z for z in head_out], padding_mask)
        return _standardise(x), _standardise(y)

    def loss(self, head_out: list[Tensor], padding_mask: Tensor) -> Tensor:
        """The constraint on the constrained layers' head outputs (per layer (B, H, T, d_head))."""
        if isinstance(self.estimator, CosineCritic):
            return infonce_mi(head_out, padding_mask, self.temperature, critic=self.estimator).loss
        with torch.autocast(padding_mask.device.type, enabled=False):
            est = self.estimator(*self._inputs(head_out, padding_mask), frozen=True)  # (L·P,)
        return _pair_mean(est.clamp_min(0.0))  # clamped like InfoNCE: below 0 only exploits a stale q

    def objective(self, head_out: list[Tensor], padding_mask: Tensor) -> tuple[Tensor, str]:
        """What the estimator's own step minimises, on the detached representations (no gradient reaches
        the model): −I_NCE for InfoNCE's critic (``critic_infonce``), the negative log-likelihood for
        CLUB's q (``club_nll``). The stacked engine minimises it in the model's backward pass."""
        with torch.autocast(padding_mask.device.type, enabled=False):
            x, y = self._inputs(head_out, padding_mask, detach=True)
            if isinstance(self.estimator, CLUB):
                return -self.estimator.log_likelihood(x, y).mean(), "club_nll"
            return -infonce_bound(x, y, critic=self.estimator).mean(), "critic_infonce"

    def auxiliary_step(self, head_out: list[Tensor], padding_mask: Tensor) -> dict[str, float]:
        """One Adam step of the estimator on :meth:`objective` (alternating with the model's step): up
        I_NCE for InfoNCE's critic, up the log-likelihood for CLUB's q. Returns ``critic_infonce`` or
        ``club_nll``, before the step."""
        with torch.enable_grad():
            objective, name = self.objective(head_out, padding_mask)
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            self.optimizer.step()
        value = objective.item()
        return {name: value if name == "club_nll" else -value}

    def state_dict(self) -> dict:
        """The estimator and its optimiser, for exact checkpoint/resume."""
        return {"estimator": self.estimator.state_dict(), "estimator_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.estimator.load_state_dict(state["estimator"])
        self.optimizer.load_state_dict(state["estimator_optimizer"])


# ------------------------------------------------------------------------------------------- sparsity


def normalised_row_entropy(attn: Tensor, padding_mask: Tensor) -> Tensor:
    """H(A[b, h, q, ·]) / log n_b for every attention row: (B, H, T) from attn (B, H, T, T).

    H = −Σ_k A log A over the n_b real keys of sample b; 1 = uniform, 0 = one-hot, and 0 when n_b = 1.
    The one definition of normalised attention entropy: the constraint averages it over real queries,
    analysis reports it per head, so the two can never drift apart.
    """
    n_real = (~padding_mask).sum(1)  # (B,)
    inv_log_n = torch.where(n_real > 1, 1.0 / n_real.float().clamp_min(2.0).log(), 0.0)  # 1 / log n_b, or 0
    return _row_entropy(_upcast(attn), padding_mask[:, None, None, :]) * inv_log_n[:, None, None]


@_full_precision
def attention_entropy(attn: list[Tensor], padding_mask: Tensor) -> ConstraintResult:
    """Normalised entropy of each head's attention distribution, averaged over real queries.

    attn: per layer (B, H, T, T) attention probabilities (rows = queries); padding_mask: (B, T).
    For sample b with n_b real tokens:

        H_ℓh(q) = −Σ_k A_ℓh[q,k] log A_ℓh[q,k]     (k over real keys)
        L       = mean over layers ℓ, heads h, real queries q of H_ℓh(q) / log n_b

    Normalisation: 1 = uniform over the real keys, 0 = one-hot; defined as 0 when n_b = 1 (nothing to
    choose from). Dividing by log n_b makes short and long stories comparable. Reaches the attention
    logits only (W_Q, W_K and what feeds them), never W_V, W_O or the readout of that layer.

    per_token: (B, T), mean over layers and heads; diagnostics: ``layer_<k>``, ``min_head``, ``max_head``
    (per-head means).
    """
    _check_layers(attn, "attn")
    real = (~padding_mask).float()
    per_layer, head_means = [], []
    for A in attn:
        ent = normalised_row_entropy(A, padding_mask)  # (B, H, T)
        per_layer.append(torch.where(padding_mask, 0.0, ent.mean(1)))
        head_means.append(torch.einsum("bht,bt->h", ent.detach(), real.to(ent.dtype)) / real.sum().clamp_min(1.0))
    head_means = torch.cat(head_means)
    return _token_level(per_layer, padding_mask, min_head=head_means.min(), max_head=head_means.max())


@_full_precision
def head_usage_entropy(head_contrib: list[Tensor], padding_mask: Tensor) -> ConstraintResult:
    """Normalised entropy of how the work of a layer is shared among its heads.

    head_contrib: per layer (B, H, T, d_model), each head's contribution to the residual stream;
    padding_mask: (B, T). Per layer:

        u_h = Σ_{b, real t} ‖c_bh(t)‖₂            (head h's usage over the whole batch)
        p_h = u_h / Σ_g u_g
        L   = mean over layers of  −Σ_h p_h log p_h / log H

    Normalisation: 1 = every head carries an equal share, 0 = a single head does all the work
    (0 by definition when H = 1). Batch-level: usage is pooled over the batch, so minimising it
    concentrates the work on few heads overall, not per token. Does not reach the readout.

    per_token None; diagnostics: ``max_share`` (largest p_h over layers and heads), ``effective_heads``
    (exp of the unnormalised entropy, mean over layers: between 1 and H).
    """
    _check_layers(head_contrib, "head_contrib")
    # Mask the (B, H, T) norms rather than the (B, H, T, d) input: one pass less over the big tensor.
    usage = torch.stack([
        torch.where(padding_mask[:, None, :], 0.0, torch.linalg.vector_norm(_upcast(c), dim=-1)).sum((0, 2))
        for c in head_contrib
    ])  # (L, H)
    p = usage / usage.sum(-1, keepdim=True).clamp_min(_EPS)
    ent = -_plogp(p).sum(-1)  # (L,) in nats
    H = p.shape[-1]
    loss = (ent / math.log(H)).mean() if H > 1 else ent.new_zeros(())
    return ConstraintResult(loss, None, _floats(max_share=p.max(), effective_heads=ent.exp().mean()))


# ------------------------------------------------------------------------------- the published losses


def _published_pooled(head_out: Tensor, padding_mask: Tensor) -> Tensor:
    """r_h of the original study: (B, H, T, d_head) -> (B, H, d_head), the mean over real tokens,
    L2-normalised. (It zero-pads r_h to d_model first, which changes no dot product.)"""
    return F.normalize(pooled_heads(head_out, padding_mask), dim=-1, eps=_EPS)


@_full_precision
def published_orthogonality(head_out: list[Tensor], padding_mask: Tensor) -> ConstraintResult:
    """The original study's orthogonality loss: mean over samples and all head pairs (h, h′), diagonal
    included, of (G − I)², G[h, h′] = r_h · r_h′ (:data:`FORMULAS` ``orthogonality_published``).
    Per layer, then the mean over layers (the published runs constrain the last layer only)."""
    _check_layers(head_out, "head_out")
    losses = []
    for z in head_out:
        r = _published_pooled(z, padding_mask)  # (B, H, dh)
        G = r @ r.transpose(-1, -2)  # (B, H, H)
        eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        losses.append((G - eye).square().mean())
    return ConstraintResult(torch.stack(losses).mean(), None, {})


@_full_precision
def published_infonce(head_out: list[Tensor], padding_mask: Tensor, temperature: float = PUBLISHED_TEMPERATURE) -> ConstraintResult:
    """The original study's "InfoNCE MI proxy", with its sign: the mean over head pairs i<j of the
    cross-entropy of the logits r_i r_jᵀ / temperature (B × B) against the diagonal, *minimised*.

    CE = log B − I_NCE for the fixed cosine critic, so minimising it raises the InfoNCE bound between
    heads: the published term increases their dependence (:data:`FORMULAS` ``published``). Diagnostics:
    ``infonce`` (mean I_NCE = log B − CE over pairs), ``log_n``.
    """
    _check_layers(head_out, "head_out")
    ces = []
    for z in head_out:
        r = _published_pooled(z, padding_mask)  # (B, H, dh)
        i, j = _pairs(r.shape[1], r.device)
        logits = r[:, i].transpose(0, 1) @ r[:, j].permute(1, 2, 0) / temperature  # (P, B, B)
        target = torch.arange(r.shape[0], device=r.device).expand(len(i), -1)  # (P, B)
        ces.append(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(len(i), -1).mean(-1))
    ce = torch.cat(ces)  # (L·P,)
    log_n = math.log(head_out[0].shape[0])
    return ConstraintResult(ce.mean(), None, _floats(infonce=log_n - ce.mean(), log_n=torch.tensor(log_n)))


@_full_precision
def published_attention_entropy(attn: list[Tensor], padding_mask: Tensor) -> ConstraintResult:
    """The original study's attention entropy: mean over samples and heads of the mean over real queries of
    −Σ_k A log A over real keys, in nats, unnormalised (:data:`FORMULAS` ``attention_entropy_published``)."""
    _check_layers(attn, "attn")
    real = (~padding_mask).float()  # (B, T)
    n_real = real.sum(1).clamp_min(1.0)  # (B,)
    losses = []
    for A in attn:
        ent = _row_entropy(_upcast(A), padding_mask[:, None, None, :])  # (B, H, T) nats
        per_sample = (ent * real[:, None, :]).sum(-1) / n_real[:, None]  # (B, H): mean over real queries
        losses.append(per_sample.mean())
    return ConstraintResult(torch.stack(losses).mean(), None, {})


@_full_precision
def published_head_usage(head_out: list[Tensor], padding_mask: Tensor) -> ConstraintResult:
    """The original study's head-usage entropy: a_h = mean over samples of the mean over real tokens of
    ‖z_h(t)‖₂, p = a / Σ a, L = −Σ p log p in nats (:data:`FORMULAS` ``head_usage_published``)."""
    _check_layers(head_out, "head_out")
    real = (~padding_mask).float()
    n_real = real.sum(1).clamp_min(1.0)
    losses = []
    for z in head_out:
        norms = torch.linalg.vector_norm(_upcast(z), dim=-1) * real[:, None, :]  # (B, H, T)
        a = (norms.sum(-1) / n_real[:, None]).mean(0)  # (H,)
        p = a / a.sum().clamp_min(_EPS)
        losses.append(-_plogp(p).sum())
    return ConstraintResult(torch.stack(losses).mean(), None, {})


# ----------------------------------------------------------------------------------------------- measure


MEASURE_CAPTURES = ("attn", "head_out", "head_contrib")


@torch.no_grad()
def measure(
    out: EncoderOutput,
    padding_mask: Tensor,
    model: Encoder,
    layers: Sequence[int] | None = None,
) -> dict[str, float]:
    """Every constraint's measure under no_grad, whatever the weights (all orthogonality variants,
    attention entropy, head usage), on ``out`` captured with :data:`MEASURE_CAPTURES`.

    Used to ask "does the loss do what it says" on the test set, for constrained and unconstrained
    models alike. Keys are those of :data:`FORMULAS` but the two MI estimators (``orthogonality_weights``
    averages Q, K and V; ``orthogonality_weights_q`` etc. give each), plus ``<key>/<diagnostic>``. Mutual
    information needs a freshly trained critic or q on the model's outputs: see ``analysis.estimate_head_mi``
    (and ``analysis.posthoc_mi``). ``layers``: the layers measured (default: the global layers, those the
    constraints act on by default).
    """
    if layers is None:
        layers = range(model.cfg.local_layers, model.cfg.n_layers)
    sel = lambda per_layer: [per_layer[i] for i in layers]  # noqa: E731
    weights = {p: sel(model.per_head_weights(p)) for p in "qkv"}
    results = {
        "orthogonality_outputs": orthogonality_outputs(sel(out.head_out), padding_mask),
        "orthogonality_weights": orthogonality_weights([w for ws in weights.values() for w in ws]),
        **{f"orthogonality_weights_{p}": orthogonality_weights(ws) for p, ws in weights.items()},
        "orthogonality_attention": orthogonality_attention(sel(out.attn), padding_mask),
        "attention_entropy": attention_entropy(sel(out.attn), padding_mask),
        "head_usage": head_usage_entropy(sel(out.head_contrib), padding_mask),
    }
    values = _floats(**{name: r.loss for name, r in results.items()})
    for name, r in results.items():
        values.update({f"{name}/{k}": v for k, v in r.diagnostics.items()})
    return values


__all__ = [
    "CLUB",
    "FORMULAS",
    "MEASURE_CAPTURES",
    "ENTROPY_VARIANTS",
    "MI_VARIANTS",
    "ORTHOGONALITY_VARIANTS",
    "USAGE_VARIANTS",
    "ConstraintResult",
    "CosineCritic",
    "MIEstimator",
    "attention_entropy",
    "head_usage_entropy",
    "infonce_bound",
    "infonce_mi",
    "measure",
    "normalised_row_entropy",
    "orthogonality_attention",
    "orthogonality_contributions",
    "orthogonality_outputs",
    "orthogonality_weights",
    "pooled_heads",
    "published_attention_entropy",
    "published_head_usage",
    "published_infonce",
    "published_orthogonality",
]
