"""Ensembles of acoustic models: the per-frame mean of the members' posteriors.

The paper's ensemble is the arithmetic mean of the members' probabilities; the geometric mean
(mean of log-probabilities, renormalised) is offered for comparison. Posterior files of a
LibriSpeech-size set hold millions of frames, so every array is read memory-mapped and the mean is
computed and written in chunks of frames: memory stays at one chunk per member.

The ensemble is decoded exactly like a member (same priors, same decoder): its output is just
another ``post/<set>.npy`` (``post_<k>/<set>.npy`` for the first ``k`` members).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from asr.config import add_config_args, config_from_args, config_hash, config_to_dict, write_config
from asr.io import atomic_path, atomic_write_json, mark_done

__all__ = [
    "EnsembleConfig",
    "EnsembleError",
    "ensemble_log_posteriors",
    "order_members_by_seed",
    "write_ensemble",
    "add_cli",
]

log = logging.getLogger(__name__)

MODES = ("arithmetic", "geometric")


class EnsembleError(ValueError):
    """Member posteriors are missing or disagree in shape; the message names the file."""


@dataclass(frozen=True)
class EnsembleConfig:
    mode: str = "arithmetic"          # arithmetic (mean of probabilities, the paper) | geometric
    sizes: tuple[int, ...] = ()       # ensemble sizes k (first k members by seed); () = all members only
    chunk_frames: int = 65536         # frames per chunk: memory is chunk_frames * pdfs * 4 B per member


def _open_post(p: np.ndarray | str | os.PathLike) -> np.ndarray:
    if isinstance(p, np.ndarray):
        return p
    path = Path(p)
    if not path.is_file():
        raise EnsembleError(f"posterior file {path} does not exist")
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.ndim != 2:
        raise EnsembleError(f"{path}: posteriors must be 2-D (frames, pdfs), got shape {arr.shape}")
    return arr


def ensemble_log_posteriors(
    member_post: Sequence[np.ndarray | str | os.PathLike],
    mode: str = "arithmetic",
    chunk_frames: int = 65536,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Per-frame ensemble of natural-log posteriors.

    Args:
        member_post: M arrays or ``.npy`` paths, each ``(frames, pdfs)`` natural-log posteriors
            (paths are memory-mapped, never read whole).
        mode: ``"arithmetic"``: ``log(mean_m p_m)``; ``"geometric"``: ``mean_m log p_m``
            renormalised per frame so that the probabilities sum to one.
        chunk_frames: frames processed at a time.
        out: optional preallocated ``(frames, pdfs)`` array (e.g. a float16 ``np.memmap``) that
            receives the result chunk by chunk; by default a float32 array is allocated.
    Returns:
        ``(frames, pdfs)`` log-probabilities (``out`` when given, else float32).
    """
    if mode not in MODES:
        raise ValueError(f"unknown ensemble mode {mode!r}; choose one of {MODES}")
    if not member_post:
        raise EnsembleError("ensemble of zero members")
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    arrays = [_open_post(p) for p in member_post]
    shape = arrays[0].shape
    for p, a in zip(member_post, arrays):
        if a.shape != shape:
            name = p if not isinstance(p, np.ndarray) else "array"
            raise EnsembleError(f"{name}: shape {a.shape} differs from the first member's {shape}")
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape:
        raise EnsembleError(f"output shape {out.shape} differs from the members' {shape}")
    num_members = len(arrays)
    log_m = np.log(num_members)
    for start in range(0, shape[0], chunk_frames):
        stop = min(shape[0], start + chunk_frames)
        if mode == "arithmetic":
            # log(mean exp) with a running max so that very negative log-posteriors do not underflow.
            chunks = [np.asarray(a[start:stop], dtype=np.float32) for a in arrays]
            mx = chunks[0].copy()
            for c in chunks[1:]:
                np.maximum(mx, c, out=mx)
            acc = np.zeros_like(mx)
            for c in chunks:
                acc += np.exp(c - mx)
            res = np.log(acc) + mx - log_m
        else:
            acc = np.zeros((stop - start, shape[1]), dtype=np.float32)
            for a in arrays:
                acc += np.asarray(a[start:stop], dtype=np.float32)
            acc /= num_members
            mx = acc.max(axis=1, keepdims=True)
            res = acc - (mx + np.log(np.exp(acc - mx).sum(axis=1, keepdims=True)))
        out[start:stop] = res
    return out


_SEED_RE = re.compile(r"seed(\d+)$")


def order_members_by_seed(member_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Member directories sorted by the seed in their name (``seed<i>``), so "the first k" is stable.

    Directories not named ``seed<i>`` keep the order given (the caller's order is the seed order).
    """
    dirs = [Path(d) for d in member_dirs]
    seeds = [_SEED_RE.search(d.name) for d in dirs]
    if all(seeds):
        return [d for _, d in sorted(zip((int(m.group(1)) for m in seeds), dirs), key=lambda t: t[0])]
    return dirs


def write_ensemble(
    member_dirs: Sequence[str | os.PathLike],
    sets: Sequence[str],
    out_dir: str | os.PathLike,
    sizes: Sequence[int] | None = None,
    cfg: EnsembleConfig | None = None,
    ali_root: str | os.PathLike | None = None,
) -> dict[int, Path]:
    """Write ``out_dir/post_<k>/<set>.npy`` (float16 log-posteriors) for each ensemble size ``k``.

    The members are ordered by seed and the ensemble of size ``k`` uses the first ``k``. Results
    are written through a float16 memory map chunk by chunk, then renamed into place. Also writes
    ``post_<k>/members.json`` (the member dirs used), ``config.yaml`` and ``.done``.
    With ``ali_root`` (holding ``<set>/labels.npy``), ``post_<k>/frame_acc.json`` gives every
    ensemble's frame accuracy per set, so the ensemble-size curve needs no decoding.
    Returns ``{k: out_dir/post_<k>}``.
    """
    cfg = cfg or EnsembleConfig()
    if sizes is not None:
        cfg = EnsembleConfig(mode=cfg.mode, sizes=tuple(int(s) for s in sizes), chunk_frames=cfg.chunk_frames)
    if cfg.mode not in MODES:
        raise ValueError(f"unknown ensemble mode {cfg.mode!r}; choose one of {MODES}")
    members = order_members_by_seed(member_dirs)
    if not members:
        raise EnsembleError("write_ensemble: no member directories given")
    all_sizes = sorted(set(cfg.sizes) | {len(members)}) if cfg.sizes else [len(members)]
    bad = [k for k in all_sizes if k < 1 or k > len(members)]
    if bad:
        raise EnsembleError(f"ensemble sizes {bad} outside 1..{len(members)} (the number of members)")
    if not sets:
        raise EnsembleError("write_ensemble: no sets given")
    out_dir = Path(out_dir)
    outputs = {k: out_dir / f"post_{k}" for k in all_sizes}
    (out_dir / ".done").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out_dir)
    for s in sets:
        for m in members:
            if not (m / "post" / f"{s}.npy").is_file():
                raise EnsembleError(f"member {m}: missing posteriors {m / 'post' / (s + '.npy')}")
    for k in all_sizes:
        kdir = outputs[k]
        accs: dict[str, float | None] = {}
        for s in tqdm(sets, desc=f"ensemble k={k}", disable=None):
            paths = [m / "post" / f"{s}.npy" for m in members[:k]]
            shape = np.load(paths[0], mmap_mode="r", allow_pickle=False).shape
            with atomic_path(kdir / f"{s}.npy") as tmp:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
                ensemble_log_posteriors(paths, mode=cfg.mode, chunk_frames=cfg.chunk_frames, out=out)
                out.flush()
                if ali_root is not None:
                    accs[s] = _frame_accuracy(out, Path(ali_root) / s)
                del out
        atomic_write_json(kdir / "members.json", {"k": k, "mode": cfg.mode, "members": [str(m) for m in members[:k]]})
        _write_ensemble_priors(members[:k], kdir / "priors.npy", cfg.mode)
        if ali_root is not None:
            atomic_write_json(kdir / "frame_acc.json", {"frame_acc": accs})
    mark_done(out_dir, {"config_hash": config_hash(cfg), "members": [str(m) for m in members], "sets": list(sets),
                        "sizes": all_sizes, "config": config_to_dict(cfg)})
    return outputs


def _frame_accuracy(log_post: np.ndarray, ali_dir: Path, chunk: int = 65536) -> float | None:
    """Percent of labelled frames whose argmax is the reference pdf (None without labels)."""
    from asr.labels import LabelStore

    if not (ali_dir / "labels.npy").is_file():
        return None
    labels = LabelStore(ali_dir).labels
    if labels.shape[0] != log_post.shape[0]:
        raise EnsembleError(f"{ali_dir}: {labels.shape[0]} labels for {log_post.shape[0]} posterior frames")
    from asr.scoring import frame_accuracy

    acc, counted = frame_accuracy(log_post, labels, chunk)
    return acc if counted else None


def _write_ensemble_priors(members: Sequence[Path], out: Path, mode: str) -> None:
    """Posterior priors of an arithmetic ensemble: the mean of its members' mean posteriors (exactly
    the ensemble's own mean posterior over the training frames). Skipped when a member has none, or
    for the geometric mean (whose mean posterior is not the members' average)."""
    paths = [m / "priors.npy" for m in members]
    if mode != "arithmetic" or not all(p.is_file() for p in paths):
        return
    pri = np.mean([np.load(p, allow_pickle=False).astype(np.float64) for p in paths], axis=0)
    from asr.io import atomic_save_npy

    atomic_save_npy(out, pri / pri.sum())


def _cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(EnsembleConfig, args, mode=args.mode, sizes=args.sizes)
    write_ensemble(args.members, args.sets, args.out_dir, cfg=cfg, ali_root=args.ali_root)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ensemble",
        help="average members' posteriors (post_<k>/<set>.npy for ensemble sizes k)",
        description="Per-frame mean of the members' posteriors, for the first k members by seed. "
                    "Example: asr ensemble --members exp/mini/members/seed{1..10} "
                    "--sets dev-clean test-clean --sizes 1,2,5,10 --out-dir exp/mini/ensemble",
    )
    p.add_argument("--members", nargs="+", required=True, help="member dirs (each with post/<set>.npy)")
    p.add_argument("--sets", nargs="+", required=True, help="set names, e.g. dev-clean test-clean")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--sizes", default=None, help="comma-separated ensemble sizes (default: all members)")
    p.add_argument("--mode", choices=MODES, default=None, help="arithmetic (default) or geometric mean")
    p.add_argument("--ali-root", default=None, help="folder of ali/<set>/: write each ensemble's frame accuracy")
    add_config_args(p)
    p.set_defaults(func=_cli)
