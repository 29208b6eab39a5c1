"""GPU training throughput and model FLOPs utilisation of the ``hinton2015`` paper preset (one H200).

Self-contained: random LibriSpeech-shaped data (40-dim features kept on the GPU in bf16, ``--pdfs``
output classes), bf16 autocast, the project's own stacked model / optimiser / batching. Measures

1. feature batching on the GPU (spliced 26-frame windows gathered from the resident matrix),
2. training steps of 10 members stacked vs one member at a time (same code path as train_stack),
   reported as member-frames/s and MFU = 6 * params * member-frames / s / peak,
3. an end-to-end ``train_stack`` + ``compute_log_posteriors`` smoke run on the device.

Run:   python benchmarks/gpu_train.py            (needs only torch and this repo's asr/ modules)
CPU check of the script itself:   python benchmarks/gpu_train.py --tiny
Exit status is non-zero on any error or non-finite result.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from asr.frames import FrameData, iterate_batches  # noqa: E402
from asr.models import build_stack  # noqa: E402
from asr.posteriors import compute_log_posteriors  # noqa: E402
from asr.train import CrossEntropyObjective, StackedOptimizer, TrainConfig, resolve_arch, train_stack  # noqa: E402

PEAK_BF16 = 989e12   # H100/H200 SXM dense bf16 (datasheet); MFU is relative to this


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_data(n_frames: int, feat: int, pdfs: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> FrameData:
    g = torch.Generator().manual_seed(seed)
    utt_len = 1200                                   # ~12 s utterances
    n_utts = max(1, n_frames // utt_len)
    lengths = [utt_len] * n_utts
    feats = torch.randn(n_utts * utt_len, feat, generator=g)
    labels = torch.randint(0, pdfs, (n_utts * utt_len,), generator=g)
    return FrameData.from_arrays(feats, lengths, labels, num_pdfs=pdfs, device=device, dtype=dtype)


def bench_batching(data: FrameData, batch: int, left: int, right: int, steps: int, device: torch.device) -> float:
    it = iterate_batches(data, batch, left, right, torch.Generator().manual_seed(0))
    for _ in range(3):
        next(it)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        b = next(it)
    sync(device)
    return batch * steps / (time.perf_counter() - t)


def bench_train(cfg: TrainConfig, data: FrameData, members: int, steps: int, warmup: int,
                device: torch.device) -> tuple[float, float, int]:
    """(seconds per full step, seconds per forward+backward step, params per member)."""
    model = build_stack(resolve_arch(cfg), data.feat_dim, int(data.num_pdfs), list(range(1, members + 1))).to(device)
    opt = StackedOptimizer(list(model.parameters()), cfg, members)
    objective = CrossEntropyObjective()
    active = torch.ones(members, dtype=torch.bool, device=device)
    left, right = model.context
    it = iterate_batches(data, cfg.batch_size, left, right, torch.Generator().manual_seed(0))
    ac = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    t = 0.0
    times = []
    for i in range(2 * (warmup + steps)):
        with_optimizer = i >= warmup + steps          # first pass: forward+backward only
        if i % (warmup + steps) == warmup:
            sync(device)
            t = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            it = iterate_batches(data, cfg.batch_size, left, right, torch.Generator().manual_seed(i))
            b = next(it)
        with ac:
            logits = model(b.x if device.type == "cuda" else b.x.float())
        loss = objective(logits, b).sum()
        opt.zero_grad()
        loss.backward()
        if with_optimizer:
            opt.step(active)
        if i % (warmup + steps) == warmup + steps - 1:
            sync(device)
            times.append((time.perf_counter() - t) / steps)
    dt_fb, dt = times
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()} (members={members})")
    params = model.params_per_member
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dt, dt_fb, params


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model and data (CPU check of this script)")
    ap.add_argument("--pdfs", type=int, default=5000)
    ap.add_argument("--members", type=int, default=10)
    ap.add_argument("--frames", type=int, default=4_000_000, help="random training frames kept on the device")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.pdfs, args.frames, args.batch_sizes, args.steps = 50, 20_000, [128], 3
        torch.set_num_threads(1)
        cfg = TrainConfig(arch="hinton2015", hidden_layers=2, hidden_dim=64, left=4, right=2,
                          tensorboard=False, progress=False)
    else:
        cfg = TrainConfig(arch="hinton2015", tensorboard=False, progress=False)
        if device.type != "cuda":
            print("ERROR: no CUDA device (use --tiny for a CPU check)", file=sys.stderr)
            return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}  torch {torch.__version__}  preset={cfg.arch}  pdfs={args.pdfs}")
    feat_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t = time.perf_counter()
    data = random_data(args.frames, 40, args.pdfs, device, feat_dtype)
    sync(device)
    mem = data.feats.numel() * data.feats.element_size() / 2**20
    print(f"features on {device}: {data.num_frames:,} frames x 40 {str(feat_dtype).replace('torch.', '')} "
          f"= {mem:.0f} MiB (+ labels/bounds), built in {time.perf_counter() - t:.1f} s")
    arch = resolve_arch(cfg)
    left, right = arch.left, arch.right

    for bs in args.batch_sizes:
        rate = bench_batching(data, bs, left, right, max(args.steps, 10), device)
        print(f"batching: batch {bs:5d}, {left}+1+{right} frame windows: {rate / 1e6:8.2f} M frames/s")

    results = []
    for bs in args.batch_sizes:
        c = dataclasses.replace(cfg, batch_size=bs)
        for M in (args.members, 1):
            dt, dt_fb, params = bench_train(c, data, M, args.steps, 5, device)
            mf = bs * M / dt
            mfu = 6 * params * mf / PEAK_BF16
            results.append((bs, M, dt, mf))
            print(f"train: batch {bs:5d} members {M:2d}: {dt * 1e3:8.2f} ms/step ({dt_fb * 1e3:7.2f} without "
                  f"optimiser)  {mf / 1e3:9.1f} k member-frames/s  MFU {100 * mfu:5.1f}%  "
                  f"(params/member {params:,})")
        stacked = next(r for r in results if r[0] == bs and r[1] == args.members)
        single = next(r for r in results if r[0] == bs and r[1] == 1)
        print(f"  -> {args.members} members stacked vs one at a time: {stacked[3] / single[3]:.2f}x throughput")

    # End-to-end: the real loop on the device (bf16 autocast, checkpoint, dev scoring, posteriors).
    # (a narrower model: train_state.pt of 3 paper-size members is ~4 GB per checkpoint)
    small = random_data(200_000 if not args.tiny else 4_000, 40, args.pdfs, device, feat_dtype, seed=1)
    dev = random_data(24_000 if not args.tiny else 2_400, 40, args.pdfs, device, feat_dtype, seed=2)
    e2e = dataclasses.replace(cfg, device=str(device), epochs=1, batch_size=args.batch_sizes[-1],
                              hidden_layers=2, hidden_dim=512, checkpoint_every_steps=40, eval_batch_size=8192)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths = train_stack(e2e, small, dev, Path(tmp) / "members", list(range(1, 4)))
        sync(device)
        el = time.perf_counter() - t
        from asr.models import load_stack

        model = load_stack(paths).to(device)
        lp = compute_log_posteriors(model, dev, batch_size=8192)
        if not torch.isfinite(lp).all():
            raise RuntimeError("non-finite posteriors")
        total = lp.exp().sum(-1)
        if not torch.allclose(total, torch.ones_like(total), atol=1e-3):
            raise RuntimeError("posteriors do not sum to one")
    print(f"end-to-end train_stack (3 members of 2 x 512, 1 epoch of {small.num_frames:,} frames, dev scoring, "
          f"checkpoints) on {device}: {el:.1f} s; posteriors {tuple(lp.shape)} OK")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print("OK")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
