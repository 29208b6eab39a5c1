"""Top-k cached soft targets vs teachers in the loop: cache size and the student's frame accuracy.

Trains a small teacher ensemble on a synthetic frame-classification task (or uses an existing
experiment's teachers with ``--exp-dir``), then trains one student per soft-target mode with the
same seed, temperature and data order, and prints the cache size (against dense fp16) and the
students' dev frame accuracy difference.

    nice .venv/bin/python benchmarks/bench_soft_targets.py                       # synthetic, ~1-2 min
    nice .venv/bin/python benchmarks/bench_soft_targets.py --k 5 20 --temperature 1 2 5 10
    .venv/bin/python benchmarks/bench_soft_targets.py --exp-dir exp/mini --train-set train-clean \\
        --dev-set dev-clean                                                      # the recipe's teachers
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from asr.distill import (TAILS, DistillConfig, DistillObjective, TeacherEnsemble, TopKCache,
                         compute_topk_targets, distill, write_topk)
from asr.frames import FrameData
from asr.models import load_stack
from asr.train import TrainConfig, train_stack


def synthetic(num_utts: int, pdfs: int, feat: int, seed: int) -> FrameData:
    """Labels from a fixed random two-layer network of the current and neighbouring frames, plus noise."""
    g = np.random.default_rng(seed)
    w = np.random.default_rng(999)
    w1 = w.normal(size=(3 * feat, 64))
    w2 = w.normal(size=(64, pdfs))
    lengths = g.integers(80, 160, size=num_utts)
    feats = g.normal(size=(int(lengths.sum()), feat)).astype(np.float32)
    ctx = np.concatenate([np.roll(feats, 1, 0), feats, np.roll(feats, -1, 0)], axis=1)
    logits = np.maximum(ctx @ w1, 0) @ w2 / 4 + g.gumbel(size=(feats.shape[0], pdfs)) * 1.5
    return FrameData.from_arrays(feats, lengths, logits.argmax(1), num_pdfs=pdfs)


def best_dev_acc(model_path: Path) -> float:
    return 100.0 * float(json.loads((model_path.parent / "summary.json").read_text())["best_dev_acc"])


def run_synthetic(args: argparse.Namespace) -> None:
    train = synthetic(args.utts, args.pdfs, args.feat, 0)
    dev = synthetic(max(20, args.utts // 5), args.pdfs, args.feat, 1)
    cfg = TrainConfig(arch="small", left=4, right=4, window_step=1, hidden_layers=2, hidden_dim=128,
                      epochs=args.epochs, batch_size=256, lr=2e-3, lr_schedule="constant", patience=99,
                      tensorboard=False, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        teachers = train_stack(cfg, train, dev, tmp / "members", seeds=list(range(1, args.members + 1)))
        teacher = load_stack(teachers)
        print(f"train {train.num_frames} frames, dev {dev.num_frames}, {args.pdfs} pdfs; "
              f"{args.members} teachers trained in {time.time() - t0:.0f} s")
        members = [best_dev_acc(p) for p in teachers]
        print(f"teachers' dev frame acc: mean {np.mean(members):.2f}%")
        online = TeacherEnsemble(teacher)
        dense = 2 * train.num_frames * args.pdfs
        print(f"{'T':>4} {'online':>8} " + " ".join(f"{f'k={k} {tail}':>16}" for k in args.k for tail in TAILS))
        for t in args.temperature:
            t0 = time.time()
            p = train_stack(cfg, train, dev, tmp / f"online{t}", seeds=[1000],
                            objective=DistillObjective([t], 0.5, online))
            row = [f"{t:>4g} {best_dev_acc(p[0]):>8.2f}"]
            for k in args.k:
                c = compute_topk_targets(teacher, train, [t], k)[0]
                for tail in TAILS:
                    obj = DistillObjective([t], 0.5, TopKCache([c], tail=tail), eval_source=online)
                    q = train_stack(cfg, train, dev, tmp / f"cache{k}{tail}{t}", seeds=[1000], objective=obj)
                    acc = best_dev_acc(q[0])
                    row.append(f"{acc:>8.2f} ({acc - best_dev_acc(p[0]):+.2f})")
            print(" ".join(row), f"  [{time.time() - t0:.0f} s]", flush=True)
        for k in args.k:
            c = compute_topk_targets(teacher, train, [max(args.temperature)], k)[0]
            path = write_topk(tmp / f"topk_k{k}.npz", c)
            print(f"cache k={k}: {path.stat().st_size / 1e6:.2f} MB = {path.stat().st_size / train.num_frames:.0f} "
                  f"B/frame vs dense fp16 {dense / 1e6:.2f} MB; mean top-k mass at T={max(args.temperature):g}: "
                  f"{1 - c.rest.mean():.4f}")


def run_exp(args: argparse.Namespace) -> None:
    exp = Path(args.exp_dir)
    teachers = sorted((exp / "members").glob("seed*/model.pt"))
    if not teachers:
        raise SystemExit(f"no teachers under {exp}/members")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("online", "cache"):
            cfg = DistillConfig(temperatures=tuple(args.temperature), soft_targets=mode, topk=args.k[0])
            out = Path(tmp) / mode
            distill(cfg, exp / "feats" / args.train_set, exp / "ali" / args.train_set, exp / "feats" / args.dev_set,
                    exp / "ali" / args.dev_set, teachers, out)
            res[mode] = json.loads((out / "choice.json").read_text())["per_temperature"]
            if mode == "cache":
                info = json.loads((out / "soft_targets" / "info.json").read_text())
                c = next(iter(info["caches"].values()))
                print(f"cache k={args.k[0]}: {c['bytes'] / 1e6:.2f} MB vs dense fp16 {info['dense_fp16_bytes'] / 1e6:.2f} MB; "
                      f"mean top-k mass {c['mean_topk_mass']:.4f}")
    print("dev frame accuracy:", res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp-dir", default=None)
    ap.add_argument("--train-set", default="train-clean")
    ap.add_argument("--dev-set", default="dev-clean")
    ap.add_argument("--k", type=int, nargs="+", default=[10])
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0, 2.0, 5.0, 10.0])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--utts", type=int, default=150)
    ap.add_argument("--pdfs", type=int, default=120)
    ap.add_argument("--feat", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    run_exp(args) if args.exp_dir else run_synthetic(args)


if __name__ == "__main__":
    main()
