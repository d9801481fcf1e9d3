"""Runs per hour of the default profile's sweep grid: one run per work item (before stacking) vs the stacked
engine, side by side in one invocation, on this machine's cores.

The grid is the default profile's (params/default.yaml): baseline + all four constraints at their three weights,
three seeds (39 runs, the 02-05 sections), each cut to ``--steps`` steps with the profile's evaluations per
run (steps / eval_every) kept, so a run's mix of training and evaluation is the profile's. Runs per hour
are projected to the profile's step count: (runs × steps) / wall / profile steps × 3600. Each engine trains
the grid from an empty cache in its own temporary folder, ``n_jobs`` worker processes each (default: one per
core), workers started before the clock starts; the engines alternate over ``--rounds``, medians printed.

    .venv/bin/python benchmarks/bench_grid.py                   # 200 steps a run, 1 round
    .venv/bin/python benchmarks/bench_grid.py --steps 400 --rounds 3 --step-level

``--gpu-projection R``: without a device, the full profile's step (solo and a stack of R) projected to a GPU from
its operator count and FLOPs measured here. ``--skip-grid``: only the step-level figures.

``--step-level``: samples per second per core of one stacked step (R runs of the default model) against
the same samples through one model at batch R x B (the practical ceiling of stacking) and R solo steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# What the stacked engine captures (disentangle.stack._Objective): the explicit attention path, which vmap batches.
CAPTURE = os.environ.get("BENCH_CAPTURE", "attn") or None
sys.path.insert(0, str(REPO / "lib"))

from disentangle.config import RunConfig, run_hash  # noqa: E402
from disentangle.study import Study  # noqa: E402
from disentangle.train import _worker_pool, load_data, run_grid  # noqa: E402


def _study(common: dict, steps: int) -> tuple[Study, int]:
    """The default profile's study with its runs cut to ``steps`` steps, evaluations per run kept."""
    train = dict(common["train"])
    profile_steps = train["steps"]
    evals = max(1, profile_steps // train["eval_every"])
    train.update(steps=steps, eval_every=max(1, steps // evals), warmup_steps=min(train["warmup_steps"], steps // 4))
    return Study.from_parameters(model=common["model"], data=common["data"], train=train, seeds=common["seeds"],
                                 sweep_weights=common["sweep_weights"], variants=common["variants"]), profile_steps


def sweep_grid(steps: int) -> tuple[list[RunConfig], int]:
    study, profile_steps = _study(yaml.safe_load((REPO / "params" / "default.yaml").read_text())["common"], steps)
    configs = [c for name in study.sweep_weights for c in study.sweep_configs(name)]
    return list({run_hash(c): c for c in configs}.values()), profile_steps  # the baseline is in every sweep


def capacity_grid(steps: int, arm: str) -> tuple[list[RunConfig], int]:
    """Section 06's grown runs: the baseline and ``arm`` at the top of its sweep, every seed, at each
    non-default size of every axis (the default size's runs are the sweeps' own)."""
    profile = yaml.safe_load((REPO / "params" / "default.yaml").read_text())["common"]
    study, profile_steps = _study(profile, steps)
    weight = max(profile["sweep_weights"][arm])
    configs = [study.config(name, w, s, **{axis: size})
               for axis, sizes in profile["axes"].items() for size in sizes
               if size != study.base.to_dict()["model"][axis.split(".", 1)[1]]
               for name, w in (("baseline", 0.0), (arm, weight)) for s in study.seeds]
    return configs, profile_steps


def grid_wall(configs, stacked: bool, n_jobs: int, data_cache: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        (cache / "data").symlink_to(data_cache / "data")  # the data is built once, outside the clock
        t = time.perf_counter()
        runs, _ = run_grid(configs, cache, n_jobs=n_jobs, progress=False, stacked=stacked)
        wall = time.perf_counter() - t
        bad = runs[runs["status"] != "finished"]
        if len(bad):
            raise SystemExit(f"{len(bad)} runs did not finish: {bad[['run_id', 'status', 'error']].to_string()}")
        return wall


def step_level(R: int, threads: int, rounds: int) -> None:
    """One training step (forward, CE, backward, no optimiser) of R default-size runs three ways."""
    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap

    from disentangle.model import Encoder, ModelConfig

    torch.set_num_threads(threads)
    B, T = 16, 40
    cfg = ModelConfig(vocab_size=60, n_classes=20)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 60, (R, B, T), generator=g)
    pad = torch.arange(T)[None, None, :] >= torch.randint(T // 2, T + 1, (R, B, 1), generator=g)
    tokens = tokens.masked_fill(pad, 0)
    seg = (torch.arange(T) // 6)[None, None].expand(R, B, T).contiguous()
    ans = torch.randint(0, 20, (R, B), generator=g)
    models = [Encoder(cfg) for _ in range(R)]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    big = Encoder(cfg)

    def one(p, b, t, m, s, a):
        return F.cross_entropy(functional_call(skeleton, (p, b), (t, m), {"segments": s, "check": False, "capture": CAPTURE}).logits, a)

    loss = vmap(one)

    def solo():
        for r, m in enumerate(models):
            F.cross_entropy(m(tokens[r], pad[r], segments=seg[r], check=False).logits, ans[r]).backward()

    def stacked():
        loss(params, buffers, tokens, pad, seg, ans).sum().backward()

    def ceiling():
        out = big(tokens.view(R * B, T), pad.view(R * B, T), segments=seg.view(R * B, T), check=False)
        F.cross_entropy(out.logits, ans.view(-1)).backward()

    fns = {"R solo steps": solo, "stacked step": stacked, "one model, batch R x B": ceiling}
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for i in range(rounds * 3):
        for k in list(fns)[i % 3:] + list(fns)[:i % 3]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    print(f"\nstep level: R={R} runs x batch {B}, T={T}, default model, {threads} thread(s), forward + backward")
    ceil = statistics.median(times["one model, batch R x B"])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:<24} {R * B / m / threads:9.0f} samples/s/core   {ceil / m:5.2f} of the ceiling")


NO_KERNEL = {f"aten::{n}" for n in (
    "view", "as_strided", "resolve_conj", "resolve_neg", "empty", "empty_strided", "_unsafe_view", "_reshape_alias", "t",
    "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select", "alias", "detach", "unbind", "split",
    "chunk", "reshape", "lift_fresh", "to", "result_type")}


def gpu_projection(R: int, launch_us: float, tflops: float) -> None:
    """Without a GPU: the full profile's step, solo and stacked, projected from what this CPU counts of it.

    One training step (forward, loss, backward) of the full profile's model (d_model 128, 3 layers, d_ff 256,
    batch 64, 64 tokens) is profiled here: its aten operators (each at least one kernel launch on a GPU) and
    its FLOPs (the profiler's count of the matmuls). A GPU step then costs at least max(launches x
    ``launch_us``, FLOPs / ``tflops``): launch-bound for one small run, compute-bound for a big enough stack.
    """
    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap
    from torch.profiler import ProfilerActivity, profile

    from disentangle.model import Encoder, ModelConfig

    B, T = 64, 64
    cfg = ModelConfig(vocab_size=80, n_classes=40, d_model=128, n_layers=3, d_ff=256, max_len=160)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 80, (R, B, T), generator=g)
    pad = torch.zeros(R, B, T, dtype=torch.bool)
    seg = (torch.arange(T) // 8)[None, None].expand(R, B, T).contiguous()
    ans = torch.randint(0, 40, (R, B), generator=g)
    models = [Encoder(cfg) for _ in range(R)]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")

    def one(p, b, t, m, s, a):
        return F.cross_entropy(functional_call(skeleton, (p, b), (t, m), {"segments": s, "check": False, "capture": CAPTURE}).logits, a)

    def solo():  # fused attention, as a solo run without constraints trains
        F.cross_entropy(models[0](tokens[0], pad[0], segments=seg[0], check=False).logits, ans[0]).backward()

    def stacked():
        vmap(one)(params, buffers, tokens, pad, seg, ans).sum().backward()

    counts = {}
    for name, fn in (("solo", solo), ("stacked", stacked)):
        fn()
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            fn()
        events = [e for e in prof.events() if e.name.startswith("aten::")]
        # Leaf operators that run a kernel: views, reshapes and allocations launch nothing.
        leaves = [e for e in events if not any(c.name.startswith("aten::") for c in e.cpu_children) and e.name not in NO_KERNEL]
        counts[name] = (len(leaves), sum(e.flops or 0 for e in events if e.flops))
    print(f"\nGPU projection (no device here): full-profile model, batch {B}, T={T}, forward + backward; "
          f"a launch >= {launch_us:g} us, {tflops:g} TFLOP/s sustained")
    run_steps = 400 * 30000  # the full profile: about 400 runs of 20,000-30,000 steps (the stacked engine's issue)
    ref = None
    for name, (launches, flops) in counts.items():
        runs = 1 if name == "solo" else R
        step = max(launches * launch_us * 1e-6, flops / (tflops * 1e12))
        per_hour = runs / step * 3600 / 30000
        ref = ref or per_hour
        print(f"  {name:<8} R={runs:<4} {launches:6d} launches  {flops / 1e9:8.2f} GFLOP  step >= {step * 1e3:7.2f} ms  "
              f"{per_hour:8.1f} runs/hour  {per_hour / ref:6.1f}x   full profile >= {run_steps / runs * step / 3600:6.2f} h")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="steps per run (the profile's evaluations per run are kept)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--n-jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--step-level", action="store_true")
    ap.add_argument("--gpu-projection", type=int, default=0, metavar="R", help="project the full profile on a GPU from a stack of R")
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--grid", choices=("sweep", "capacity"), default="sweep",
                    help="sweep: 02-05's grid; capacity: 06's grown runs (baseline and --arm at each non-default size)")
    ap.add_argument("--arm", default="head_usage", help="the grown constraint of --grid capacity")
    args = ap.parse_args()
    if args.gpu_projection:
        gpu_projection(args.gpu_projection, launch_us=8.0, tflops=100.0)
    if args.skip_grid:
        if args.step_level:
            step_level(8, 1, 5)
        return
    configs, profile_steps = sweep_grid(args.steps) if args.grid == "sweep" else capacity_grid(args.steps, args.arm)
    with tempfile.TemporaryDirectory() as tmp:
        data_cache = Path(tmp)
        load_data(configs[0].data, data_cache)
        if args.n_jobs > 1:  # start the workers (interpreters importing torch) outside the clock
            pool = _worker_pool(args.n_jobs)
            list(pool.map(abs, range(args.n_jobs)))
        walls: dict[str, list[float]] = {"one run at a time": [], "stacked": []}
        for i in range(args.rounds):
            for name in (list(walls) if i % 2 == 0 else list(walls)[::-1]):
                walls[name].append(grid_wall(configs, name == "stacked", args.n_jobs, data_cache))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"default {args.grid} grid: {len(configs)} runs x {args.steps} steps, {args.n_jobs} worker(s), 1 thread each, "
          f"{args.rounds} round(s); runs per hour projected to {profile_steps} steps a run")
    ref = statistics.median(walls["one run at a time"])
    for name, w in walls.items():
        m = statistics.median(w)
        per_hour = len(configs) * args.steps / m / profile_steps * 3600
        line = f"{name}: {ref / m:.2f}x" if name == "stacked" else f"{name}:"
        print(f"  {line:<22} {m:7.1f} s   {per_hour:6.1f} runs/hour")
    if args.step_level:
        step_level(8, 1, 5)


if __name__ == "__main__":
    main()
