"""Posteriors of trained models over a set of frames, and the priors made from them.

After training, every system is used through its outputs: ``post/<set>.npy`` (float16
log-posteriors of every frame, read by the ensemble, the soft targets and the decoder) and
``priors.npy`` (the mean posterior over the training frames, which turns posteriors into scaled
likelihoods for decoding). Both are written here, for members and students alike, with the same
forward pass as training's evaluation (:mod:`asr.precision`). ``asr posteriors`` is the CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from asr.frames import FrameData, iterate_batches
from asr.io import atomic_path, atomic_save_npy
from asr.models import StackedModel, load_stack
from asr.precision import autocast, model_input

__all__ = [
    "iter_log_posteriors",
    "compute_log_posteriors",
    "mean_posteriors",
    "write_priors",
    "save_posteriors",
    "add_cli",
]

log = logging.getLogger(__name__)


@torch.no_grad()
def iter_log_posteriors(model: StackedModel, data: FrameData, batch_size: int = 4096,
                        dtype: str = "auto") -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, end, log_posteriors)`` with ``(M, end - start, pdfs)`` float32 for all frames in order."""
    device = next(model.parameters()).device
    if data.device != device:
        data = data.to(device)
    ac = autocast(device, dtype)
    ac_on = not isinstance(ac, contextlib.nullcontext)
    was = model.training
    model.eval()
    left, right = model.context
    start = 0
    for batch in iterate_batches(data, batch_size, left, right, None, shuffle=False, only_labelled=False):
        with ac:
            logits = model(model_input(batch.x, ac_on))
        lp = torch.log_softmax(logits.float(), dim=-1)
        end = start + batch.frame_idx.numel()
        yield start, end, lp
        start = end
    model.train(was)


def compute_log_posteriors(model: StackedModel, data: FrameData, batch_size: int = 4096,
                           dtype: str = "auto") -> torch.Tensor:
    """Natural-log posteriors of every frame (labelled or not): ``(M, num_frames_total, pdfs)`` float32, CPU."""
    out = torch.empty(model.num_members, data.num_frames, model.num_pdfs, dtype=torch.float32)
    for s, e, lp in iter_log_posteriors(model, data, batch_size, dtype):
        out[:, s:e] = lp.cpu()
    return out


def mean_posteriors(model: StackedModel, data: FrameData, batch_size: int = 4096, dtype: str = "auto") -> np.ndarray:
    """Per member, the mean posterior over every frame of ``data``: ``(M, pdfs)`` float64."""
    acc = torch.zeros(model.num_members, model.num_pdfs, dtype=torch.float64)
    for _, _, lp in iter_log_posteriors(model, data, batch_size, dtype):
        acc += lp.exp().sum(dim=1).double().cpu()
    return (acc / max(data.num_frames, 1)).numpy()


def write_priors(model: StackedModel, data: FrameData, out_paths: Sequence[str | os.PathLike],
                 batch_size: int = 4096, dtype: str = "auto", floor: float = 1e-8) -> list[Path]:
    """Write each member's *posterior priors*: its mean posterior over the training frames, floored
    and renormalised (Kaldi's nnet3-am-adjust-priors). A model trained on soft targets (or an
    ensemble average) is calibrated to its own mean output, not to the hard labels' counts."""
    if len(out_paths) != model.num_members:
        raise ValueError(f"{len(out_paths)} prior paths for {model.num_members} member(s)")
    priors = np.maximum(mean_posteriors(model, data, batch_size, dtype), floor)
    priors /= priors.sum(axis=1, keepdims=True)
    for p, row in zip(out_paths, priors):
        atomic_save_npy(p, row)
    return [Path(p) for p in out_paths]


def save_posteriors(model: StackedModel, data: FrameData, out_paths: Sequence[str | os.PathLike],
                    batch_size: int = 4096, dtype: str = "auto") -> list[Path]:
    """Write ``post/<set>.npy`` per member: float16 ``(num_frames_total, pdfs)`` log-posteriors.

    Streams batches into memory-mapped temporary files renamed into place at the end, so sets far
    larger than memory work and a killed run leaves no partial file.
    """
    paths = [Path(p) for p in out_paths]
    if len(paths) != model.num_members:
        raise ValueError(f"{len(paths)} output paths for {model.num_members} member(s)")
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]
        mms = [np.lib.format.open_memmap(t, mode="w+", dtype=np.float16,
                                         shape=(data.num_frames, model.num_pdfs)) for t in tmps]
        for s, e, lp in iter_log_posteriors(model, data, batch_size, dtype):
            arr = lp.to(torch.float16).cpu().numpy()
            for m, mm in enumerate(mms):
                mm[s:e] = arr[m]
        for mm in mms:
            mm.flush()
        del mms
    return paths


# --------------------------------------------------------------------------------------------
# CLI


def _cli_posteriors(args: argparse.Namespace) -> int:
    if len(args.model) != len(args.out):
        raise SystemExit(f"--model and --out need the same number of paths ({len(args.model)} vs {len(args.out)})")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model = load_stack(args.model).to(args.device)
    data = FrameData.from_dirs(args.feats_dir, None, cmvn=args.cmvn, device=args.device)
    if data.feat_dim != model.input_feat_dim:
        raise SystemExit(f"{args.feats_dir}: features have dim {data.feat_dim}, model expects {model.input_feat_dim}")
    paths = save_posteriors(model, data, args.out, batch_size=args.batch_size, dtype=args.dtype)
    for p in paths:
        log.info("wrote %s (%d frames x %d pdfs, float16 log-posteriors)", p, data.num_frames, model.num_pdfs)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("posteriors", help="write float16 log-posteriors of every frame of a set",
                       description="Example: asr posteriors --model members/seed1/model.pt "
                                   "--feats-dir feats/dev --out members/seed1/post/dev.npy")
    q.add_argument("--model", nargs="+", required=True, help="one or more model.pt (same architecture)")
    q.add_argument("--feats-dir", required=True)
    q.add_argument("--out", nargs="+", required=True, help="one .npy per model")
    q.add_argument("--device", default="cpu")
    q.add_argument("--batch-size", type=int, default=4096)
    q.add_argument("--cmvn", default="speaker")
    q.add_argument("--threads", type=int, default=0)
    q.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="bfloat16: bf16 autocast (fast on CUDA and CPUs with avx512_bf16)")
    q.set_defaults(func=_cli_posteriors)
