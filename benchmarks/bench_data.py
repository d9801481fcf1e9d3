"""Data throughput: procedural generation (stories per second per task, and examples per second for the
whole ``generate``), input lengths and answer shares, and the time to parse every bAbI file of a directory.
The default DataConfig trains only the two lookup tasks, so ``generate`` is timed for it and for the world of
params/full.yaml (all six procedural tasks, longer stories, a distractor) at the default split sizes.

    python benchmarks/bench_data.py [BABI_DIR]    # default: ../shared/data/babi/en next to the repository
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path
from time import perf_counter

import yaml

from disentangle.data.babi import read_file
from disentangle.config import DataConfig
from disentangle.data.procedural import generate, make_story

REPO = Path(__file__).resolve().parents[1]


def bench_tasks(cfg: DataConfig, per_task: int) -> None:
    print(f"make_story, {per_task} stories per task:")
    total, elapsed = 0, 0.0
    for task in cfg.tasks:
        rng = random.Random(task)
        start = perf_counter()
        for _ in range(per_task):
            make_story(task, rng, cfg)
        dt = perf_counter() - start
        total, elapsed = total + per_task, elapsed + dt
        print(f"  {task:<13} {per_task / dt:8.0f} stories/s")
    print(f"  {'all tasks':<13} {total / elapsed:8.0f} stories/s")


def bench_generate(cfg: DataConfig, label: str, details: bool) -> None:
    start = perf_counter()
    data = generate(cfg)
    dt = perf_counter() - start
    n = sum(len(s) for s in data.splits.values())
    print(f"\ngenerate({label}): {n} examples (4 splits, encoded and padded) in {dt:.2f} s = {n / dt:.0f} examples/s")
    if not details:
        return
    for split in data.splits:
        tokens, sentences = data.info["tokens"][split], data.info["sentences"][split]
        print(f"  {split:<5} tokens/input {tokens}  sentences/story {sentences}")
    lengths = Counter(10 * (n // 10) for n in (~data.splits["train"].padding_mask).sum(1).tolist())
    shares = "  ".join(f"{k}-{k + 9}: {v / len(data.splits['train']):.0%}" for k, v in sorted(lengths.items()))
    print(f"  train input lengths: {shares}")
    print("  answer shares (train):")
    for task, counts in data.info["answers"]["train"].items():
        total = sum(counts.values())
        print(f"    {task:<13} " + ", ".join(f"{a} {c / total:.0%}" for a, c in counts.items()))
    print(f"  majority-class chance (test): { {t: round(c, 3) for t, c in data.chance('test').items()} }")


def bench_babi(directory: Path) -> None:
    files = sorted(directory.glob("qa*_*.txt"))
    if not files:
        print(f"\nno bAbI files in {directory}")
        return
    start = perf_counter()
    questions = sum(len(read_file(f)) for f in files)
    dt = perf_counter() - start
    print(f"\nbAbI parse: {len(files)} files, {questions} questions from {directory} in {dt:.2f} s ({questions / dt:.0f} questions/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("babi_dir", nargs="?", type=Path, default=REPO.parent / "shared" / "data" / "babi" / "en")
    parser.add_argument("--per-task", type=int, default=2000, help="stories per task for the make_story timing")
    args = parser.parse_args()
    cfg = DataConfig()
    # the full profile's world, with the default split sizes so both timings generate comparable amounts
    sizes = {f: getattr(cfg, f) for f in ("n_train", "n_val", "n_test", "n_ood")}
    world = yaml.safe_load((REPO / "params" / "full.yaml").read_text())["common"]["data"]
    full = DataConfig(**{**world, "tasks": tuple(world["tasks"]), **sizes})
    bench_tasks(full, args.per_task)
    bench_generate(cfg, "DataConfig(), the two lookup tasks", details=True)
    bench_generate(full, f"params/full.yaml world, {len(full.tasks)} tasks, default split sizes", details=False)
    bench_babi(args.babi_dir)


if __name__ == "__main__":
    main()
