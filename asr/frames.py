"""Frame data in memory and random frame / chunk batches with context windows built on the fly.

A data set lives in memory (on the training device when it fits) as one ``(num_frames_total,
feat)`` matrix in the feature store's global frame order, with CMVN already applied. Every frame
also knows the bounds of its utterance (``utt_start``, ``utt_end``), so a context window is a
single gather whose positions are clamped to the utterance: edge frames are replicated, windows
never leak into a neighbouring utterance, and nothing spliced is ever written to disk. There is no
Python loop over frames or utterances in batching.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from asr.io import read_json

__all__ = [
    "FrameData",
    "FrameBatch",
    "FrameDataError",
    "splice",
    "iterate_batches",
    "iterate_chunks",
    "num_batches",
    "num_chunk_batches",
]

log = logging.getLogger(__name__)


class FrameDataError(ValueError):
    """Features and labels of a data set do not fit together; the message names the files."""


@dataclass
class FrameData:
    """One data set in memory: features, frame labels and utterance bounds per frame.

    feats: ``(num_frames_total, feat)`` float32 (or bf16/fp16 on a GPU), CMVN applied.
    labels: ``(num_frames_total,)`` int64 pdf ids, -1 where a frame has no label.
    utt_start / utt_end: ``(num_frames_total,)`` int64, the global index of the first frame of the
    frame's utterance and one past its last frame.
    num_pdfs: from ``ali/<set>/info.json`` when known.
    """

    feats: torch.Tensor
    labels: torch.Tensor
    utt_start: torch.Tensor
    utt_end: torch.Tensor
    num_pdfs: int | None = None

    def __post_init__(self) -> None:
        n = self.feats.shape[0] if self.feats.dim() == 2 else -1
        if self.feats.dim() != 2:
            raise FrameDataError(f"feats must be (frames, feat), got {tuple(self.feats.shape)}")
        for name in ("labels", "utt_start", "utt_end"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise FrameDataError(f"{name} must be ({n},) like feats, got {tuple(t.shape)}")
            if t.dtype != torch.int64:
                raise FrameDataError(f"{name} must be int64, got {t.dtype}")

    @property
    def num_frames(self) -> int:
        return int(self.feats.shape[0])

    @property
    def feat_dim(self) -> int:
        return int(self.feats.shape[1])

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def num_labelled(self) -> int:
        return int((self.labels >= 0).sum())

    def utterance_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(offsets, lengths)`` of the utterances, each ``(num_utts,)`` int64, in frame order."""
        if self.num_frames == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, empty
        first = torch.ones(self.num_frames, dtype=torch.bool, device=self.device)
        first[1:] = self.utt_start[1:] != self.utt_start[:-1]
        offsets = self.utt_start[first]
        return offsets, self.utt_end[offsets] - offsets

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "FrameData":
        return FrameData(
            feats=self.feats.to(device=device, dtype=dtype or self.feats.dtype),
            labels=self.labels.to(device), utt_start=self.utt_start.to(device),
            utt_end=self.utt_end.to(device), num_pdfs=self.num_pdfs,
        )

    @classmethod
    def concat(cls, parts: "list[FrameData]", num_pdfs: int | None = None) -> "FrameData":
        """One data set from several, in order (utterance bounds shifted; labels kept, -1 stays -1)."""
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [p.num_frames for p in parts[:-1]])
        return cls(feats=torch.cat([p.feats for p in parts]), labels=torch.cat([p.labels for p in parts]),
                   utt_start=torch.cat([p.utt_start + int(o) for p, o in zip(parts, offsets)]),
                   utt_end=torch.cat([p.utt_end + int(o) for p, o in zip(parts, offsets)]),
                   num_pdfs=num_pdfs if num_pdfs is not None else parts[0].num_pdfs)

    @classmethod
    def from_arrays(cls, feats: np.ndarray | torch.Tensor, lengths: np.ndarray | list[int],
                    labels: np.ndarray | torch.Tensor | None = None, num_pdfs: int | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "FrameData":
        """Build from a frame matrix ``(N, feat)``, per-utterance ``lengths`` (summing to N) and labels."""
        feats_t = torch.as_tensor(np.asarray(feats) if not torch.is_tensor(feats) else feats)
        lengths_t = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
        if (lengths_t <= 0).any():
            raise FrameDataError("every utterance needs at least one frame")
        n = int(lengths_t.sum())
        if feats_t.dim() != 2 or feats_t.shape[0] != n:
            raise FrameDataError(f"feats {tuple(feats_t.shape)} do not match the utterance lengths "
                                 f"(total {n} frames)")
        offsets = torch.cumsum(lengths_t, 0) - lengths_t
        utt_start = torch.repeat_interleave(offsets, lengths_t)
        utt_end = utt_start + torch.repeat_interleave(lengths_t, lengths_t)
        if labels is None:
            labels_t = torch.full((n,), -1, dtype=torch.int64)
        else:
            labels_t = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels).to(torch.int64)
        if labels_t.shape != (n,):
            raise FrameDataError(f"labels {tuple(labels_t.shape)} do not match {n} frames")
        if num_pdfs is not None and labels_t.numel() and int(labels_t.max()) >= num_pdfs:
            raise FrameDataError(f"label {int(labels_t.max())} out of range for {num_pdfs} pdfs")
        if labels_t.numel() and int(labels_t.min()) < -1:
            raise FrameDataError(f"labels must be >= -1, found {int(labels_t.min())}")
        return cls(feats=feats_t.to(device=device, dtype=dtype), labels=labels_t.to(device),
                   utt_start=utt_start.to(device), utt_end=utt_end.to(device), num_pdfs=num_pdfs)

    @classmethod
    def from_dirs(cls, feats_dir: str | os.PathLike, ali_dir: str | os.PathLike | None, cmvn: str = "speaker",
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "FrameData":
        """Load ``feats/<set>`` (CMVN applied) and, if given, ``ali/<set>`` labels onto ``device``."""
        from asr.features import FeatureStore  # written by the features step

        feats_dir = Path(feats_dir)
        store = FeatureStore(feats_dir)
        lengths = np.asarray(store.lengths, dtype=np.int64)
        offsets = np.asarray(store.offsets, dtype=np.int64)
        total = int(store.num_frames_total)
        expected = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        if len(offsets) != len(lengths) or not np.array_equal(offsets, expected) or int(lengths.sum()) != total:
            raise FrameDataError(f"{feats_dir}: utterance offsets/lengths do not tile the "
                                 f"{total} frames contiguously")
        feats = store.load_all(cmvn=cmvn)
        labels = None
        num_pdfs = None
        if ali_dir is not None:
            ali_dir = Path(ali_dir)
            lab_path = ali_dir / "labels.npy"
            if not lab_path.is_file():
                raise FrameDataError(f"{lab_path}: no labels file")
            labels = np.load(lab_path, allow_pickle=False)
            if labels.shape != (total,):
                raise FrameDataError(f"{lab_path}: {labels.shape[0] if labels.ndim else 0} labels for "
                                     f"{total} frames in {feats_dir}")
            info_path = ali_dir / "info.json"
            if info_path.is_file():
                num_pdfs = int(read_json(info_path)["num_pdfs"])
            try:
                return cls.from_arrays(feats, lengths, labels.astype(np.int64), num_pdfs, device, dtype)
            except FrameDataError as e:
                raise FrameDataError(f"{lab_path}: {e}") from None
        return cls.from_arrays(feats, lengths, None, None, device, dtype)


@dataclass
class FrameBatch:
    """One training batch.

    x: ``(batch, (left + 1 + right) * feat)`` spliced windows (frame batches), or
    ``(batch, chunk + left + right, feat)`` (chunk batches, sequence models).
    labels: ``(rows,)`` int64, rows = batch (frames) or batch * chunk (chunks); -1 = ignore
    (only chunk padding past an utterance's end).
    frame_idx: ``(rows,)`` int64 global frame index of each row (clamped to a real frame for padding).
    """

    x: torch.Tensor
    labels: torch.Tensor
    frame_idx: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """``(rows,)`` bool: rows that carry a label."""
        return self.labels >= 0


def splice(feats: torch.Tensor, idx: torch.Tensor, left: int, right: int,
           utt_start: torch.Tensor, utt_end: torch.Tensor) -> torch.Tensor:
    """Context windows around frames ``idx`` -> ``(batch, (left + 1 + right) * feat)``.

    Window positions outside the frame's utterance are clamped to its first / last frame (edge
    replication, as Kaldi's splicing does), so windows never cross utterance boundaries.
    ``feats`` ``(N, feat)``; ``idx``, ``utt_start``, ``utt_end`` int64 (``idx`` ``(batch,)``).
    """
    if feats.dim() != 2:
        raise ValueError(f"feats must be (frames, feat), got {tuple(feats.shape)}")
    if idx.dim() != 1 or idx.dtype != torch.int64:
        raise ValueError(f"idx must be a 1-D int64 tensor, got {tuple(idx.shape)} {idx.dtype}")
    if left < 0 or right < 0:
        raise ValueError(f"context must be non-negative, got left={left} right={right}")
    offs = torch.arange(-left, right + 1, device=idx.device)
    pos = idx.unsqueeze(1) + offs                                     # (batch, window)
    pos = torch.clamp(pos, min=utt_start[idx].unsqueeze(1), max=(utt_end[idx] - 1).unsqueeze(1))
    return feats.index_select(0, pos.reshape(-1)).view(idx.shape[0], -1)


def _frame_order(data: FrameData, generator: torch.Generator | None, shuffle: bool,
                 only_labelled: bool) -> torch.Tensor:
    if only_labelled:
        idx = torch.nonzero(data.labels >= 0).squeeze(1)
    else:
        idx = torch.arange(data.num_frames, device=data.device)
    if shuffle:
        if generator is None:
            raise ValueError("shuffling needs an explicit torch.Generator (never the global RNG)")
        perm = torch.randperm(idx.numel(), generator=generator, device=generator.device)
        idx = idx[perm.to(idx.device)]
    return idx


def num_batches(data: FrameData, batch_size: int, only_labelled: bool = True) -> int:
    n = data.num_labelled if only_labelled else data.num_frames
    return (n + batch_size - 1) // batch_size


def iterate_batches(data: FrameData, batch_size: int, left: int, right: int,
                    generator: torch.Generator | None, shuffle: bool = True, only_labelled: bool = True,
                    start_batch: int = 0) -> Iterator[FrameBatch]:
    """Random (or in-order) frame batches of spliced windows; the last batch may be smaller.

    The order is a ``randperm`` drawn from ``generator`` (CPU or on the data's device), so the same
    generator state gives the same batches. ``start_batch`` skips batches of that order (resume).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = _frame_order(data, generator, shuffle, only_labelled)
    for b in range(start_batch, (order.numel() + batch_size - 1) // batch_size):
        idx = order[b * batch_size: (b + 1) * batch_size]
        x = splice(data.feats, idx, left, right, data.utt_start, data.utt_end)
        yield FrameBatch(x=x, labels=data.labels[idx], frame_idx=idx)


def _chunk_starts(data: FrameData, chunk_len: int, only_labelled: bool) -> torch.Tensor:
    offsets, lengths = data.utterance_bounds()
    n_chunks = (lengths + chunk_len - 1) // chunk_len
    utt = torch.repeat_interleave(torch.arange(offsets.numel(), device=data.device), n_chunks)
    first_chunk = torch.cumsum(n_chunks, 0) - n_chunks
    k = torch.arange(utt.numel(), device=data.device) - first_chunk[utt]
    starts = offsets[utt] + k * chunk_len
    if only_labelled:
        starts = starts[data.labels[starts] >= 0]
    return starts


def num_chunk_batches(data: FrameData, chunk_len: int, batch_size: int, only_labelled: bool = True) -> int:
    n = _chunk_starts(data, chunk_len, only_labelled).numel()
    return (n + batch_size - 1) // batch_size


def iterate_chunks(data: FrameData, chunk_len: int, batch_size: int, left: int, right: int,
                   generator: torch.Generator | None, shuffle: bool = True, only_labelled: bool = True,
                   start_batch: int = 0) -> Iterator[FrameBatch]:
    """Batches of ``batch_size`` utterance chunks of ``chunk_len`` output frames, for sequence models.

    Each utterance is cut into consecutive chunks; a row of ``x`` holds the chunk plus ``left`` /
    ``right`` context frames (edge-replicated at utterance ends): ``(batch, chunk_len + left +
    right, feat)``. Positions past the utterance end get label -1. ``labels`` / ``frame_idx`` are
    ``(batch * chunk_len,)``, chunk-major, matching a chunk model's flattened output rows.
    """
    if chunk_len <= 0 or batch_size <= 0:
        raise ValueError(f"chunk_len and batch_size must be positive, got {chunk_len}, {batch_size}")
    starts = _chunk_starts(data, chunk_len, only_labelled)
    if shuffle:
        if generator is None:
            raise ValueError("shuffling needs an explicit torch.Generator (never the global RNG)")
        perm = torch.randperm(starts.numel(), generator=generator, device=generator.device)
        starts = starts[perm.to(starts.device)]
    in_offs = torch.arange(-left, chunk_len + right, device=data.device)
    out_offs = torch.arange(chunk_len, device=data.device)
    for b in range(start_batch, (starts.numel() + batch_size - 1) // batch_size):
        s = starts[b * batch_size: (b + 1) * batch_size]
        lo = data.utt_start[s].unsqueeze(1)
        hi = (data.utt_end[s] - 1).unsqueeze(1)
        pos = torch.clamp(s.unsqueeze(1) + in_offs, min=lo, max=hi)              # (batch, T + ctx)
        x = data.feats.index_select(0, pos.reshape(-1)).view(s.numel(), in_offs.numel(), -1)
        t = s.unsqueeze(1) + out_offs                                              # (batch, T)
        valid = t <= hi
        frame_idx = torch.minimum(t, hi).reshape(-1)
        labels = torch.where(valid.reshape(-1), data.labels[frame_idx], torch.full_like(frame_idx, -1))
        yield FrameBatch(x=x, labels=labels, frame_idx=frame_idx)
