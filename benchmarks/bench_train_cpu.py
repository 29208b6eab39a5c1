"""CPU training speed of the ``small`` preset: 10 members stacked vs one at a time (random data).

Example (2 cores, nothing else running), fp32 and bf16 autocast:

    nice python benchmarks/bench_train_cpu.py --threads 2 --steps 60
    nice python benchmarks/bench_train_cpu.py --threads 2 --steps 60 --set dtype=bfloat16

Prints member-frames per second (frames x members trained per second) for both modes and the time
that ten members would need for a given number of epochs over a corpus of ``--corpus-frames``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from asr.frames import FrameData, iterate_batches  # noqa: E402
from asr.models import build_stack  # noqa: E402
from asr.train import CrossEntropyObjective, StackedOptimizer, TrainConfig, resolve_arch  # noqa: E402


def time_steps(cfg: TrainConfig, data: FrameData, seeds: list[int], steps: int, warmup: int = 5) -> float:
    """Seconds per optimiser step of a stack of ``len(seeds)`` members (same code path as train_stack)."""
    arch = resolve_arch(cfg)
    model = build_stack(arch, data.feat_dim, int(data.num_pdfs), seeds)
    opt = StackedOptimizer(list(model.parameters()), cfg, len(seeds))
    objective = CrossEntropyObjective()
    active = torch.ones(len(seeds), dtype=torch.bool)
    left, right = model.context
    it = iterate_batches(data, cfg.batch_size, left, right, torch.Generator().manual_seed(0))
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        batch = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            logits = model(batch.x)
        loss = objective(logits, batch).sum()
        opt.zero_grad()
        loss.backward()
        opt.step(active)
    return (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="small")
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--pdfs", type=int, default=120)
    ap.add_argument("--feat-dim", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus-frames", type=int, default=400_000, help="training frames of the mini corpus")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], help="TrainConfig override key=value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from asr.config import apply_overrides, parse_kv

    cfg = apply_overrides(TrainConfig(arch=args.arch, batch_size=args.batch_size), parse_kv(args.set))
    rng = np.random.default_rng(0)
    n = max(args.batch_size * (args.steps + 10), 50_000)
    lengths = np.full(n // 500, 500)
    feats = rng.normal(size=(int(lengths.sum()), args.feat_dim)).astype(np.float32)
    labels = rng.integers(0, args.pdfs, int(lengths.sum()))
    data = FrameData.from_arrays(feats, lengths, labels, num_pdfs=args.pdfs)
    arch = resolve_arch(cfg)
    m1 = build_stack(arch, args.feat_dim, args.pdfs, [1])
    print(f"arch={args.arch} {arch}  params/member={m1.params_per_member:,}  "
          f"threads={args.threads} batch={args.batch_size} pdfs={args.pdfs}")
    seeds = list(range(1, args.members + 1))
    t_stack = time_steps(cfg, data, seeds, args.steps)
    t_one = time_steps(cfg, data, [1], args.steps)
    rate_stack = args.batch_size * args.members / t_stack
    rate_one = args.batch_size / t_one
    work = args.corpus_frames * args.epochs * args.members
    print(f"stacked   ({args.members} members): {t_stack * 1e3:8.1f} ms/step  {rate_stack:12,.0f} member-frames/s"
          f"  -> {args.members} members x {args.epochs} epochs x {args.corpus_frames:,} frames: "
          f"{work / rate_stack:7.1f} s")
    print(f"sequential (1 member)      : {t_one * 1e3:8.1f} ms/step  {rate_one:12,.0f} member-frames/s"
          f"  -> same work: {work / rate_one:7.1f} s")
    print(f"speed-up of stacking: {rate_stack / rate_one:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
