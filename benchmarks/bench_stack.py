"""Is a stack of runs cheaper than the same runs one at a time? The first question of a stacked engine.

R runs of one shape (the default profile's model and batch), one training step each (forward, cross-
entropy, backward), three ways, side by side in one invocation:

* ``one at a time``     R separate ``Encoder`` models, one after another (today's engine, per process)
* ``vmap``              the R models' parameters stacked (``torch.func.stack_module_state``) and one
                        ``vmap(functional_call)`` of the single-run ``Encoder`` over runs and their batches
* ``one model, R×B``    a single model on the R batches concatenated: the practical ceiling of stacking
                        (same FLOPs, no per-run weights)

Printed as ms per step for all R runs and the ratio against one at a time (> 1 = faster). The three
are interleaved in rounds, medians over rounds, so drift from other processes hits all alike.

    .venv/bin/python benchmarks/bench_stack.py                 # R = 8, one thread
    .venv/bin/python benchmarks/bench_stack.py --runs 16 --threads 2 --capture
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from disentangle.model import Encoder, ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--capture", action="store_true", help="capture attention (the explicit path the entropy constraint uses)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    R, B, T = args.runs, args.batch, args.seq_len
    cfg = ModelConfig(vocab_size=60, n_classes=20, max_len=max(64, T))  # the default profile's sizes
    capture = "attn" if args.capture else None
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 60, (R, B, T), generator=g)
    pad = torch.arange(T)[None, None, :] >= torch.randint(T // 2, T + 1, (R, B, 1), generator=g)
    tokens = tokens.masked_fill(pad, 0)
    segments = (torch.arange(T) // 6)[None, None].expand(R, B, T).contiguous()  # six-token sentences
    answers = torch.randint(0, 20, (R, B), generator=g)

    models = [Encoder(cfg) for _ in range(R)]
    params, buffers = stack_module_state(models)  # leaves shaped [R, ...], requires_grad
    skeleton = copy.deepcopy(models[0]).to("meta")
    big = Encoder(cfg)

    def one_run_loss(p, b, tok, pm, seg, ans):
        out = functional_call(skeleton, (p, b), (tok, pm), {"segments": seg, "capture": capture, "check": False})
        return F.cross_entropy(out.logits, ans)

    def one_at_a_time() -> None:
        for r, m in enumerate(models):
            out = m(tokens[r], pad[r], capture=capture, segments=segments[r])
            F.cross_entropy(out.logits, answers[r]).backward()
        for m in models:
            m.zero_grad(set_to_none=True)

    def stacked() -> None:
        vmap(one_run_loss)(params, buffers, tokens, pad, segments, answers).sum().backward()
        for p in params.values():
            p.grad = None

    def ceiling() -> None:
        out = big(tokens.view(R * B, T), pad.view(R * B, T), capture=capture, segments=segments.view(R * B, T))
        F.cross_entropy(out.logits, answers.view(-1)).backward()
        big.zero_grad(set_to_none=True)

    fns = {"one at a time": one_at_a_time, "vmap": stacked, "one model, R×B": ceiling}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(args.rounds):
        order = list(fns)[i % 3:] + list(fns)[: i % 3]
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"R={R} runs, batch {B}, T={T}, d_model {cfg.d_model}, {'attention captured' if capture else 'fused attention'}")
    ref = statistics.median(times["one at a time"])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:<16} {m * 1e3:8.1f} ms per step of {R} runs   {ref / m:5.2f}x")


if __name__ == "__main__":
    main()
