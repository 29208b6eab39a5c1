"""GMM input features derived from the stored log-mel fbank: cepstra and deltas.

13 cepstra (DCT-II with Kaldi's lifter 22: Kaldi's MFCC without the energy term), per-speaker
cepstral mean normalisation, deltas and delta-deltas (39 dims). The neural models read the fbank
itself (``asr.features``); only the GMM-HMM (``asr.gmm``, ``asr.align``, ``asr.tree``) reads these,
computed on the fly so no second feature store is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from asr.features import FeatureError, FeatureStore

__all__ = ["CepstraSettings", "GmmFeatureSource", "add_deltas", "cepstra_from_fbank", "gmm_features"]


class CepstraSettings(Protocol):
    """The feature fields of a GMM config (``asr.gmm_model.GmmConfig``)."""

    num_ceps: int
    cepstral_lifter: float
    delta_order: int
    delta_window: int
    cmvn: str


def _dct_matrix(num_ceps: int, num_bins: int) -> np.ndarray:
    """Kaldi's ``ComputeDctMatrix`` (orthonormal DCT-II), transposed: ``(num_bins, num_ceps)``."""
    n = np.arange(num_bins) + 0.5
    k = np.arange(num_ceps)[:, None]
    m = np.sqrt(2.0 / num_bins) * np.cos(np.pi / num_bins * n[None, :] * k)
    m[0] = np.sqrt(1.0 / num_bins)
    return m.T


def _lifter(num_ceps: int, q: float) -> np.ndarray:
    i = np.arange(num_ceps)
    return 1.0 + 0.5 * q * np.sin(np.pi * i / q) if q > 0 else np.ones(num_ceps)


def cepstra_from_fbank(fbank: np.ndarray, num_ceps: int = 13, lifter: float = 22.0) -> np.ndarray:
    """Liftered cepstra of log-mel ``fbank`` ``(frames, bins)`` -> float64 ``(frames, num_ceps)``."""
    fbank = np.asarray(fbank, dtype=np.float64)
    if fbank.ndim != 2 or fbank.shape[1] < num_ceps:
        raise FeatureError(f"fbank must be (frames, bins >= {num_ceps}), got {fbank.shape}")
    return (fbank @ _dct_matrix(num_ceps, fbank.shape[1])) * _lifter(num_ceps, lifter)


def _delta_scales(order: int, window: int) -> list[np.ndarray]:
    """Kaldi's ``DeltaFeatures`` filters: order i is the order-(i-1) filter convolved with
    ``[-w .. w] / sum(j^2)``."""
    scales = [np.array([1.0])]
    base = np.arange(-window, window + 1, dtype=np.float64)
    base /= np.sum(base ** 2)
    for _ in range(order):
        scales.append(np.convolve(scales[-1], base))
    return scales


def add_deltas(feats: np.ndarray, order: int = 2, window: int = 2) -> np.ndarray:
    """Append deltas up to ``order`` (edges replicated, as Kaldi): ``(T, D)`` -> ``(T, D * (order + 1))``."""
    feats = np.asarray(feats, dtype=np.float64)
    t = feats.shape[0]
    out = [feats]
    for s in _delta_scales(order, window)[1:]:
        half = (len(s) - 1) // 2
        idx = np.clip(np.arange(t)[:, None] + np.arange(-half, half + 1)[None, :], 0, t - 1)  # (T, taps)
        out.append(np.einsum("tkd,k->td", feats[idx], s))
    return np.concatenate(out, axis=1)


def gmm_features(fbank: np.ndarray, cfg: CepstraSettings, mean: np.ndarray | None = None) -> np.ndarray:
    """GMM input features from raw log-mel ``fbank`` ``(frames, bins)``: cepstra (with ``mean``, the
    speaker's fbank mean ``(bins,)``, removed first: the DCT is linear, so this is cepstral mean
    normalisation) plus deltas. Returns float64 ``(frames, cfg.feature_dim)``."""
    fbank = np.asarray(fbank, dtype=np.float64)
    if mean is not None:
        fbank = fbank - mean
    return add_deltas(cepstra_from_fbank(fbank, cfg.num_ceps, cfg.cepstral_lifter), cfg.delta_order, cfg.delta_window)


class GmmFeatureSource:
    """GMM features of the utterances of one feature directory."""

    def __init__(self, feats_dir: str | os.PathLike, cfg: CepstraSettings) -> None:
        self.store = FeatureStore(feats_dir)
        self.cfg = cfg
        self._pos = {u: k for k, u in enumerate(self.store.ids)}
        self._means: dict[str, np.ndarray] = {}
        if cfg.cmvn == "speaker":
            with np.load(Path(feats_dir) / "cmvn.npz", allow_pickle=False) as z:
                for s, c, tot in zip(z["speakers"], z["spk_count"], z["spk_sum"]):
                    self._means[str(s)] = tot / max(float(c), 1.0)

    def num_frames(self, utt_id: str) -> int:
        return int(self.store.lengths[self._pos[utt_id]])

    def feats(self, utt_id: str) -> np.ndarray:
        k = self._pos[utt_id]
        mean = self._means.get(self.store.speakers[k]) if self.cfg.cmvn == "speaker" else None
        return gmm_features(self.store.utt(utt_id), self.cfg, mean)


# --------------------------------------------------------------------------------------------
# The acoustic model
