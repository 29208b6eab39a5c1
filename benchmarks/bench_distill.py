"""Distillation-stage throughput: student frames/s and the teachers' share of the step time.

Runs ``--steps`` training steps of one student against the ensemble of ``--members`` (online
targets: the teachers in the loop; fp32 or bf16 teacher passes) and against a top-k cache of the
same frames, and prints frames/s and where the time goes.

    .venv/bin/python benchmarks/bench_distill.py --exp-dir exp/mini --members-dir exp/mini/members \\
        --train-set train-clean --threads 2 --steps 200
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import torch

from asr.distill import (DistillObjective, SoftTargetConfig, TeacherEnsemble, TopKCache, compute_topk_targets)
from asr.frames import FrameData, iterate_batches
from asr.models import build_stack, load_stack
from asr.train import StackedOptimizer, TrainConfig


class _TimedTeachers(TeacherEnsemble):
    """Teachers that add the time of their own forward passes to ``seconds``."""

    seconds = 0.0

    def logits(self, batch):
        t = time.perf_counter()
        out = super().logits(batch)
        self.seconds += time.perf_counter() - t
        return out


def _run(name: str, source, teachers: _TimedTeachers | None, data: FrameData, arch, num_pdfs: int,
         steps: int, batch_size: int, bf16: bool) -> None:
    student = build_stack(arch, data.feat_dim, num_pdfs, [1000])
    opt = StackedOptimizer(list(student.parameters()), TrainConfig(), 1)
    obj = DistillObjective([2.0], 0.5, source)
    left, right = student.context
    batches = iterate_batches(data, batch_size, left, right, torch.Generator().manual_seed(0), only_labelled=False)
    active = torch.ones(1, dtype=torch.bool)
    t0, n = time.perf_counter(), 0
    for i, batch in zip(range(steps), batches):
        if i == 5:                                  # warm-up steps are not counted
            t0, n = time.perf_counter(), 0
            if teachers is not None:
                teachers.seconds = 0.0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = student(batch.x)
        loss = obj(z, batch).sum()
        opt.zero_grad()
        loss.backward()
        opt.step(active)
        n += batch.x.shape[0]
    secs = time.perf_counter() - t0
    share = f", teachers {100 * teachers.seconds / secs:.0f}% of the time" if teachers is not None else ""
    print(f"{name:<28} {n / secs:>10,.0f} student frames/s{share}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp-dir", default="exp/mini")
    ap.add_argument("--members-dir", default=None, help="default: <exp-dir>/members")
    ap.add_argument("--train-set", default="train-clean")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    exp = Path(args.exp_dir)
    paths = sorted(glob.glob(str(Path(args.members_dir or exp / "members") / "seed*" / "model.pt")))
    stack = load_stack(paths)
    data = FrameData.from_dirs(exp / "feats" / args.train_set, exp / "ali" / args.train_set)
    print(f"{len(paths)} teachers ({stack.params_per_member:,} parameters each), {data.num_frames:,} frames, "
          f"batch {args.batch_size}, {args.threads} threads")
    for bf16 in (False, True):
        teachers = _TimedTeachers(stack, bf16=bf16)
        _run(f"online, {'bf16' if bf16 else 'fp32'}", teachers, teachers, data, stack.arch, stack.num_pdfs,
             args.steps, args.batch_size, bf16)
    t = time.perf_counter()
    cache = TopKCache(compute_topk_targets(stack, data, [2.0], SoftTargetConfig().k, bf16=True))
    secs = time.perf_counter() - t
    print(f"{'top-k cache: teacher pass':<28} {data.num_frames / secs:>10,.0f} frames/s, bf16 "
          f"({secs:.1f} s for the {data.num_frames:,} frames, once)")
    _run("cache, bf16 student", cache, None, data, stack.arch, stack.num_pdfs, args.steps, args.batch_size, True)


if __name__ == "__main__":
    main()
