"""Training-step time of the encoder, with and without capture, against ``torch.nn.TransformerEncoder``.

One full step = forward, cross-entropy, backward, AdamW step, for the same config and batch:

* ``ours``          ``Encoder(cfg)(tokens, padding_mask)`` (fused ``scaled_dot_product_attention``)
* ``ours+capture``  the same model with ``capture=("attn", "head_out", "head_contrib")`` (explicit softmax)
* ``torch``         ``nn.TransformerEncoder`` (pre-LN, GELU, ``batch_first``, ``src_key_padding_mask``)
                    inside the same embeddings / final LayerNorm / CLS readout wrapper

The three are interleaved (a few steps of each in turn, in a rotating order) so that drift from other
processes on the machine hits all of them alike; each figure is the median over rounds. Targets on a
2-core CPU: ``ours`` within 1.15x of ``torch``, ``ours+capture`` within 1.5x.

    .venv/bin/python benchmarks/bench_model.py                    # default ModelConfig, 1 and 2 threads
    .venv/bin/python benchmarks/bench_model.py --threads 2 --batch 128 --seq-len 96 --d-model 128
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from disentangle.model import CAPTURABLE, Encoder, ModelConfig


class TorchEncoder(nn.Module):
    """The reference: ``nn.TransformerEncoder`` in the same wrapper as :class:`Encoder` (learned positions, CLS)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Parameter(torch.randn(cfg.max_len, cfg.d_model) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="gelu",
            batch_first=True, norm_first=True, bias=cfg.bias,
        )
        # enable_nested_tensor only matters for the inference fast path (and warns with norm_first).
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, norm=nn.LayerNorm(cfg.d_model), enable_nested_tensor=False)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        x = self.drop(self.tok_emb(tokens) + self.pos_emb[:T])
        x = self.encoder(x, src_key_padding_mask=padding_mask)
        return self.head(x[:, 0])


def make_batch(args: argparse.Namespace, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch: lengths uniform in [(1 - pad_frac) * T, T], the longest exactly T."""
    g = torch.Generator().manual_seed(0)
    B, T = args.batch, args.seq_len
    lo = max(2, round(T * (1 - args.pad_frac)))
    lengths = torch.randint(lo, T + 1, (B,), generator=g)
    lengths[0] = T
    padding = torch.arange(T)[None, :] >= lengths[:, None]  # (B, T) True on padding
    tokens = torch.randint(1, cfg.vocab_size, (B, T), generator=g).masked_fill(padding, 0)
    answers = torch.randint(0, cfg.n_classes, (B,), generator=g)
    return tokens, padding, answers


def step_fn(model: nn.Module, forward: Callable[[], torch.Tensor], answers: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(), answers)
        loss.backward()
        opt.step()

    return step


def bench(args: argparse.Namespace, threads: int) -> dict[str, list[float]]:
    torch.set_num_threads(threads)
    cfg = ModelConfig(
        vocab_size=args.vocab, n_classes=args.n_classes, d_model=args.d_model, n_heads=args.n_heads,
        n_layers=args.n_layers, d_ff=args.d_ff, dropout=args.dropout, max_len=max(128, args.seq_len),
        local_layers=0,  # like for like: nn.TransformerEncoder has no sentence-local layer
    )
    tokens, padding, answers = make_batch(args, cfg)
    segments = ((torch.arange(args.seq_len) + 5) // 6).expand_as(tokens).clone()  # 6-token "sentences"
    torch.manual_seed(0)
    ours = Encoder(cfg)
    torch.manual_seed(0)
    local = Encoder(cfg.replace(local_layers=1))
    torch.manual_seed(0)
    ref = TorchEncoder(cfg)
    steps = {
        "ours": step_fn(ours, lambda: ours(tokens, padding).logits, answers),
        "ours+capture": step_fn(ours, lambda: ours(tokens, padding, capture=CAPTURABLE).logits, answers),
        "torch": step_fn(ref, lambda: ref(tokens, padding), answers),
        # the project's default: the first layer attends within sentences (a (B, 1, T, T) mask)
        "ours-local": step_fn(local, lambda: local(tokens, padding, segments=segments).logits, answers),
    }
    names = list(steps)
    for name in names:  # warm-up: allocator, kernel selection, AdamW state
        for _ in range(args.warmup):
            steps[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ModelConfig()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=48, help="T, the longest sequence in the batch")
    p.add_argument("--pad-frac", type=float, default=0.4, help="sequence lengths drawn from [(1-f)T, T]")
    p.add_argument("--vocab", type=int, default=80)
    p.add_argument("--n-classes", type=int, default=40)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--n-heads", type=int, default=d.n_heads)
    p.add_argument("--n-layers", type=int, default=d.n_layers)
    p.add_argument("--d-ff", type=int, default=d.d_ff)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--threads", default="1,2", help="comma-separated torch.set_num_threads values")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per variant")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds; the figure is the median")
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    args = p.parse_args()

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} (other processes skew the figures: compare p25-p75 spreads)")
    print(f"batch {args.batch}x{args.seq_len} (pad up to {args.pad_frac:.0%}), d_model {args.d_model}, "
          f"{args.n_heads} heads, {args.n_layers} layers, d_ff {args.d_ff}, vocab {args.vocab}, {args.n_classes} classes")
    print(f"training step = forward + cross-entropy + backward + AdamW; median of {args.rounds} interleaved "
          f"rounds of {args.steps} steps (p25-p75 in brackets)\n")
    print(f"{'threads':>7}  {'variant':<13} {'ms/step':>8}  {'[p25 - p75]':<15} {'vs torch':>8}  target")
    targets = {"ours": 1.15, "ours+capture": 1.5}
    for threads in (int(t) for t in args.threads.split(",")):
        times = bench(args, threads)
        med = {n: statistics.median(v) for n, v in times.items()}
        for name, v in times.items():
            q = statistics.quantiles(v, n=4)
            ratio = med[name] / med["torch"]
            target = targets.get(name)
            verdict = "" if target is None else f"<= {target:.2f}x {'ok' if ratio <= target else 'MISSED'}"
            print(f"{threads:>7}  {name:<13} {med[name]:8.2f}  [{q[0]:5.2f} - {q[2]:5.2f}]   {ratio:7.2f}x  {verdict}")
        print(f"{'':>7}  (load average now {os.getloadavg()[0]:.2f})\n")


if __name__ == "__main__":
    main()
