"""Frame labels (pdf ids from a forced alignment) and the pdf priors counted from them.

The on-disk layout is docs/FORMATS.md "Frame labels": ``ali/<set>/labels.npy`` int32 in the feature
store's global frame order with -1 for frames of utterances left out, ``failed.txt`` naming every
utterance left out with the reason, ``info.json``, and for the training set ``priors.npy``.

Priors must come from exactly the labels the network is trained on (docs/DESIGN.md section 4): a hybrid
system divides posteriors by them, so a prior from other labels boosts the wrong pdfs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from asr.io import atomic_save_npy, atomic_write_json, atomic_write_text, read_json

__all__ = ["LabelError", "LabelStore", "count_priors", "write_labels", "DEFAULT_PRIOR_FLOOR"]

DEFAULT_PRIOR_FLOOR = 1e-5


class LabelError(ValueError):
    """A label directory is missing, inconsistent, or does not match its feature store."""


def count_priors(labels: np.ndarray, num_pdfs: int, floor: float = DEFAULT_PRIOR_FLOOR) -> np.ndarray:
    """Relative pdf frequencies of ``labels`` ``(frames,)`` (entries < 0 ignored), floored at
    ``floor`` and renormalised to sum 1. Returns float64 ``(num_pdfs,)``.

    The floor keeps pdfs that never occur in training (for example SPN without OOV words) from
    getting a log-prior of minus infinity, which would let them win every frame after division.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise LabelError(f"labels must be 1-D (frames,), got shape {labels.shape}")
    if num_pdfs <= 0:
        raise LabelError(f"num_pdfs must be positive, got {num_pdfs}")
    if not 0.0 < floor < 1.0 / num_pdfs:
        raise LabelError(f"prior floor must be in (0, 1/num_pdfs), got {floor}")
    valid = labels[labels >= 0]
    if valid.size == 0:
        raise LabelError("no labelled frames to count priors from")
    if int(valid.max()) >= num_pdfs:
        raise LabelError(f"label {int(valid.max())} out of range for {num_pdfs} pdfs")
    counts = np.bincount(valid, minlength=num_pdfs).astype(np.float64)
    priors = np.maximum(counts / counts.sum(), floor)
    return priors / priors.sum()


def write_labels(
    out_dir: str | os.PathLike,
    labels: np.ndarray,
    failed: dict[str, str],
    num_pdfs: int,
    num_utts: int,
    priors_floor: float | None = None,
    extra_info: dict | None = None,
) -> Path:
    """Write ``labels.npy``, ``failed.txt``, ``info.json`` (and ``priors.npy`` when
    ``priors_floor`` is given: the training set). ``labels``: int ``(num_frames_total,)``."""
    out_dir = Path(out_dir)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise LabelError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and (int(labels.min()) < -1 or int(labels.max()) >= num_pdfs):
        raise LabelError(f"labels out of range [-1, {num_pdfs}) in {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(out_dir / "labels.npy", labels.astype(np.int32))
    atomic_write_text(out_dir / "failed.txt", "".join(f"{u}\t{r}\n" for u, r in sorted(failed.items())))
    info = {"num_pdfs": int(num_pdfs), "num_frames": int(labels.size), "num_utts": int(num_utts),
            "num_failed": len(failed)}
    info.update(extra_info or {})
    if priors_floor is not None:
        atomic_save_npy(out_dir / "priors.npy", count_priors(labels, num_pdfs, priors_floor))
        info["prior_floor"] = priors_floor
    atomic_write_json(out_dir / "info.json", info)
    return out_dir


class LabelStore:
    """Read-only view of ``ali/<set>/``."""

    def __init__(self, ali_dir: str | os.PathLike) -> None:
        self.dir = Path(ali_dir)
        for name in ("labels.npy", "info.json", "failed.txt"):
            if not (self.dir / name).is_file():
                raise LabelError(f"label dir {self.dir}: {name} is missing (run the alignment first)")
        self.labels: np.ndarray = np.load(self.dir / "labels.npy", allow_pickle=False)
        self.info: dict = read_json(self.dir / "info.json")
        self.num_pdfs: int = int(self.info["num_pdfs"])
        if self.labels.dtype != np.int32 or self.labels.ndim != 1:
            raise LabelError(f"{self.dir / 'labels.npy'}: expected int32 (frames,), got "
                             f"{self.labels.dtype} {self.labels.shape}")
        if self.labels.size != int(self.info["num_frames"]):
            raise LabelError(f"{self.dir}: labels.npy has {self.labels.size} frames, info.json says "
                             f"{self.info['num_frames']}")
        self.failed: dict[str, str] = {}
        for line in (self.dir / "failed.txt").read_text(encoding="utf-8").splitlines():
            if line.strip():
                utt, _, reason = line.partition("\t")
                self.failed[utt] = reason
        p = self.dir / "priors.npy"
        self.priors: np.ndarray | None = np.load(p, allow_pickle=False) if p.is_file() else None
        if self.priors is not None and self.priors.shape != (self.num_pdfs,):
            raise LabelError(f"{p}: shape {self.priors.shape}, expected ({self.num_pdfs},)")

    def check_matches(self, store) -> None:
        """Raise unless the labels cover exactly the frames of ``store`` (an ``asr.features.FeatureStore``)."""
        if self.labels.size != store.num_frames_total:
            raise LabelError(f"{self.dir}: {self.labels.size} labelled frames, but feature dir {store.dir} "
                             f"has {store.num_frames_total}")

    def utt(self, store, utt_id: str) -> np.ndarray:
        """Labels of one utterance ``(num_frames,)`` (all -1 when it was left out)."""
        if getattr(self, "_pos_for", None) is not store:
            self._pos = {u: i for i, u in enumerate(store.ids)}
            self._pos_for = store
        if utt_id not in self._pos:
            raise KeyError(f"utterance {utt_id!r} is not in feature dir {store.dir}")
        k = self._pos[utt_id]
        off, n = int(store.offsets[k]), int(store.lengths[k])
        return self.labels[off:off + n]

    @property
    def num_labelled(self) -> int:
        return int((self.labels >= 0).sum())
