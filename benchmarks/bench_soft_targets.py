"""Top-k cached soft targets vs teachers in the loop: cache size and the student's frame accuracy.

Trains a small teacher ensemble on a synthetic frame-classification task (or uses an existing
experiment's teachers with ``--exp-dir``), then trains one student per soft-target mode with the
same seed, temperature and data order, and prints the cache size (against dense fp16) and the
students' dev frame accuracy difference.

    nice .venv/bin/python benchmarks/bench_soft_targets.py                       # synthetic, ~1-2 min
    nice .venv/bin/python benchmarks/bench_soft_targets.py --k 5 10 20 --pdfs 200
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

from asr.distill import (DistillConfig, DistillObjective, TeacherEnsemble, TopKCache, compute_topk_targets,
                         distill, write_topk)
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
        caches = {k: compute_topk_targets(teacher, train, [args.temperature], k)[0] for k in args.k}
        results = {}
        t0 = time.time()
        online = TeacherEnsemble(teacher)
        p = train_stack(cfg, train, dev, tmp / "online", seeds=[1000],
                        objective=DistillObjective([args.temperature], 0.5, online))
        results["online"] = best_dev_acc(p[0])
        print(f"student online: dev frame acc {results['online']:.2f}% ({time.time() - t0:.0f} s)")
        dense = 2 * train.num_frames * args.pdfs
        for k, c in caches.items():
            path = write_topk(tmp / f"topk_k{k}.npz", c)
            t0 = time.time()
            obj = DistillObjective([args.temperature], 0.5, TopKCache([c]), eval_source=online)
            p = train_stack(cfg, train, dev, tmp / f"cache{k}", seeds=[1000], objective=obj)
            acc = best_dev_acc(p[0])
            print(f"student cache k={k}: dev frame acc {acc:.2f}% (diff vs online {acc - results['online']:+.2f}); "
                  f"cache {path.stat().st_size / 1e6:.2f} MB = {path.stat().st_size / train.num_frames:.0f} B/frame "
                  f"vs dense fp16 {dense / 1e6:.2f} MB; mean top-k mass {1 - c.rest.mean():.4f} "
                  f"({time.time() - t0:.0f} s)")


def run_exp(args: argparse.Namespace) -> None:
    exp = Path(args.exp_dir)
    teachers = sorted((exp / "members").glob("seed*/model.pt"))
    if not teachers:
        raise SystemExit(f"no teachers under {exp}/members")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("online", "cache"):
            cfg = DistillConfig(temperatures=(args.temperature,), soft_targets=mode, topk=args.k[0])
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
    ap.add_argument("--temperature", type=float, default=2.0)
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
