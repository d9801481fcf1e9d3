"""Cost of each head constraint: ms per full training step, against two baselines.

One step = forward, cross-entropy + weighted constraint, backward, AdamW step (and CLUB's q step for
the ``club`` variant), for the default-size encoder (ModelConfig defaults, vocab 80, 40 classes) on a
batch of 64 sequences of 48 positions with 0-24 positions of padding each.

Configurations: no capture and no constraint (the fused attention path); capture everything and no
constraint (the baseline each constraint is judged against: capturing ``attn`` alone forces the explicit
attention path); and each constraint / variant alone at weight 0.1, capturing only what it declares.
Target: every constraint within 1.3x of the capture-enabled baseline.

Timing: warm-up steps, then ``--repeats`` rounds; in each round every configuration runs ``--steps``
steps in turn (round-robin, so that a burst of load from other processes hits all of them alike); the
figure is the median over rounds of ms/step. Run::

    .venv/bin/python benchmarks/bench_constraints.py            # 1 and 2 intra-op threads
    .venv/bin/python benchmarks/bench_constraints.py --threads 1 --repeats 11
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from disentangle.config import ConstraintConfig
from disentangle.constraints import MEASURE_CAPTURES
from disentangle.objective import Constraints
from disentangle.model import Encoder, ModelConfig

VARIANTS: dict[str, dict] = {
    "orthogonality/outputs": {"orthogonality": 0.1, "orthogonality_variant": "outputs"},
    "orthogonality/weights": {"orthogonality": 0.1, "orthogonality_variant": "weights"},
    "orthogonality/attention": {"orthogonality": 0.1, "orthogonality_variant": "attention"},
    "mi/infonce": {"mutual_information": 0.1, "mi_variant": "infonce"},
    "mi/club": {"mutual_information": 0.1, "mi_variant": "club"},
    "attention_entropy": {"attention_entropy": 0.1},
    "head_usage": {"head_usage": 0.1},
}


@dataclass
class Setup:
    name: str
    model: Encoder
    optimizer: torch.optim.Optimizer
    constraints: Constraints
    capture: frozenset[str]


def make_batch(batch: int, length: int, vocab: int, n_classes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    return {
        "tokens": torch.randint(0, vocab, (batch, length), generator=g),
        "padding_mask": torch.arange(length)[None, :] >= lengths[:, None],
        "answers": torch.randint(0, n_classes, (batch,), generator=g),
        # sentence-like segments of 6 tokens after the CLS token, for the sentence-local first layer
        "segments": ((torch.arange(length) + 5) // 6).expand(batch, length).clone(),
    }


def make_setups(model_cfg: ModelConfig) -> list[Setup]:
    torch.manual_seed(0)
    base = Encoder(model_cfg)

    def setup(name: str, cfg: ConstraintConfig, capture: frozenset[str] | None = None) -> Setup:
        model = copy.deepcopy(base)
        constraints = Constraints(cfg, model_cfg)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return Setup(name, model, optimizer, constraints, constraints.captures if capture is None else capture)

    return [
        setup("no capture, no constraint", ConstraintConfig()),
        setup("capture all, no constraint", ConstraintConfig(), frozenset(MEASURE_CAPTURES)),
        *(setup(name, ConstraintConfig(**overrides)) for name, overrides in VARIANTS.items()),
    ]


def train_step(s: Setup, b: dict[str, torch.Tensor]) -> None:
    s.optimizer.zero_grad(set_to_none=True)
    out = s.model(b["tokens"], b["padding_mask"], capture=s.capture, segments=b["segments"])
    penalty, _ = s.constraints.loss(out, b["padding_mask"], s.model)
    (F.cross_entropy(out.logits, b["answers"]) + penalty).backward()
    s.optimizer.step()
    s.constraints.auxiliary_step(out, b["padding_mask"])


def bench(setups: list[Setup], b: dict[str, torch.Tensor], warmup: int, repeats: int, steps: int) -> dict[str, float]:
    """Median over rounds of ms/step, per setup (round-robin within each round)."""
    for s in setups:
        for _ in range(warmup):
            train_step(s, b)
    rounds: dict[str, list[float]] = {s.name: [] for s in setups}
    for _ in range(repeats):
        for s in setups:
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(s, b)
            rounds[s.name].append((time.perf_counter() - t0) / steps * 1e3)
    return {name: statistics.median(ms) for name, ms in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op thread counts to report (default: 1 2)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=48, help="padded sequence length T")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (the median is reported)")
    parser.add_argument("--steps", type=int, default=5, help="steps per configuration per round")
    args = parser.parse_args()

    model_cfg = ModelConfig(vocab_size=80, n_classes=40)
    b = make_batch(args.batch, args.length, model_cfg.vocab_size, model_cfg.n_classes, seed=0)
    n_pad = int(b["padding_mask"].sum())
    print(f"model: {model_cfg.to_dict()}")
    padding_share = n_pad / b["padding_mask"].numel()
    print(f"batch {args.batch} x T={args.length}, {padding_share:.0%} padding; torch {torch.__version__}")
    print(f"median over {args.repeats} rounds of {args.steps} steps, after {args.warmup} warm-up steps\n")
    for threads in args.threads:
        torch.set_num_threads(threads)
        setups = make_setups(model_cfg)
        ms = bench(setups, b, args.warmup, args.repeats, args.steps)
        plain, captured = ms[setups[0].name], ms[setups[1].name]
        print(f"threads={threads}")
        print(f"  {'configuration':28s} {'captures':24s} {'ms/step':>8s} {'vs plain':>9s} {'vs capture':>11s}")
        for s in setups:
            ratio = ms[s.name] / captured
            flag = "" if s.name.startswith(("no capture", "capture all")) or ratio <= 1.3 else "  > 1.3x"
            print(f"  {s.name:28s} {','.join(sorted(s.capture)) or '-':24s} {ms[s.name]:8.1f} "
                  f"{ms[s.name] / plain:8.2f}x {ratio:10.2f}x{flag}")
        print()


if __name__ == "__main__":
    main()
