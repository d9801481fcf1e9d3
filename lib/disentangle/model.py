"""A small pre-LayerNorm Transformer encoder whose heads can be inspected, constrained and ablated.

Read top to bottom: the config, the attention layer (per-head weights shaped like TransformerLens,
``W_Q: [n_heads, d_model, d_head]``), the block, the encoder, and the output object.

Contract (the one every caller relies on: analysis, constraints, the training loop)::

    out = model(tokens, padding_mask, capture=("attn", "head_out", "head_contrib"))
    out.logits            # (B, n_classes)
    out.attn[l]           # (B, H, T, T) attention probabilities of layer l, before dropout
    out.head_out[l]       # (B, H, T, d_head) per-head outputs before the output projection
    out.head_contrib[l]   # (B, H, T, d_model) per-head contributions to the residual stream
    out.resid_mid[l]      # (B, T, d_model) the residual stream after attention (what a Hopfield memory reads)

With nothing captured, attention runs through ``F.scaled_dot_product_attention`` (fused kernels).
Only ``"attn"`` needs the explicit softmax path: per-head outputs and contributions come out of the
fused path too. Reading something that was not captured raises :class:`NotCapturedError`; it is never
a silent ``None``.

``padding_mask`` is ``(B, T)`` bool, True on padding. No query attends to a padding key (its attention
probability is exactly 0). Padding *queries* still produce (meaningless) rows in every capture; the readout
never reads them and everything downstream must mask them out. Inputs are checked up front (shapes, dtypes,
token ids in range, a real token where the readout looks), so bad batches fail with a clear message.

``model.ablate_heads([(layer, head), ...])`` zeroes heads inside a ``with`` block, without copying the model.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .schema import Config, at_least, one_of, positive

CAPTURABLE = ("attn", "head_out", "head_contrib", "gates", "attractors", "resid_mid")
METASTABLE, NO_MEMORY = -1, -2  # attractor ids of a token without a dominant stored pattern, and of a layer without memory
ATTENTIONS = ("softmax", "entmax15", "entmax_alpha")
# Scores of blocked keys for entmax: finite (entmax squares and sorts its inputs, -inf would give NaN) and far
# below any real score, so the threshold leaves them at exactly 0.
_ENTMAX_BLOCKED = -1e4


@dataclass(frozen=True)
class ModelConfig(Config):
    vocab_size: int | None = None  # input tokens; None = filled in from the data by train.run
    n_classes: int | None = None  # answer classes; None = filled in from the data by train.run
    d_model: int = 64  # residual stream width
    n_heads: int = 8  # heads per layer, the units the constraints act on; 8 narrow heads learned the lookups in fewer steps than 4 wide ones
    n_layers: int = 2  # total, local layers included
    # The first `local_layers` layers attend only within a sentence (tokens with equal `segments`; the question
    # and specials form one segment). Like MemN2N's sentence encoding, this hands every token its sentence's
    # content, so binding "who went where" is nearly free. Without it a small encoder plateaus for thousands
    # of steps on a "bag of places in the story" shortcut (see notebooks/01_baseline); 0 = a plain encoder.
    local_layers: int = 1
    d_ff: int = 128  # FFN hidden width, the first capacity axis the study scales
    dropout: float = 0.0  # small models on synthetic data rarely need it; attention is captured before it
    max_len: int = 128  # longest input the position table covers (CLS + story + SEP + question + SEP)
    # "rope" (rotary, Su et al. 2021): attention scores depend on relative offsets, so "the subject 3 tokens
    # back" is one pattern at every position -- learned absolute positions must learn it position by position.
    # "learned" and "sinusoidal" add absolute positions to the token embeddings.
    pos_encoding: str = "rope"
    readout: str = "cls"  # "cls": classify from the CLS token; "mean": from the mean over real tokens
    bias: bool = True  # biases in attention and FFN projections
    # Which projections `bias=False` strips: "all" (attention and FFN), or "attention" (only Q/K/V and the output
    # projection, the FFN keeps its biases: the original study's encoder). No effect when bias=True. Added later.
    no_bias: str = field(default="all", metadata={"added": True})
    # Multiply token embeddings by sqrt(d_model) before adding absolute positions (Vaswani et al. 2017; the
    # original study's encoder). Without it N(0, 0.02) embeddings are drowned by unit-size sinusoids. Added later.
    scale_embeddings: bool = field(default=False, metadata={"added": True})
    # How the global (not sentence-local) layers turn scores into attention: "softmax"; "entmax15", 1.5-entmax
    # (Peters et al. 2019), sparse by construction with exact zeros; "entmax_alpha", alpha-entmax with a learned
    # alpha = 1 + sigmoid(a) in (1, 2) per head, starting at 1.5 (Correia et al. 2019). Both from the `entmax`
    # package; both take the explicit attention path. Added after runs were cached: out of the hash at "softmax".
    attention: str = field(default="softmax", metadata={"added": True})
    # attention="entmax_alpha": every head's alpha at initialisation, in (1, 2) (1 = softmax, 2 = sparsemax); the
    # learned alpha moves from there. 1.5 as Correia et al. 2019. Added after runs were cached: out of the hash at 1.5.
    entmax_alpha: float = field(default=1.5, metadata={"added": True})
    # Routed heads, MoH-style (Jin et al. 2024), in the global layers: a per-token router keeps the top
    # `routed_top_k` of the n_heads - shared_heads routed heads (renormalised, times k); `shared_heads` are always
    # on, mixed with the routed group by a learned per-token two-way softmax; each head's output is multiplied
    # by its gate before W_O. 0 = plain multi-head attention (every gate 1). Added after runs were cached.
    routed_top_k: int = field(default=0, metadata={"added": True})
    shared_heads: int = field(default=0, metadata={"added": True})
    routing_balance: float = field(default=0.01, metadata={"added": True})  # weight of the load-balance loss (published 0.01)
    # Hopfield memory (Ramsauer et al. 2020, hflayers' HopfieldLayer), in the global layers: `hopfield_patterns` = M
    # learned stored patterns X; each token state after attention, xi, is iterated xi <- X^T softmax(beta X xi)
    # (state and patterns layer-normalised, as hflayers does) for at most `hopfield_steps` updates or until
    # max |change| < `hopfield_tol`, and the retrieved pattern is added to the residual stream (before the FFN,
    # which stays). beta None = 1/sqrt(d_model), hflayers' default. 0 patterns = no memory. Added after runs were cached.
    hopfield_patterns: int = field(default=0, metadata={"added": True})
    hopfield_beta: float | None = field(default=None, metadata={"added": True})
    hopfield_steps: int = field(default=3, metadata={"added": True})
    hopfield_tol: float = field(default=1e-3, metadata={"added": True})

    def problems(self) -> list[str]:
        p: list[str] = []
        for name in ("vocab_size", "n_classes"):
            value = getattr(self, name)
            if value is not None:
                p += at_least(name, value, 1)
        for name in ("d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            p += positive(name, getattr(self, name))
        if not 0 <= self.local_layers < max(self.n_layers, 1):
            p.append(f"local_layers={self.local_layers} must be in [0, n_layers={self.n_layers}): "
                     "the readout needs at least one layer that sees the whole input")
        if self.d_model > 0 and self.n_heads > 0 and self.d_model % self.n_heads:
            p.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout={self.dropout} must be in [0, 1)")
        p += one_of("pos_encoding", self.pos_encoding, ("rope", "learned", "sinusoidal"))
        if self.pos_encoding == "rope" and self.d_model > 0 and self.n_heads > 0 and self.d_head % 2:
            p.append(f"pos_encoding='rope' needs an even d_head, got d_model/n_heads={self.d_head}")
        p += one_of("readout", self.readout, ("cls", "mean"))
        p += one_of("no_bias", self.no_bias, ("all", "attention"))
        p += one_of("attention", self.attention, ATTENTIONS)
        if not 1.0 < self.entmax_alpha < 2.0:
            p.append(f"entmax_alpha={self.entmax_alpha} must be in (1, 2): 1 is softmax, 2 sparsemax (alpha = 1 + sigmoid(a))")
        p += at_least("routed_top_k", self.routed_top_k, 0)
        p += at_least("shared_heads", self.shared_heads, 0)
        p += at_least("routing_balance", self.routing_balance, 0.0)
        if self.routed_top_k > 0 and not 0 <= self.shared_heads < self.n_heads:
            p.append(f"shared_heads={self.shared_heads} must be in [0, n_heads={self.n_heads}) so that some heads are routed")
        elif self.routed_top_k > self.n_heads - self.shared_heads:
            p.append(f"routed_top_k={self.routed_top_k} must be <= the routed heads, n_heads - shared_heads = "
                     f"{self.n_heads - self.shared_heads}")
        p += at_least("hopfield_patterns", self.hopfield_patterns, 0)
        if self.hopfield_patterns:
            if self.hopfield_beta is not None and not self.hopfield_beta > 0:
                p.append(f"hopfield_beta={self.hopfield_beta} must be > 0 (or null for 1/sqrt(d_model))")
            p += positive("hopfield_steps", self.hopfield_steps)
            p += positive("hopfield_tol", self.hopfield_tol)
        if self.shared_heads > 0 and self.routed_top_k == 0:
            p.append(f"shared_heads={self.shared_heads} needs routing: set routed_top_k >= 1")
        return p

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


class NotCapturedError(RuntimeError):
    """Raised when an internal that was not requested with ``capture=`` is read."""


@dataclass
class EncoderOutput:
    """Logits plus whatever internals were captured, one entry per layer."""

    logits: torch.Tensor  # (B, n_classes)
    captured: frozenset[str]
    layers: list[dict[str, torch.Tensor]]  # per layer: capture name -> tensor
    # Losses the architecture itself asks to be trained with, e.g. {"load_balance": ...} of routed heads
    # (the mean over routed layers); empty for a plain encoder. The objective adds them with their weights.
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def _get(self, name: str) -> list[torch.Tensor]:
        if name not in self.captured:
            raise NotCapturedError(
                f"{name!r} was not captured; call model(tokens, padding_mask, capture={name!r}) "
                f"(captured here: {sorted(self.captured) or 'nothing'})"
            )
        return [layer[name] for layer in self.layers]

    @property
    def attn(self) -> list[torch.Tensor]:
        """Per layer: attention probabilities (B, H, T, T), rows = queries, before dropout; float32 even under autocast."""
        return self._get("attn")

    @property
    def head_out(self) -> list[torch.Tensor]:
        """Per layer: per-head outputs before the output projection (B, H, T, d_head)."""
        return self._get("head_out")

    @property
    def head_contrib(self) -> list[torch.Tensor]:
        """Per layer: each head's contribution to the residual stream (B, H, T, d_model)."""
        return self._get("head_contrib")

    @property
    def attractors(self) -> list[torch.Tensor]:
        """Per layer: each token's attractor (B, T) int64: the id of the stored pattern its Hopfield retrieval
        converged to, METASTABLE (-1) when none dominates, NO_MEMORY (-2) in a layer without memory."""
        return self._get("attractors")

    @property
    def resid_mid(self) -> list[torch.Tensor]:
        """Per layer: the residual stream after attention, before the memory and the FFN (B, T, d_model): the
        token states a Hopfield memory retrieves from (and the same point of a model without one)."""
        return self._get("resid_mid")

    @property
    def gates(self) -> list[torch.Tensor]:
        """Per layer: each head's gate at each token (B, H, T): the MoH router's in routed layers, 1 elsewhere."""
        return self._get("gates")


def _normalise_capture(capture: str | Iterable[str] | bool | None) -> frozenset[str]:
    if capture is None or capture is False:
        return frozenset()
    if capture is True or capture == "all":
        return frozenset(CAPTURABLE)
    names = frozenset([capture] if isinstance(capture, str) else capture)
    unknown = names - set(CAPTURABLE)
    if unknown:
        raise ValueError(f"capture={sorted(unknown)} is not capturable (allowed: {list(CAPTURABLE)}, True or 'all')")
    return names


class Attention(nn.Module):
    """Multi-head self-attention with per-head parameters ``[n_heads, d_model, d_head]``.

    For head ``h``: ``A_h = softmax(q_h k_h^T / sqrt(d_head) + mask)`` with ``q_h = x W_Q[h] + b_Q[h]``
    (likewise k, v); ``z_h = A_h v_h`` is the head output and ``z_h W_O[h]`` its contribution to the
    residual stream; the layer returns ``sum_h z_h W_O[h] + b_O``.
    """

    def __init__(self, cfg: ModelConfig, local: bool = False):
        super().__init__()
        H, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.n_heads, self.d_head, self.dropout = H, dh, cfg.dropout
        # Sentence-local layers keep softmax: the alternatives, like the constraints, act on the global layers.
        self.normaliser = "softmax" if local else cfg.attention
        # entmax_alpha: alpha = 1 + sigmoid(alpha_logit) per head, from cfg.entmax_alpha (logit 0 is alpha 1.5).
        self.alpha_logit = nn.Parameter(torch.zeros(H)) if self.normaliser == "entmax_alpha" else None
        self.alpha_init = cfg.entmax_alpha
        # Routed heads (MoH): heads [0, shared) are shared, the rest routed. Routers are 2-D: N(0, 0.02) at init.
        self.routed_k = 0 if local else cfg.routed_top_k
        self.n_shared = cfg.shared_heads if self.routed_k else 0
        E = H - self.n_shared
        self.W_route = nn.Parameter(torch.empty(d, E)) if self.routed_k else None
        self.W_shared = nn.Parameter(torch.empty(d, self.n_shared)) if self.n_shared > 1 else None
        self.W_mix = nn.Parameter(torch.empty(d, 2)) if self.n_shared >= 1 else None
        self.W_Q = nn.Parameter(torch.empty(H, d, dh))
        self.W_K = nn.Parameter(torch.empty(H, d, dh))
        self.W_V = nn.Parameter(torch.empty(H, d, dh))
        self.W_O = nn.Parameter(torch.empty(H, dh, d))
        # Flat (3 * H * d_head,) in (q|k|v, head, d_head) order, so it is the bias of the fused QKV matmul and,
        # being 1-D like every other bias, is left out of weight init and weight decay. Per head: .view(3, H, dh).
        self.b_QKV = nn.Parameter(torch.zeros(3 * H * dh)) if cfg.bias else None
        self.b_O = nn.Parameter(torch.zeros(d)) if cfg.bias else None
        # (H,) multiplier of each head's output while heads are ablated (see Encoder.ablate_heads), else None.
        # A buffer so that it follows .to(device); replaced, never edited in place, so graphs built under an
        # ablation stay valid after it ends.
        self.register_buffer("head_mask", None, persistent=False)
        if cfg.pos_encoding == "rope":
            cos, sin = rope_tables(cfg.max_len, dh)
            self.register_buffer("rope_cos", cos, persistent=False)  # (max_len, d_head)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    def forward(self, x: torch.Tensor, blocked: torch.Tensor, capture: frozenset[str]) -> tuple[torch.Tensor, dict]:
        """x: (B, T, d_model); blocked: bool, True where a query may not attend to a key, (B, 1, 1, T) for
        padding only or (B, 1, T, T) for sentence-local layers. Returns (B, T, d_model) and the captures."""
        B, T, d = x.shape
        H, dh = self.n_heads, self.d_head
        # One matmul for Q, K and V of all heads (columns in (q|k|v, head, d_head) order); the per-head
        # layout is a view of its result. Concatenating the weights costs one 3 * d_model^2 copy per call.
        W = torch.cat([self.W_Q, self.W_K, self.W_V]).permute(1, 0, 2).reshape(d, 3 * H * dh)
        flat = x.reshape(B * T, d)
        qkv = flat @ W if self.b_QKV is None else torch.addmm(self.b_QKV, flat, W)
        qkv = qkv.view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # (3, B, H, T, dh)
        if self.rope_cos is not None:  # rotate q and k in one call (half the small ops)
            qk = apply_rope(qkv[:2], self.rope_cos[:T], self.rope_sin[:T])
            (q, k), v = qk.unbind(0), qkv[2]  # each (B, H, T, dh)
        else:
            q, k, v = qkv.unbind(0)
        store: dict[str, torch.Tensor] = {}
        p_drop = self.dropout if self.training else 0.0
        if self.normaliser != "softmax":
            probs = self._entmax((q * dh**-0.5) @ k.transpose(-1, -2), blocked)  # (B, H, T, T)
            if "attn" in capture:
                store["attn"] = probs
            z = (F.dropout(probs, p_drop) if p_drop else probs).to(v.dtype) @ v  # (B, H, T, dh)
        elif "attn" in capture:
            # Explicit softmax, so the probabilities can be kept. The mask is additive: exp(-inf) is exactly
            # 0 on padding keys, and unlike masked_fill it costs nothing in the backward pass. Scaling q
            # (T x d_head per head) is cheaper than scaling the scores (T x T).
            mask = torch.zeros(blocked.shape, dtype=q.dtype, device=q.device).masked_fill(blocked, float("-inf"))
            # softmax in float32 even under autocast (a no-op in float32), as the fused kernels do.
            probs = ((q * dh**-0.5) @ k.transpose(-1, -2) + mask).softmax(-1, dtype=torch.float32)  # (B, H, T, T)
            store["attn"] = probs  # before dropout: rows sum to 1 over the real keys
            z = (F.dropout(probs, p_drop) if p_drop else probs).to(v.dtype) @ v  # (B, H, T, dh)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked, dropout_p=p_drop)  # (B, H, T, dh)
        if self.routed_k:
            gates, store["load_balance"] = self.route(x, blocked[:, 0, 0, :])  # (B, T, H), scalar
            z = z * gates.transpose(1, 2).unsqueeze(-1).to(z.dtype)  # each head's output times its gate
            if "gates" in capture:
                store["gates"] = gates.transpose(1, 2)  # (B, H, T)
        elif "gates" in capture:
            store["gates"] = torch.ones(B, H, T, device=x.device)  # plain multi-head attention: every gate is 1
        if self.head_mask is not None:
            z = z * self.head_mask.view(1, H, 1, 1).to(z.dtype)
        if "head_out" in capture:
            store["head_out"] = z
        if "head_contrib" in capture:
            contrib = torch.einsum("bhtd,hdm->bhtm", z, self.W_O.to(z.dtype))  # (B, H, T, d)
            store["head_contrib"] = contrib
            out = contrib.sum(1)  # (B, T, d)
        else:
            out = z.transpose(1, 2).reshape(B, T, H * dh) @ self.W_O.reshape(H * dh, d)  # (B, T, d)
        if self.b_O is not None:
            out = out + self.b_O
        return out, store

    def route(self, x: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MoH gates (B, T, H) of every head at every token, and the load-balance loss, from x (B, T, d_model).

        Routed heads (E = H − shared): g = softmax(x W_route); the top k kept, renormalised to sum to 1, times
        k. Shared heads: softmax(x W_shared) · shared (all ones · 1 when shared = 1). With shared heads, a
        per-token mix [a₁, a₂] = 2 · softmax(x W_mix) scales the shared gates by a₁, the routed by a₂.
        Load balance (Switch-style, over real tokens): E · Σᵢ Pᵢ fᵢ, Pᵢ the mean of gᵢ, fᵢ the fraction of
        tokens whose top k holds head i; k when perfectly balanced (uniform P = 1/E, f = k/E); f carries no gradient.
        """
        B, T, _ = x.shape
        k, hs = self.routed_k, self.n_shared
        probs = (x @ self.W_route).float().softmax(-1)  # (B, T, E)
        top = probs.topk(k, dim=-1).indices  # (B, T, k)
        # out of place, from a tensor of ones: in-place scatter of a scalar has no vmap batching rule (a
        # per-run loop and a UserWarning in the report for every routed stack); the 0/1 values are the same
        chosen = torch.zeros_like(probs).scatter(-1, top, torch.ones_like(top, dtype=probs.dtype))  # (B, T, E) 0/1
        kept = probs * chosen
        routed = kept / kept.sum(-1, keepdim=True) * k
        if hs:
            shared = (x @ self.W_shared).float().softmax(-1) * hs if hs > 1 else torch.ones(B, T, 1, device=x.device)
            mix = 2.0 * (x @ self.W_mix).float().softmax(-1)  # (B, T, 2)
            gates = torch.cat([shared * mix[..., :1], routed * mix[..., 1:]], -1)
        else:
            gates = routed
        real = (~padding_mask).float()[..., None]  # (B, T, 1)
        n = real.sum().clamp_min(1.0)
        P = (probs * real).sum((0, 1)) / n  # (E,) mean router probability
        f = (chosen * real).sum((0, 1)) / n  # (E,) fraction of tokens routed to each head
        return gates, probs.shape[-1] * (P * f).sum()

    def _entmax(self, scores: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """1.5-entmax or learned-alpha entmax of the scores over the keys not blocked, in float32: rows sum
        to 1, with exact zeros on blocked keys and on real keys below the threshold."""
        from entmax import entmax15, entmax_bisect  # the kept library (Peters et al. 2019), not a hand-written one

        s = scores.float().masked_fill(blocked, _ENTMAX_BLOCKED)
        # A diverged run's scores are NaN or inf, where entmax15's threshold search indexes out of bounds (a
        # crash, not a number): such rows go in as zeros and come out NaN, so the loss is NaN and the run is
        # recorded as diverged like any other. Blocked keys are finite (_ENTMAX_BLOCKED), so nothing else is hit.
        # Checked first, as one reduction: masking every step cost ~30% of the entmax op (measured, CPU); the
        # check reads one bool back (entmax runs train alone, outside the stacked engine's sync-free step).
        broken = None if bool(torch.isfinite(s).all()) else ~torch.isfinite(s).all(-1, keepdim=True)  # (B, H, T, 1)
        if broken is not None:
            s = s.masked_fill(broken, 0.0)
        if self.normaliser == "entmax15":
            probs = entmax15(s, dim=-1)
        else:
            alpha = 1.0 + torch.sigmoid(self.alpha_logit.float()).view(1, -1, 1, 1)  # (1, H, 1, 1) in (1, 2)
            # 30 bisection steps, not the library's 50: the threshold's bracket is at most 1 wide, so after 30
            # halvings it is below 1e-9, under float32's resolution; the last 20 cost 40% of a training step.
            probs = entmax_bisect(s, alpha, dim=-1, n_iter=30)
        probs = probs.masked_fill(blocked, 0.0)
        return probs if broken is None else probs.masked_fill(broken, math.nan)

    @property
    def alpha(self) -> torch.Tensor | None:
        """(H,) the learned entmax alpha of each head (``attention="entmax_alpha"``), else None."""
        return None if self.alpha_logit is None else 1.0 + torch.sigmoid(self.alpha_logit.detach())


class HopfieldMemory(nn.Module):
    """M learned stored patterns that every token state retrieves from (a modern Hopfield layer).

    With X (M, d) the stored patterns and xi (d,) a token's state, both layer-normalised (no affine), the
    update ``xi <- X^T softmax(beta X xi)`` is iterated from xi = LN(x) until max |change| < tol or ``steps``
    updates (unrolled: gradients flow through every update). Its fixed point is one stored pattern (large
    beta), a metastable mix of similar ones, or their mean (small beta). Returns the retrieved state projected
    back into the residual stream, and p = softmax(beta X xi) at the fixed point (B, T, M): a token's
    *attractor* is argmax p when max p > 1/2, else it is metastable.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.ln = nn.LayerNorm(d)
        self.patterns = nn.Parameter(torch.empty(cfg.hopfield_patterns, d))  # (M, d)
        self.out = nn.Linear(d, d, bias=cfg.bias)
        self.beta = cfg.hopfield_beta if cfg.hopfield_beta is not None else d**-0.5
        self.steps, self.tol = cfg.hopfield_steps, cfg.hopfield_tol

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = x.shape[-1]
        X = F.layer_norm(self.patterns, (d,))  # (M, d)
        xi = self.ln(x)  # (B, T, d)
        for _ in range(self.steps):
            new = (self.beta * xi @ X.T).softmax(-1) @ X  # (B, T, d): one update
            done = bool((new - xi).abs().max() < self.tol)  # converged: a fixed point within tol
            xi = new
            if done:
                break
        p = (self.beta * xi @ X.T).softmax(-1)  # (B, T, M) at the fixed point
        return self.out(xi), p


def attractors(p: torch.Tensor) -> torch.Tensor:
    """(B, T, M) retrieval probabilities -> (B, T) attractor ids: the dominant stored pattern, or METASTABLE."""
    top, idx = p.max(-1)
    return torch.where(top > 0.5, idx, METASTABLE)


class Block(nn.Module):
    """Pre-LN block: ``x + attn(ln(x))``, with Hopfield memory ``x + memory(x)``, then ``x + ffn(ln(x))``."""

    def __init__(self, cfg: ModelConfig, local: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, local)
        # After attention (the token has gathered its context: "who went where" is bound), before the FFN:
        # the state that retrieves is the one whose factors (entity, place, role) the attractors should separate.
        self.memory = HopfieldMemory(cfg) if cfg.hopfield_patterns and not local else None
        self.ln2 = nn.LayerNorm(cfg.d_model)
        ffn_bias = cfg.bias or cfg.no_bias == "attention"
        self.ff_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=ffn_bias)
        self.ff_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=ffn_bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor, capture: frozenset[str]) -> tuple[torch.Tensor, dict]:
        a, store = self.attn(self.ln1(x), blocked, capture)
        x = x + self.drop(a)  # (B, T, d)
        if "resid_mid" in capture:
            store["resid_mid"] = x
        if self.memory is not None:
            m, p = self.memory(x)
            x = x + self.drop(m)
            if "attractors" in capture:
                store["attractors"] = attractors(p.detach())
        elif "attractors" in capture:
            store["attractors"] = torch.full(x.shape[:2], NO_MEMORY, device=x.device)
        x = x + self.drop(self.ff_out(F.gelu(self.ff_in(self.ln2(x)))))
        return x, store


def rope_tables(max_len: int, d_head: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (max_len, d_head) for rotary embeddings; frequency ``base^(-2i/d_head)`` for pair i."""
    inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)  # (d_head/2,)
    angles = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq  # (max_len, d_head/2)
    angles = torch.cat([angles, angles], -1)  # (max_len, d_head): halves rotate together
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, d_head) queries or keys by position: pair (x_i, x_{i+d/2}) turns by angle pos * f_i,
    so ``q_s . k_t`` depends on positions only through ``s - t``."""
    x1, x2 = x.chunk(2, -1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], -1) * sin.to(x.dtype)


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """Vaswani et al. (2017) positions: ``PE[p, 2i] = sin(p / 10000^(2i/d))``, ``PE[p, 2i+1] = cos(...)``."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
    return table


class Encoder(nn.Module):
    """Token + position embeddings, ``n_layers`` pre-LN blocks, final LayerNorm, linear readout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        missing = [n for n in ("vocab_size", "n_classes") if getattr(cfg, n) is None]
        if missing:
            raise ValueError(f"ModelConfig.{' and '.join(missing)} must be set to build a model (train.run fills them from the data)")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_encoding == "rope":
            self.pos_emb = None  # positions enter inside attention
        elif cfg.pos_encoding == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(cfg.max_len, cfg.d_model))
        else:
            self.register_buffer("pos_emb", sinusoidal_table(cfg.max_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, local=i < cfg.local_layers) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), and the two projections that write into the residual stream scaled
        # by 1/sqrt(2 * n_layers) so the stream's variance does not grow with depth.
        std, resid_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if not isinstance(self.get_submodule(name.rpartition(".")[0]), nn.LayerNorm):
                    nn.init.zeros_(p)  # biases start at 0 (nn.Linear's default is uniform); LayerNorm keeps 1, 0
                continue
            is_resid_out = name.endswith(("attn.W_O", "ff_out.weight", "memory.out.weight"))
            nn.init.normal_(p, 0.0, resid_std if is_resid_out else std)
        with torch.no_grad():  # learned-alpha entmax starts at cfg.entmax_alpha: logit(alpha - 1), 0 at 1.5
            for block in self.blocks:
                if block.attn.alpha_logit is not None:
                    a = block.attn.alpha_init - 1.0
                    block.attn.alpha_logit.fill_(math.log(a / (1.0 - a)))

    def forward(
        self,
        tokens: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        capture: str | Iterable[str] | bool | None = None,
        segments: torch.Tensor | None = None,
        check: bool = True,
    ) -> EncoderOutput:
        """tokens: (B, T) int64/int32 ids; padding_mask: (B, T) bool, True on padding (None = no padding).

        ``capture``: None (fastest), one of ``"attn"``, ``"head_out"``, ``"head_contrib"``, an iterable of
        them, or True / ``"all"``. Only ``"attn"`` leaves the fused attention path.
        ``segments``: (B, T) int ids; sentence-local layers attend only between tokens with equal ids
        (data.Split.segments). Required when ``local_layers > 0``.
        ``check=False`` skips the checks that read tensor values (token ids in range, a real readout
        position), for callers that validated the batch already, e.g. under ``torch.func.vmap``, where
        Python control flow on tensor values is not allowed. Shapes and types are always checked.
        """
        names = _normalise_capture(capture)
        padding_mask = self._check_inputs(tokens, padding_mask, values=check)
        pad_blocked = padding_mask[:, None, None, :]  # (B, 1, 1, T)
        local_blocked = None
        if self.cfg.local_layers:
            if not isinstance(segments, torch.Tensor) or segments.shape != tokens.shape:
                got = tuple(segments.shape) if isinstance(segments, torch.Tensor) else type(segments).__name__
                raise ValueError(f"local_layers={self.cfg.local_layers} needs segments shaped like tokens "
                                 f"{tuple(tokens.shape)} (e.g. batch['segments']), got {got}")
            other_sentence = segments[:, :, None] != segments[:, None, :]  # (B, T, T)
            local_blocked = (other_sentence | padding_mask[:, None, :])[:, None]  # (B, 1, T, T)
        T = tokens.shape[1]
        x = self.tok_emb(tokens)  # (B, T, d)
        if self.cfg.scale_embeddings:
            x = x * math.sqrt(self.cfg.d_model)
        if self.pos_emb is not None:
            x = x + self.pos_emb[:T]
        x = self.drop(x)
        layers = []
        for i, block in enumerate(self.blocks):
            x, store = block(x, local_blocked if i < self.cfg.local_layers else pad_blocked, names)
            layers.append(store)
        x = self.ln_f(x)  # (B, T, d)
        if self.cfg.readout == "cls":
            pooled = x[:, 0]  # (B, d)
        else:
            real = (~padding_mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            pooled = (x * real).sum(1) / real.sum(1)  # every row has a real token (checked)
        balance = [store.pop("load_balance") for store in layers if "load_balance" in store]
        aux = {"load_balance": torch.stack(balance).mean()} if balance else {}
        return EncoderOutput(logits=self.head(pooled), captured=names, layers=layers, aux=aux)

    def _check_inputs(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None, values: bool = True) -> torch.Tensor:
        """Clear errors for bad batches (instead of an index error deep in torch); returns the padding mask."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            what = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (batch, length) int64 (or int32) tensor of token ids, got {what}")
        B, T = tokens.shape
        if T == 0:
            raise ValueError("tokens has length 0: every input needs at least the CLS token")
        if T > self.cfg.max_len:
            raise ValueError(f"input length {T} exceeds max_len={self.cfg.max_len}; raise model.max_len")
        if padding_mask is None:
            padding_mask = torch.zeros(B, T, dtype=torch.bool, device=tokens.device)
        elif not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool or padding_mask.shape != tokens.shape:
            what = f"{tuple(padding_mask.shape)} {padding_mask.dtype}" if isinstance(padding_mask, torch.Tensor) else type(padding_mask).__name__
            raise ValueError(f"padding_mask must be a bool tensor shaped like tokens {tuple(tokens.shape)} (True on padding), got {what}")
        if B == 0 or not values:
            return padding_mask
        V = self.cfg.vocab_size
        # The readout needs a real token to read: position 0 (the CLS token) or at least one per row.
        no_readout = padding_mask[:, 0] if self.cfg.readout == "cls" else padding_mask.all(1)
        # One combined test, so a GPU syncs once per batch; the details are worked out only on failure.
        if bool((tokens.min() < 0) | (tokens.max() >= V) | no_readout.any()):
            problems = []
            if tokens.min() < 0 or tokens.max() >= V:
                problems.append(f"token ids must be in [0, vocab_size={V}), got min {tokens.min().item()}, max {tokens.max().item()}")
            if no_readout.any():
                rows = no_readout.nonzero().flatten().tolist()
                where = "position 0 (the CLS token the readout reads)" if self.cfg.readout == "cls" else "every position"
                problems.append(f"padding_mask is True at {where} in rows {rows[:10]}{' ...' if len(rows) > 10 else ''}")
            raise ValueError("; ".join(problems))
        return padding_mask

    def per_head_weights(self, which: str) -> list[torch.Tensor]:
        """Per layer, the ``which`` in {"q", "k", "v"} projection blocks: (H, d_model, d_head)."""
        attr = {"q": "W_Q", "k": "W_K", "v": "W_V"}.get(which)
        if attr is None:
            raise ValueError(f"which={which!r} is not one of ['q', 'k', 'v']")
        return [getattr(b.attn, attr) for b in self.blocks]

    @contextmanager
    def ablate_heads(self, heads: Iterable[tuple[int, int]]) -> Iterator[Encoder]:
        """Zero the outputs ``z_h`` of the given ``(layer, head)`` pairs inside the ``with`` block (no copy).

        An ablated head contributes nothing to the residual stream (its ``head_out`` and ``head_contrib``
        read 0; its ``attn`` is still captured); ``b_O`` is kept. Blocks nest, and leaving one (also through an exception) restores exactly
        the ablation that was in force when it was entered. Gradients still flow to the other heads.
        """
        L, H = self.cfg.n_layers, self.cfg.n_heads
        pairs = []
        for item in heads:
            try:  # operator.index accepts numpy / 0-d tensor ints too, e.g. from a DataFrame column
                if any(isinstance(i, bool) for i in item):
                    raise TypeError
                layer, head = (operator.index(i) for i in item)
            except (TypeError, ValueError):
                raise ValueError(f"heads must be (layer, head) pairs of ints, got {item!r}") from None
            if not (0 <= layer < L and 0 <= head < H):
                raise ValueError(f"head ({layer}, {head}) does not exist: layers 0..{L - 1}, heads 0..{H - 1}")
            pairs.append((layer, head))
        saved = [block.attn.head_mask for block in self.blocks]
        masks: dict[int, torch.Tensor] = {}
        for layer, head in pairs:
            if layer not in masks:
                prev, W_O = saved[layer], self.blocks[layer].attn.W_O
                masks[layer] = prev.clone() if prev is not None else torch.ones(H, device=W_O.device, dtype=W_O.dtype)
            masks[layer][head] = 0.0
        for layer, mask in masks.items():
            self.blocks[layer].attn.head_mask = mask  # a new tensor: graphs that used the old one stay valid
        try:
            yield self
        finally:
            for block, prev in zip(self.blocks, saved):
                block.attn.head_mask = prev

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
