"""A small pre-LayerNorm Transformer encoder whose heads can be inspected, constrained and ablated.

Read top to bottom: the config, the attention layer (per-head weights shaped like TransformerLens,
``W_Q: [n_heads, d_model, d_head]``), the block, the encoder, and the output object.

Contract (see ``shared/DESIGN.md``)::

    out = model(tokens, padding_mask, capture=("attn", "head_out", "head_contrib"))
    out.logits            # (B, n_classes)
    out.attn[l]           # (B, H, T, T) attention probabilities of layer l, before dropout
    out.head_out[l]       # (B, H, T, d_head) per-head outputs before the output projection
    out.head_contrib[l]   # (B, H, T, d_model) per-head contributions to the residual stream

With nothing captured, attention runs through ``F.scaled_dot_product_attention`` (fused kernels).
Only ``"attn"`` needs the explicit softmax path: per-head outputs and contributions come out of the
fused path too. Reading something that was not captured raises :class:`NotCapturedError`; it is never
a silent ``None``.

``padding_mask`` is ``(B, T)`` bool, True on padding. No query attends to a padding key. Padding
*queries* still produce (meaningless) rows; everything downstream masks them out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .schema import Config, at_least, one_of, positive

CAPTURABLE = ("attn", "head_out", "head_contrib")


@dataclass(frozen=True)
class ModelConfig(Config):
    vocab_size: int | None = None  # input tokens; None = filled in from the data by train.run
    n_classes: int | None = None  # answer classes; None = filled in from the data by train.run
    d_model: int = 64  # residual stream width
    n_heads: int = 4  # heads per layer: the units the constraints act on
    n_layers: int = 2  # bAbI-style lookups need 2 hops (find the sentence, read its argument)
    d_ff: int = 128  # FFN hidden width, the first capacity axis the study scales
    dropout: float = 0.0  # small models on synthetic data rarely need it; attention is captured before it
    max_len: int = 128  # longest input the position table covers (CLS + story + SEP + question + SEP)
    pos_encoding: str = "learned"  # "learned" or "sinusoidal" (the latter extrapolates to longer OOD stories)
    readout: str = "cls"  # "cls": classify from the CLS token; "mean": from the mean over real tokens
    bias: bool = True  # biases in attention and FFN projections

    def problems(self) -> list[str]:
        p: list[str] = []
        for name in ("vocab_size", "n_classes"):
            value = getattr(self, name)
            if value is not None:
                p += at_least(name, value, 1)
        for name in ("d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            p += positive(name, getattr(self, name))
        if self.d_model > 0 and self.n_heads > 0 and self.d_model % self.n_heads:
            p.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout={self.dropout} must be in [0, 1)")
        p += one_of("pos_encoding", self.pos_encoding, ("learned", "sinusoidal"))
        p += one_of("readout", self.readout, ("cls", "mean"))
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

    def _get(self, name: str) -> list[torch.Tensor]:
        if name not in self.captured:
            raise NotCapturedError(
                f"{name!r} was not captured; call model(tokens, padding_mask, capture={name!r}) "
                f"(captured here: {sorted(self.captured) or 'nothing'})"
            )
        return [layer[name] for layer in self.layers]

    @property
    def attn(self) -> list[torch.Tensor]:
        """Per layer: attention probabilities (B, H, T, T), rows = queries, before dropout."""
        return self._get("attn")

    @property
    def head_out(self) -> list[torch.Tensor]:
        """Per layer: per-head outputs before the output projection (B, H, T, d_head)."""
        return self._get("head_out")

    @property
    def head_contrib(self) -> list[torch.Tensor]:
        """Per layer: each head's contribution to the residual stream (B, H, T, d_model)."""
        return self._get("head_contrib")


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
    """Multi-head self-attention with per-head parameters ``[n_heads, d_model, d_head]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.n_heads, self.d_head, self.dropout = H, dh, cfg.dropout
        self.W_Q = nn.Parameter(torch.empty(H, d, dh))
        self.W_K = nn.Parameter(torch.empty(H, d, dh))
        self.W_V = nn.Parameter(torch.empty(H, d, dh))
        self.W_O = nn.Parameter(torch.empty(H, dh, d))
        self.b_QKV = nn.Parameter(torch.zeros(3, H, dh)) if cfg.bias else None
        self.b_O = nn.Parameter(torch.zeros(d)) if cfg.bias else None
        # Multiplies each head's output; only applied while heads are ablated, so it costs nothing otherwise.
        self.register_buffer("head_mask", torch.ones(H), persistent=False)
        self.ablating = False

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor, capture: frozenset[str]) -> tuple[torch.Tensor, dict]:
        B, T, d = x.shape
        H, dh = self.n_heads, self.d_head
        # One fused matmul for Q, K and V of all heads; the per-head layout is a free view of it.
        W = torch.cat([self.W_Q, self.W_K, self.W_V], 0).permute(1, 0, 2).reshape(d, 3 * H * dh)
        flat = x.reshape(B * T, d)
        qkv = flat @ W if self.b_QKV is None else torch.addmm(self.b_QKV.reshape(-1), flat, W)
        q, k, v = qkv.view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, dh)
        keep = ~key_padding[:, None, None, :]  # (B, 1, 1, T): True where the key is a real token
        store: dict[str, torch.Tensor] = {}
        p_drop = self.dropout if self.training else 0.0
        if "attn" in capture:
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)  # (B, H, T, T)
            probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
            store["attn"] = probs
            z = F.dropout(probs, p_drop, self.training) @ v  # (B, H, T, dh)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p_drop)  # (B, H, T, dh)
        if self.ablating:
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


class Block(nn.Module):
    """Pre-LN block: ``x + attn(ln(x))`` then ``x + ffn(ln(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.ff_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor, capture: frozenset[str]) -> tuple[torch.Tensor, dict]:
        a, store = self.attn(self.ln1(x), key_padding, capture)
        x = x + self.drop(a)  # (B, T, d)
        x = x + self.drop(self.ff_out(F.gelu(self.ff_in(self.ln2(x)))))
        return x, store


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
        if cfg.pos_encoding == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(cfg.max_len, cfg.d_model))
        else:
            self.register_buffer("pos_emb", sinusoidal_table(cfg.max_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 style: N(0, 0.02), and the two projections that write into the residual stream scaled
        # by 1/sqrt(2 * n_layers) so the stream's variance does not grow with depth.
        std, resid_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # biases start at 0, LayerNorm gains at 1
            is_resid_out = name.endswith("attn.W_O") or name.endswith("ff_out.weight")
            nn.init.normal_(p, 0.0, resid_std if is_resid_out else std)

    def forward(
        self,
        tokens: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        capture: str | Iterable[str] | bool | None = None,
    ) -> EncoderOutput:
        """tokens: (B, T) long; padding_mask: (B, T) bool, True on padding (None = no padding)."""
        B, T = tokens.shape
        if T > self.cfg.max_len:
            raise ValueError(f"input length {T} exceeds max_len={self.cfg.max_len}; raise model.max_len")
        names = _normalise_capture(capture)
        if padding_mask is None:
            padding_mask = torch.zeros(B, T, dtype=torch.bool, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb[:T])  # (B, T, d)
        layers = []
        for block in self.blocks:
            x, store = block(x, padding_mask, names)
            layers.append(store)
        x = self.ln_f(x)  # (B, T, d)
        if self.cfg.readout == "cls":
            pooled = x[:, 0]  # (B, d)
        else:
            real = (~padding_mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            pooled = (x * real).sum(1) / real.sum(1).clamp_min(1.0)
        return EncoderOutput(logits=self.head(pooled), captured=names, layers=layers)

    def per_head_weights(self, which: str) -> list[torch.Tensor]:
        """Per layer, the ``which`` in {"q", "k", "v"} projection blocks: (H, d_model, d_head)."""
        attr = {"q": "W_Q", "k": "W_K", "v": "W_V"}.get(which)
        if attr is None:
            raise ValueError(f"which={which!r} is not one of ['q', 'k', 'v']")
        return [getattr(b.attn, attr) for b in self.blocks]

    @contextmanager
    def ablate_heads(self, heads: Iterable[tuple[int, int]]) -> Iterator[Encoder]:
        """Zero the outputs of the given ``(layer, head)`` pairs inside the ``with`` block (no copy)."""
        heads = list(heads)
        for layer, head in heads:
            if not (0 <= layer < self.cfg.n_layers and 0 <= head < self.cfg.n_heads):
                raise ValueError(f"head ({layer}, {head}) does not exist: layers 0..{self.cfg.n_layers - 1}, heads 0..{self.cfg.n_heads - 1}")
        for layer, head in heads:
            attn = self.blocks[layer].attn
            attn.head_mask[head] = 0.0
            attn.ablating = True
        try:
            yield self
        finally:
            for block in self.blocks:
                block.attn.head_mask.fill_(1.0)
                block.attn.ablating = False

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
