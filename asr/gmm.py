"""Flat-start monophone GMM-HMM training and forced alignment (Kaldi's ``steps/train_mono.sh``).

The HMM side is kaldi-hmm-gmm: topology, transition model, per-utterance training graphs
(``TrainingGraphCompiler``), equal alignment and Viterbi alignment (``align_utterance_wrapper``).
The Gaussian side (likelihoods, statistics, ML re-estimation, Gaussian splitting) is numpy: it is
vectorised over frames, and it is deterministic for a seed, which Kaldi's splitting (global C
``rand()``) is not inside one process.

Recipe, as in Kaldi: every pdf starts as the global Gaussian of the features; pass 0 accumulates on
equal alignments; later passes realign on a schedule (``realign_iters``) and otherwise re-accumulate
on the previous alignment; after each ML update the Gaussians are split towards ``total_gauss``
(linearly over ``max_iter_inc`` passes, allocated to pdfs by occupancy ** ``power``). Training uses
the ``subset_utts`` shortest utterances; the final model then aligns every utterance.

GMM features are derived from the stored log-mel fbank: 13 cepstra (DCT-II, Kaldi's lifter 22, as
Kaldi MFCC without the energy term), per-speaker cepstral mean normalisation, deltas and
delta-deltas (39 dims).

Alignment failures are never silent (docs/DESIGN.md section 8): the failure flag and the alignment length
are checked for every utterance, and each utterance left out is listed with its reason.

Example::

    asr train-gmm --feats-dir exp/mini/feats/train --manifest exp/mini/data/train/manifest.jsonl \\
        --lang-dir exp/mini/lang --out-dir exp/mini/gmm_mono --ali-dir exp/mini/ali/train --nj 2
    asr align --model-dir exp/mini/gmm_mono --lang-dir exp/mini/lang --feats-dir exp/mini/feats/dev \\
        --manifest exp/mini/data/dev/manifest.jsonl --out-dir exp/mini/ali/dev --nj 2
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

import kaldi_hmm_gmm as khg  # noqa: I001  (must be imported before kaldifst)
import kaldifst

from asr.config import (add_config_args, config_from_args, config_to_dict, load_config, parse_kv,
                        write_config)
from asr.io import atomic_path, atomic_write_text, mark_done
from asr.labels import write_labels
from asr.lang import Lang, load_lang
from asr.manifest import read_manifest

__all__ = [
    "GmmConfig",
    "GmmError",
    "GmmModel",
    "GmmScorer",
    "train_mono",
    "align",
    "load_model",
    "gmm_loglikes",
    "gmm_features",
    "cepstra_from_fbank",
    "add_deltas",
    "estimate",
    "transition_tables",
    "training_subset",
    "add_cli",
]

log = logging.getLogger(__name__)

_LOG_2PI = math.log(2.0 * math.pi)
_FEATURE_FIELDS = ("num_ceps", "cepstral_lifter", "delta_order", "delta_window", "cmvn")


class GmmError(ValueError):
    """Bad input to GMM training or alignment; the message names the file or utterance."""


@dataclass(frozen=True)
class GmmConfig:
    """Monophone training and alignment settings (Kaldi train_mono.sh, scaled to a CPU budget)."""

    num_iters: int = 16              # estimation passes (Kaldi: 40); pass 0 uses equal alignment
    max_iter_inc: int = 12           # Gaussians grow linearly up to this pass (Kaldi: 30)
    total_gauss: int = 1000          # target number of Gaussians in total
    realign_iters: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14)
    subset_utts: int = 600           # train on the N shortest utterances (0 = all; Kaldi: 2000 of 28k)
    beam: float = 100.0              # Viterbi beam (wide: narrow beams fail silently, docs/DESIGN.md section 8)
    retry_beam: float = 400.0
    acoustic_scale: float = 0.1
    transition_scale: float = 1.0
    self_loop_scale: float = 0.1
    boost_silence: float = 1.0       # > 1 multiplies silence likelihoods during alignment
    power: float = 0.25              # Gaussian allocation: occupancy ** power
    split_min_count: float = 20.0    # no split below this many frames per Gaussian
    perturb_factor: float = 0.01     # split: means move +-0.01 standard deviations
    min_gaussian_occupancy: float = 3.0
    min_gaussian_weight: float = 1e-5
    min_variance: float = 1e-3
    transition_floor: float = 0.01
    transition_mincount: float = 5.0
    num_ceps: int = 13
    cepstral_lifter: float = 22.0
    delta_order: int = 2
    delta_window: int = 2
    cmvn: str = "speaker"            # cepstral mean normalisation per "speaker", or "none"
    prior_floor: float = 1e-5        # floor of the pdf priors counted from training labels
    chunk_utts: int = 16             # utterances per worker task (results do not depend on nj)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_iters < 1:
            raise ValueError(f"GmmConfig.num_iters must be >= 1, got {self.num_iters}")
        if self.cmvn not in ("speaker", "none"):
            raise ValueError(f"GmmConfig.cmvn must be 'speaker' or 'none', got {self.cmvn!r}")
        if self.beam <= 0 or self.retry_beam < 0:
            raise ValueError(f"GmmConfig: bad beams {self.beam} / {self.retry_beam}")
        if self.boost_silence <= 0:
            raise ValueError(f"GmmConfig.boost_silence must be > 0, got {self.boost_silence}")
        if self.num_ceps < 1 or self.delta_order < 0 or self.delta_window < 1:
            raise ValueError("GmmConfig: num_ceps >= 1, delta_order >= 0, delta_window >= 1 required")
        if self.chunk_utts < 1:
            raise ValueError(f"GmmConfig.chunk_utts must be >= 1, got {self.chunk_utts}")

    @property
    def feature_dim(self) -> int:
        return self.num_ceps * (self.delta_order + 1)


# --------------------------------------------------------------------------------------------
# Features


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
        raise GmmError(f"fbank must be (frames, bins >= {num_ceps}), got {fbank.shape}")
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


def gmm_features(fbank: np.ndarray, cfg: GmmConfig = GmmConfig(), mean: np.ndarray | None = None) -> np.ndarray:
    """GMM input features from raw log-mel ``fbank`` ``(frames, bins)``: cepstra (with ``mean``, the
    speaker's fbank mean ``(bins,)``, removed first: the DCT is linear, so this is cepstral mean
    normalisation) plus deltas. Returns float64 ``(frames, cfg.feature_dim)``."""
    fbank = np.asarray(fbank, dtype=np.float64)
    if mean is not None:
        fbank = fbank - mean
    return add_deltas(cepstra_from_fbank(fbank, cfg.num_ceps, cfg.cepstral_lifter), cfg.delta_order, cfg.delta_window)


class _FeatureSource:
    """GMM features of the utterances of one feature directory."""

    def __init__(self, feats_dir: str | os.PathLike, cfg: GmmConfig) -> None:
        from asr.features import FeatureStore

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


class GmmModel:
    """Diagonal GMMs for all pdfs, stored as flat arrays: Gaussians of pdf p are rows
    ``offsets[p]:offsets[p + 1]`` of ``weights`` ``(G,)``, ``means`` ``(G, D)``, ``variances`` ``(G, D)``.

    ``transition_log_probs`` ``(num_transition_ids + 1,)`` is the trained transition model's
    ``log_probs``; kaldi-hmm-gmm cannot serialise a TransitionModel, so it is rebuilt from these.
    ``tree``: Kaldi's binary ContextDependency of a context-dependent model (``asr.tree``); None for
    the monophone tree of ``phones``.
    """

    def __init__(self, weights: np.ndarray, means: np.ndarray, variances: np.ndarray, offsets: np.ndarray,
                 transition_log_probs: np.ndarray, topo: str, phones: Sequence[int], config: dict,
                 tree: bytes | None = None) -> None:
        self.tree = bytes(tree) if tree else None
        self.weights = np.asarray(weights, np.float64)
        self.means = np.asarray(means, np.float64)
        self.variances = np.asarray(variances, np.float64)
        self.offsets = np.asarray(offsets, np.int64)
        self.transition_log_probs = np.asarray(transition_log_probs, np.float64)
        self.topo = topo
        self.phones = [int(p) for p in phones]
        self.config = dict(config)
        g = self.weights.shape[0]
        if (self.means.shape != self.variances.shape or self.means.shape[0] != g or self.offsets[0] != 0
                or self.offsets[-1] != g or np.any(np.diff(self.offsets) < 1)):
            raise GmmError("inconsistent GMM arrays (every pdf needs >= 1 Gaussian)")
        self.comp_pdf = np.repeat(np.arange(self.num_pdfs), np.diff(self.offsets))  # (G,)
        iv = 1.0 / self.variances
        with np.errstate(divide="ignore"):
            logw = np.log(self.weights)
        self._gconst = logw - 0.5 * (self.dim * _LOG_2PI + np.log(self.variances).sum(1) + (self.means ** 2 * iv).sum(1))
        self._proj = np.concatenate([self.means * iv, -0.5 * iv], axis=1).T  # (2D, G)

    @property
    def num_pdfs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_gauss(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def comps_of(self, pdfs: np.ndarray) -> np.ndarray:
        """Gaussian indices of the given pdfs, in order."""
        pdfs = np.asarray(pdfs, np.int64)
        return np.concatenate([np.arange(self.offsets[p], self.offsets[p + 1]) for p in pdfs]) if pdfs.size \
            else np.zeros(0, np.int64)

    def gauss_loglikes(self, feats: np.ndarray, comps: np.ndarray | None = None) -> np.ndarray:
        """Weighted Gaussian log-likelihoods ``(T, K)`` of ``feats`` ``(T, D)`` for Gaussians ``comps``."""
        x = np.asarray(feats, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise GmmError(f"features must be (frames, {self.dim}), got {x.shape}")
        xx = np.concatenate([x, x * x], axis=1)  # (T, 2D)
        if comps is None:
            return xx @ self._proj + self._gconst
        return xx @ self._proj[:, comps] + self._gconst[comps]

    def loglikes(self, feats: np.ndarray, pdfs: np.ndarray | None = None) -> np.ndarray:
        """Pdf log-likelihoods ``(T, len(pdfs))`` (all pdfs when ``pdfs`` is None).

        The log-sum-exp is taken relative to each frame's best Gaussian; a pdf more than ~690 nats
        below it is clamped there (it can never win a frame anyway)."""
        pdfs = np.arange(self.num_pdfs) if pdfs is None else np.asarray(pdfs, np.int64)
        comps = self.comps_of(pdfs)
        ll = self.gauss_loglikes(feats, comps)  # (T, K)
        seg = np.concatenate([[0], np.cumsum(self.offsets[pdfs + 1] - self.offsets[pdfs])[:-1]])
        m = ll.max(axis=1, keepdims=True)  # (T, 1)
        tot = np.add.reduceat(np.exp(ll - m), seg, axis=1)  # (T, P)
        return np.log(np.maximum(tot, 1e-300)) + m

    # Kaldi interop ---------------------------------------------------------------------------

    def to_kaldi(self) -> khg.AmDiagGmm:
        """The same model as a kaldi-hmm-gmm ``AmDiagGmm`` (e.g. for ``DecodableAmDiagGmmScaled``)."""
        am = khg.AmDiagGmm()
        for p in range(self.num_pdfs):
            a, b = self.offsets[p], self.offsets[p + 1]
            g = khg.DiagGmm(int(b - a), self.dim)
            g.set_weights(self.weights[a:b].astype(np.float32))
            g.set_invvars_and_means((1.0 / self.variances[a:b]).astype(np.float32), self.means[a:b].astype(np.float32))
            g.compute_gconsts()
            am.add_pdf(g)
        return am

    def topology(self) -> khg.HmmTopology:
        topo = khg.HmmTopology()
        topo.read(self.topo)
        return topo

    def ctx_dep(self) -> khg.ContextDependency:
        if self.tree is not None:
            from asr.tree import context_dependency_from_bytes

            return context_dependency_from_bytes(self.tree)
        return khg.monophone_context_dependency(self.phones, self.topology().get_phone_to_num_pdf_classes())

    def transition_model(self) -> khg.TransitionModel:
        """The trained TransitionModel: rebuilt, then set to ``transition_log_probs`` by one ML
        update whose counts are those probabilities (no floor, no minimum count)."""
        tm = khg.TransitionModel(self.ctx_dep(), self.topology())
        if len(self.transition_log_probs) != tm.num_transition_ids + 1:
            raise GmmError(f"model has {len(self.transition_log_probs) - 1} transition ids, topology gives "
                           f"{tm.num_transition_ids}")
        stats = np.exp(self.transition_log_probs) * 1e6
        stats[0] = 0.0
        tm.mle_update(stats, khg.MleTransitionUpdateConfig(floor=1e-30, mincount=0.0))
        return tm

    # I/O -------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """An ``.npz`` archive (no pickled objects) under any file name, e.g. ``final.mdl``."""
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, weights=self.weights, means=self.means, variances=self.variances, offsets=self.offsets,
                     transition_log_probs=self.transition_log_probs, topo=np.array(self.topo),
                     phones=np.array(self.phones, np.int64), config=np.array(json.dumps(self.config)),
                     **({"tree": np.frombuffer(self.tree, np.uint8)} if self.tree is not None else {}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GmmModel":
        path = Path(path)
        if not path.is_file():
            raise GmmError(f"model {path} does not exist (run train-gmm first)")
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["weights"], z["means"], z["variances"], z["offsets"], z["transition_log_probs"],
                           str(z["topo"]), z["phones"].tolist(), json.loads(str(z["config"])),
                           z["tree"].tobytes() if "tree" in z.files else None)
        except (KeyError, ValueError, OSError) as e:
            raise GmmError(f"cannot read model {path}: {e}") from None

    @classmethod
    def flat(cls, num_pdfs: int, mean: np.ndarray, var: np.ndarray, tm: khg.TransitionModel, topo: str,
             phones: Sequence[int], config: dict) -> "GmmModel":
        """Every pdf is the global Gaussian (Kaldi ``gmm-init-mono``)."""
        return cls(np.ones(num_pdfs), np.tile(mean, (num_pdfs, 1)), np.tile(var, (num_pdfs, 1)),
                   np.arange(num_pdfs + 1), np.array(tm.log_probs), topo, phones, config)

    def replace(self, **kw: Any) -> "GmmModel":
        d = dict(weights=self.weights, means=self.means, variances=self.variances, offsets=self.offsets,
                 transition_log_probs=self.transition_log_probs, topo=self.topo, phones=self.phones,
                 config=self.config, tree=self.tree)
        d.update(kw)
        return GmmModel(**d)


def transition_tables(tm: khg.TransitionModel) -> tuple[np.ndarray, np.ndarray]:
    """``tid2pdf`` int64 ``(num_transition_ids + 1,)`` (index 0: -1) and ``pdf2phone`` int64
    ``(num_pdfs,)`` of a transition model. With one tree root per phone every pdf has one phone."""
    n = tm.num_transition_ids
    tid2pdf = np.array([-1] + [tm.transition_id_to_pdf(t) for t in range(1, n + 1)], np.int64)
    pdf2phone = np.zeros(tm.num_pdfs, np.int64)
    pdf2phone[tid2pdf[1:]] = [tm.transition_id_to_phone(t) for t in range(1, n + 1)]
    return tid2pdf, pdf2phone


def _model_path(model_dir_or_file: str | os.PathLike) -> Path:
    p = Path(model_dir_or_file)
    return p / "final.mdl" if p.is_dir() else p


def load_model(model_dir: str | os.PathLike) -> tuple[GmmModel, khg.TransitionModel]:
    """The trained model of a ``train-gmm`` directory (or a ``.mdl`` file) and its TransitionModel."""
    model = GmmModel.load(_model_path(model_dir))
    return model, model.transition_model()


def _model_config(model: GmmModel) -> GmmConfig:
    d = {k: v for k, v in model.config.items() if k in {f.name for f in dataclasses.fields(GmmConfig)}}
    return load_config(GmmConfig, None, d)


class GmmScorer:
    """Pdf log-likelihoods of utterances, with the model and features opened once (for decoding
    the GMM system itself: use ``acwt * loglikes`` as the acoustic score, no priors)."""

    def __init__(self, model_dir: str | os.PathLike, feats_dir: str | os.PathLike) -> None:
        self.model = GmmModel.load(_model_path(model_dir))
        self.source = _FeatureSource(feats_dir, _model_config(self.model))

    @property
    def num_pdfs(self) -> int:
        return self.model.num_pdfs

    def loglikes(self, utt_id: str) -> np.ndarray:
        """float32 ``(num_frames, num_pdfs)``."""
        if utt_id not in self.source._pos:
            raise KeyError(f"utterance {utt_id!r} is not in feature dir {self.source.store.dir}")
        return self.model.loglikes(self.source.feats(utt_id)).astype(np.float32)


def gmm_loglikes(model_dir: str | os.PathLike, feats_dir: str | os.PathLike, utt_id: str) -> np.ndarray:
    """float32 ``(num_frames, num_pdfs)`` pdf log-likelihoods of one utterance (opens everything:
    use ``GmmScorer`` for many utterances)."""
    return GmmScorer(model_dir, feats_dir).loglikes(utt_id)


# --------------------------------------------------------------------------------------------
# Statistics and re-estimation


@dataclass
class _Stats:
    occ: np.ndarray      # (G,)
    x: np.ndarray        # (G, D)
    x2: np.ndarray       # (G, D)
    trans: np.ndarray    # (num_transition_ids + 1,)
    like: float = 0.0    # total log-likelihood of the aligned frames
    frames: int = 0

    @classmethod
    def zeros(cls, num_gauss: int, dim: int, num_tids: int) -> "_Stats":
        return cls(np.zeros(num_gauss), np.zeros((num_gauss, dim)), np.zeros((num_gauss, dim)), np.zeros(num_tids + 1))

    def add(self, o: "_Stats") -> None:
        self.occ += o.occ
        self.x += o.x
        self.x2 += o.x2
        self.trans += o.trans
        self.like += o.like
        self.frames += o.frames


def _accumulate(model: GmmModel, feats: np.ndarray, pdf_ali: np.ndarray, tid_ali: np.ndarray, st: _Stats) -> float:
    """Add one utterance's statistics: Gaussian posteriors within each frame's aligned pdf.
    Frames are grouped by pdf so only that pdf's Gaussians are evaluated. Returns the utterance's
    total log-likelihood."""
    xx = np.concatenate([feats, feats * feats], axis=1)  # (T, 2D)
    d = model.dim
    order = np.argsort(pdf_ali, kind="stable")
    pdfs, starts, counts = np.unique(pdf_ali[order], return_index=True, return_counts=True)
    like = 0.0
    for p, s0, n in zip(pdfs.tolist(), starts.tolist(), counts.tolist()):
        idx = order[s0:s0 + n]
        a, b = model.offsets[p], model.offsets[p + 1]
        sub = xx[idx]  # (n, 2D)
        ll = sub @ model._proj[:, a:b] + model._gconst[a:b]  # (n, g)
        m = ll.max(axis=1)
        e = np.exp(ll - m[:, None])
        tot = e.sum(axis=1)
        post = e / tot[:, None]  # (n, g)
        st.occ[a:b] += post.sum(axis=0)
        acc = post.T @ sub  # (g, 2D): first-order and second-order statistics
        st.x[a:b] += acc[:, :d]
        st.x2[a:b] += acc[:, d:]
        like += float(np.sum(m + np.log(tot)))
    np.add.at(st.trans, tid_ali, 1.0)
    st.like += like
    st.frames += int(len(pdf_ali))
    return like


def _mle_update(model: GmmModel, st: _Stats, cfg: GmmConfig) -> GmmModel:
    """Kaldi's ``MleDiagGmmUpdate`` for every pdf: ML means/variances (floored), weights from
    occupancies, Gaussians with too little data removed (the best one of a pdf is always kept)."""
    weights, means, variances, counts = [], [], [], []
    for p in range(model.num_pdfs):
        a, b = model.offsets[p], model.offsets[p + 1]
        occ = st.occ[a:b]
        tot = occ.sum()
        if tot <= 0:  # no data: keep the pdf as it is
            weights.append(model.weights[a:b]); means.append(model.means[a:b])
            variances.append(model.variances[a:b]); counts.append(b - a)
            continue
        keep = (occ > cfg.min_gaussian_occupancy) & (occ / tot >= cfg.min_gaussian_weight)
        if not keep.any():
            keep[np.argmax(occ)] = True
        idx = np.nonzero(keep)[0]
        o = occ[idx][:, None]
        mu = st.x[a:b][idx] / o
        var = np.maximum(st.x2[a:b][idx] / o - mu ** 2, cfg.min_variance)
        w = occ[idx] / occ[idx].sum()
        weights.append(w); means.append(mu); variances.append(var); counts.append(len(idx))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return model.replace(weights=np.concatenate(weights), means=np.concatenate(means),
                         variances=np.concatenate(variances), offsets=offsets)


def _split_targets(pdf_occs: np.ndarray, target: int, power: float, min_count: float) -> np.ndarray:
    """Kaldi's ``GetSplitTargets``: hand out Gaussians one at a time to the pdf with the largest
    ``occ ** power / num_gauss``, never below ``min_count`` frames per Gaussian."""
    import heapq

    n = len(pdf_occs)
    targets = np.ones(n, np.int64)
    score = np.power(np.maximum(pdf_occs, 0.0), power)
    heap = [(-score[p], p) for p in range(n) if score[p] > 0]
    heapq.heapify(heap)
    total = n
    while total < target and heap:
        _, p = heapq.heappop(heap)
        if (targets[p] + 1) * min_count >= pdf_occs[p]:
            continue  # this pdf may not grow any more
        targets[p] += 1
        total += 1
        heapq.heappush(heap, (-score[p] / targets[p], p))
    return targets


def _mix_up(model: GmmModel, pdf_occs: np.ndarray, target: int, cfg: GmmConfig, rng: np.random.Generator) -> GmmModel:
    """Split Gaussians towards ``target`` in total (Kaldi ``SplitByCount`` / ``DiagGmm::Split``:
    repeatedly halve the heaviest Gaussian, moving the two means apart by ``perturb_factor`` sd)."""
    targets = _split_targets(pdf_occs, target, cfg.power, cfg.split_min_count)
    weights, means, variances, counts = [], [], [], []
    for p in range(model.num_pdfs):
        a, b = model.offsets[p], model.offsets[p + 1]
        w, mu, var = list(model.weights[a:b]), list(model.means[a:b]), list(model.variances[a:b])
        while len(w) < targets[p]:
            k = int(np.argmax(w))
            w[k] /= 2.0
            r = rng.standard_normal(model.dim) * np.sqrt(var[k]) * cfg.perturb_factor
            w.append(w[k]); mu.append(mu[k] + r); var.append(var[k].copy())
            mu[k] = mu[k] - r
        weights.append(np.array(w)); means.append(np.array(mu)); variances.append(np.array(var)); counts.append(len(w))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return model.replace(weights=np.concatenate(weights), means=np.concatenate(means),
                         variances=np.concatenate(variances), offsets=offsets)


# --------------------------------------------------------------------------------------------
# Per-utterance work (in worker processes, or in-process for nj = 1)

_W: dict[str, Any] = {}  # worker state: features, lang tables, transcripts, the current model


def _worker_init(feats_dir: str, lang_dir: str, texts: dict[str, list[int]], cfg: GmmConfig) -> None:
    lang = load_lang(lang_dir)
    topo = lang.topology()
    min_len = {p: int(topo.min_length(p)) for p in lang.real_phone_ids}
    word_min = {}
    for w, prons in lang.lexicon.items():
        word_min[lang.word2id[w]] = min(sum(min_len[lang.phone2id[ph]] for ph in pron) for pron in prons)
    word_phones = {lang.word2id[w]: sorted({lang.phone2id[ph] for pron in prons for ph in pron})
                   for w, prons in lang.lexicon.items()}
    _W.clear()
    _W.update(source=_FeatureSource(feats_dir, cfg), lang=lang, texts=texts, cfg=cfg, word_min=word_min,
              word_phones=word_phones, L=lang.L(), model_path=None)


def _load_worker_model(path: str) -> None:
    if _W["model_path"] == path:
        return
    model = GmmModel.load(path)
    lang: Lang = _W["lang"]
    cfg: GmmConfig = _W["cfg"]
    tm = model.transition_model()
    opts = khg.TrainingGraphCompilerOptions(transition_scale=cfg.transition_scale,
                                            self_loop_scale=cfg.self_loop_scale)
    # The compiler keeps references to the transition model, tree and lexicon: keep them alive.
    ctx_dep = model.ctx_dep()
    lex = kaldifst.StdVectorFst(_W["L"])
    _W["compiler"] = khg.TrainingGraphCompiler(tm, ctx_dep, lex, lang.disambig_phone_ids, opts)
    _W.update(model=model, tm=tm, ctx_dep=ctx_dep, lex=lex, model_path=path)
    _W["tid2pdf"], pdf2phone = transition_tables(tm)
    _W["pdf2phone"] = pdf2phone
    _W["sil_pdfs"] = np.nonzero(np.isin(pdf2phone, lang.silence_phone_ids))[0]


def _align_one(utt: str, feats: np.ndarray, mode: str) -> tuple[np.ndarray | None, str | None, int, np.ndarray | None]:
    """``(transition-id alignment, None, retried, pdf log-likelihoods (T, P) or None)`` of one
    utterance, or ``(None, reason, retried, None)``."""
    cfg: GmmConfig = _W["cfg"]
    model: GmmModel = _W["model"]
    words = _W["texts"][utt]
    t = feats.shape[0]
    need = sum(_W["word_min"][w] for w in words)
    if t < need:
        return None, f"too short: {t} frames, its {len(words)} word(s) need at least {need}", 0, None
    graph = _W["compiler"].compile_graph_from_text(words)
    if graph.num_states == 0:
        return None, "empty training graph (transcript not accepted by L)", 0, None
    if mode == "equal":
        seed = zlib.crc32(f"{cfg.seed}:{utt}".encode()) & 0x7FFFFFFF
        ok, path = kaldifst.equal_align(graph, t, seed)
        if not ok:
            return None, f"equal alignment failed ({t} frames)", 0, None
        _, ali, _, _ = kaldifst.get_linear_symbol_sequence(path)
        ali = np.asarray(ali, np.int64)
        pdf_ll = None
        retried = 0
    else:
        lang: Lang = _W["lang"]
        phones = set(lang.silence_phone_ids)
        for w in set(words):
            phones.update(_W["word_phones"][w])
        pdfs = np.nonzero(np.isin(_W["pdf2phone"], sorted(phones)))[0]
        pdf_ll = np.full((t, model.num_pdfs), -1e5)
        pdf_ll[:, pdfs] = model.loglikes(feats, pdfs)
        if cfg.boost_silence != 1.0:
            pdf_ll[:, _W["sil_pdfs"]] += math.log(cfg.boost_silence)
        mat = (cfg.acoustic_scale * pdf_ll[:, _W["tid2pdf"][1:]]).astype(np.float32)  # (T, num_tids)
        dec = khg.DecodableCtc(mat)
        acfg = khg.AlignConfig(beam=cfg.beam, retry_beam=cfg.retry_beam, careful=False)
        done, err, retried, _, _, ali, _ = khg.align_utterance_wrapper(acfg, utt, cfg.acoustic_scale, graph, dec,
                                                                       0, 0, 0, 0.0, 0)
        if err or not done or len(ali) == 0:
            return None, f"alignment failed (beam {cfg.beam:g}, retry beam {cfg.retry_beam:g})", retried, None
        ali = np.asarray(ali, np.int64)
    if len(ali) != t:
        return None, f"alignment has {len(ali)} frames, features have {t}", retried, None
    return ali, None, retried, pdf_ll


def _worker_task(task: tuple[str, str, list[str], list[np.ndarray] | None]) -> dict:
    """One chunk of utterances. Modes: ``equal`` (equal alignment + stats), ``realign`` (Viterbi
    alignment + stats), ``acc`` (stats on the given alignments), ``align`` (alignment only)."""
    mode, model_path, utts, given = task
    _load_worker_model(model_path)
    model: GmmModel = _W["model"]
    tm = _W["tm"]
    st = _Stats.zeros(model.num_gauss, model.dim, tm.num_transition_ids) if mode != "align" else None
    alis: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    likes: dict[str, float] = {}
    retried = 0
    for i, utt in enumerate(utts):
        feats = _W["source"].feats(utt)
        if mode == "acc":
            ali = given[i]
        else:
            ali, reason, r, pdf_ll = _align_one(utt, feats, mode)
            retried += r
            if ali is None:
                failed[utt] = reason
                continue
            alis[utt] = ali.astype(np.int32)
        pdf_ali = _W["tid2pdf"][ali]
        if st is not None:
            likes[utt] = _accumulate(model, feats, pdf_ali, ali, st)
        else:
            likes[utt] = float(pdf_ll[np.arange(len(pdf_ali)), pdf_ali].sum())
    return {"stats": st, "alis": alis, "failed": failed, "likes": likes, "retried": retried}


class _Runner:
    """Runs chunk tasks in order in a pool of ``nj`` spawned worker processes.

    Workers are always separate processes, even for nj = 1: they start with one BLAS thread
    (``OPENBLAS_NUM_THREADS=1``), which is 5-10x faster for these small products on a shared
    machine than numpy's default thread pool, and it never oversubscribes the cores.
    """

    def __init__(self, nj: int, init_args: tuple) -> None:
        self.nj = nj
        saved = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        for k in saved:
            os.environ[k] = "1"
        try:
            self.pool = multiprocessing.get_context("spawn").Pool(nj, initializer=_worker_init, initargs=init_args)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def run(self, tasks: list[tuple], total_utts: int, desc: str) -> Iterator[dict]:
        from tqdm import tqdm

        it = self.pool.imap(_worker_task, tasks)
        with tqdm(total=total_utts, desc=desc, unit="utt", leave=False, disable=None) as bar:
            for task, res in zip(tasks, it):
                bar.update(len(task[2]))
                yield res

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None


def _run_pass(runner: _Runner, mode: str, model_path: Path, utts: list[str], cfg: GmmConfig,
              alis: dict[str, np.ndarray] | None, model: GmmModel, num_tids: int, desc: str) -> dict:
    n = cfg.chunk_utts
    chunks = [utts[i:i + n] for i in range(0, len(utts), n)]
    tasks = [(mode, str(model_path), c, [alis[u] for u in c] if mode == "acc" else None) for c in chunks]
    st = _Stats.zeros(model.num_gauss, model.dim, num_tids) if mode != "align" else None
    out = {"stats": st, "alis": {}, "failed": {}, "likes": {}, "retried": 0}
    for res in runner.run(tasks, len(utts), desc):
        if st is not None:
            st.add(res["stats"])
        out["alis"].update(res["alis"])
        out["failed"].update(res["failed"])
        out["likes"].update(res["likes"])
        out["retried"] += res["retried"]
    return out


# --------------------------------------------------------------------------------------------
# Training and alignment



def _transcripts(manifest_path: Path, source: _FeatureSource, lang: Lang) -> tuple[dict[str, list[int]], dict[str, str], dict]:
    """Word ids of every utterance with features; utterances that cannot be used, with the reason."""
    utts = {u.id: u for u in read_manifest(manifest_path)}
    texts: dict[str, list[int]] = {}
    failed: dict[str, str] = {}
    oov_tokens = 0
    oov_words: dict[str, int] = {}
    num_words = 0
    for uid in source.store.ids:
        u = utts.get(uid)
        if u is None:
            failed[uid] = f"no transcript in {manifest_path}"
            continue
        if not u.words:
            failed[uid] = "empty transcript"
            continue
        for w in u.words:
            num_words += 1
            if w not in lang.word2id or w in ("<eps>", "#0", "<s>", "</s>"):
                oov_tokens += 1
                oov_words[w] = oov_words.get(w, 0) + 1
        texts[uid] = lang.words_to_ids(u.words)
    for uid in sorted(set(utts) - set(source.store.ids)):
        failed[uid] = f"no features in {source.store.dir}"
    top = sorted(oov_words.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    stats = {"num_words": num_words, "num_oov_words": oov_tokens, "oov_examples": dict(top)}
    if oov_tokens:
        log.info("%d of %d words not in the lexicon map to %s (e.g. %s)", oov_tokens, num_words, lang.unk_word,
                 ", ".join(w for w, _ in top[:5]))
    return texts, failed, stats


def _write_train_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def estimate(runner: "_Runner", model: GmmModel, tm: khg.TransitionModel, subset: list[str], cfg: GmmConfig,
             out_dir: Path, first_mode: str) -> GmmModel:
    """The estimation passes shared by the monophone and the triphone GMM (Kaldi's train_mono.sh /
    train_deltas.sh loop): pass 0 in ``first_mode`` (``equal`` from a flat start, ``realign`` from
    a tree-initialised model), later passes realign on ``cfg.realign_iters`` or re-accumulate;
    each ends with an ML update of transitions and Gaussians and a split towards the Gaussian
    budget. Writes ``out_dir/final.mdl`` and ``out_dir/log/train.csv``; returns the final model."""
    rng = np.random.default_rng(cfg.seed)
    num_gauss = float(model.num_pdfs)
    inc_gauss = max(0.0, (cfg.total_gauss - num_gauss) / max(cfg.max_iter_inc, 1))
    alis: dict[str, np.ndarray] = {}
    rows: list[dict] = []
    model_path = out_dir / "0.mdl"
    model.save(model_path)
    t_start = time.time()
    for it in range(cfg.num_iters):
        t0 = time.time()
        mode = first_mode if it == 0 else ("realign" if it in cfg.realign_iters else "acc")
        utts = subset if mode != "acc" else sorted(alis)
        res = _run_pass(runner, mode, model_path, utts, cfg, alis, model, tm.num_transition_ids,
                        f"gmm pass {it} ({mode})")
        if mode != "acc":
            alis = res["alis"]
        st: _Stats = res["stats"]
        if st.frames == 0:
            raise GmmError(f"pass {it}: no utterance could be aligned ({len(res['failed'])} failed, e.g. "
                           f"{next(iter(res['failed'].items()), ('', ''))})")
        # ML update of transitions and Gaussians, then split towards the Gaussian budget
        tm.mle_update(st.trans, khg.MleTransitionUpdateConfig(floor=cfg.transition_floor,
                                                              mincount=cfg.transition_mincount))
        pdf_occs = np.add.reduceat(st.occ, model.offsets[:-1])  # (P,) under the model of this pass
        model = _mle_update(model, st, cfg)
        model = _mix_up(model, pdf_occs, int(num_gauss), cfg, rng)
        model = model.replace(transition_log_probs=np.array(tm.log_probs))
        if it >= 1 and it <= cfg.max_iter_inc:
            num_gauss = min(num_gauss + inc_gauss, float(cfg.total_gauss))
        new_path = out_dir / f"{it + 1}.mdl"
        model.save(new_path)
        if model_path.name != "0.mdl":
            model_path.unlink(missing_ok=True)
        model_path = new_path
        row = {"pass": it, "mode": mode, "utts": len(utts) - len(res["failed"]), "frames": st.frames,
               "avg_loglike": round(st.like / st.frames, 4), "num_gauss": model.num_gauss,
               "failed": len(res["failed"]), "retried": res["retried"], "seconds": round(time.time() - t0, 2)}
        rows.append(row)
        log.info("pass %d (%s): avg log-like/frame %.3f over %d frames, %d Gaussians, %d failed, %.1fs",
                 it, mode, row["avg_loglike"], st.frames, model.num_gauss, row["failed"], row["seconds"])
        _write_train_log(out_dir / "log" / "train.csv", rows)
    model.save(out_dir / "final.mdl")
    model_path.unlink(missing_ok=True)
    log.info("training took %.1fs", time.time() - t_start)
    return model


def training_subset(manifest_path: Path, feats_dir: str | os.PathLike, source: "_FeatureSource", lang: Lang,
                    subset_utts: int) -> tuple[dict[str, list[int]], list[str]]:
    """(transcripts as word ids, the ``subset_utts`` shortest utterances that GMM training uses;
    all when 0): a flat start learns fastest from short utterances, as Kaldi's train_mono does."""
    texts, _, _ = _transcripts(manifest_path, source, lang)
    if not texts:
        raise GmmError(f"{manifest_path}: no utterance has both features in {feats_dir} and a transcript")
    order = sorted(texts, key=lambda u: (source.num_frames(u), u))
    return texts, sorted(order[:subset_utts] if subset_utts > 0 else order)


def train_mono(
    feats_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    lang_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: GmmConfig = GmmConfig(),
    nj: int = 1,
    ali_dir: str | os.PathLike | None = None,
) -> Path:
    """Train a monophone GMM-HMM from a flat start and align the whole training set.

    Writes ``out_dir/final.mdl`` (see ``GmmModel``), ``out_dir/log/train.csv`` (per pass: realigned
    or not, Gaussians, average log-likelihood per frame, failures, seconds), ``config.yaml`` and the
    training-set labels with priors in ``ali_dir`` (default ``out_dir/ali_train``).
    """
    feats_dir, manifest_path, lang_dir, out_dir = Path(feats_dir), Path(manifest_path), Path(lang_dir), Path(out_dir)
    ali_dir = Path(ali_dir) if ali_dir is not None else out_dir / "ali_train"
    lang = load_lang(lang_dir)
    if nj < 1:
        raise ValueError(f"nj must be >= 1, got {nj}")
    (out_dir / ".done").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "log").mkdir(exist_ok=True)
    write_config(cfg, out_dir)

    source = _FeatureSource(feats_dir, cfg)
    texts, subset = training_subset(manifest_path, feats_dir, source, lang, cfg.subset_utts)
    num_frames = sum(source.num_frames(u) for u in subset)
    log.info("training on %d of %d utterances (%d frames), %d passes, up to %d Gaussians, nj=%d",
             len(subset), len(texts), num_frames, cfg.num_iters, cfg.total_gauss, nj)

    # gmm-init-mono: all pdfs = the global Gaussian of (a sample of) the training features
    sample = np.concatenate([source.feats(u) for u in subset[:200]])
    tm = lang.transition_model()
    model = GmmModel.flat(lang.num_pdfs, sample.mean(0), np.maximum(sample.var(0), cfg.min_variance), tm,
                          (lang.dir / "topo").read_text(), lang.real_phone_ids, config_to_dict(cfg))
    if model.dim != cfg.feature_dim:
        raise GmmError(f"feature dim {model.dim} != configured {cfg.feature_dim}")
    with _Runner(nj, (str(feats_dir), str(lang_dir), {u: texts[u] for u in subset}, cfg)) as runner:
        estimate(runner, model, tm, subset, cfg, out_dir, first_mode="equal")
    log.info("aligning all %d training utterances", len(texts))
    align(out_dir, lang_dir, feats_dir, manifest_path, ali_dir, nj=nj, train_labels=True, cfg=cfg)
    mark_done(out_dir)
    return out_dir


def align(
    model_dir: str | os.PathLike,
    lang_dir: str | os.PathLike,
    feats_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    nj: int = 1,
    train_labels: bool = False,
    cfg: GmmConfig | None = None,
) -> Path:
    """Force-align every utterance of a set and write ``ali/<set>/`` (docs/FORMATS.md "Frame labels").

    ``train_labels``: this is the training set, so ``priors.npy`` is counted from these labels.
    ``cfg``: alignment settings (beams, boost, prior floor); None takes the model's training config.
    Feature settings always come from the model.
    """
    model_dir, lang_dir, feats_dir, out_dir = Path(model_dir), Path(lang_dir), Path(feats_dir), Path(out_dir)
    manifest_path = Path(manifest_path)
    model_file = _model_path(model_dir)
    model = GmmModel.load(model_file)
    mcfg = _model_config(model)
    if cfg is None:
        cfg = mcfg
    else:
        changed = [f for f in _FEATURE_FIELDS if getattr(cfg, f) != getattr(mcfg, f)]
        if changed:
            raise GmmError(f"feature settings {changed} differ from those of model {model_file}")
    lang = load_lang(lang_dir)
    tm = model.transition_model()
    if model.tree is None and lang.num_pdfs != model.num_pdfs:
        raise GmmError(f"model {model_file} has {model.num_pdfs} pdfs, lang {lang_dir} has {lang.num_pdfs}")
    if sorted(tm.phones) != lang.real_phone_ids:
        raise GmmError(f"model {model_file} and lang {lang_dir} have different phone sets")
    (out_dir / ".done").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out_dir)

    t0 = time.time()
    source = _FeatureSource(feats_dir, cfg)
    texts, failed, oov = _transcripts(manifest_path, source, lang)
    utts = sorted(texts)
    with _Runner(nj, (str(feats_dir), str(lang_dir), texts, cfg)) as runner:
        res = _run_pass(runner, "align", model_file, utts, cfg, None, model, 0, f"align {out_dir.name}")
    failed.update(res["failed"])

    store = source.store
    tid2pdf, pdf2phone = transition_tables(tm)
    labels = np.full(store.num_frames_total, -1, np.int32)
    pos = {u: k for k, u in enumerate(store.ids)}
    sil_pdfs = np.nonzero(np.isin(pdf2phone, lang.silence_phone_ids))[0]
    opt_sil_pdfs = np.nonzero(pdf2phone == lang.optional_silence_id)[0]
    last_sil = first_sil = 0
    for u, ali in res["alis"].items():
        k = pos[u]
        off, n = int(store.offsets[k]), int(store.lengths[k])
        if len(ali) != n:  # checked in the worker too; a mismatch here is a bug, never a silent shift
            raise GmmError(f"{u}: alignment has {len(ali)} frames, features have {n}")
        pdfs = tid2pdf[ali]
        labels[off:off + n] = pdfs
        first_sil += int(pdfs[0] in sil_pdfs)
        last_sil += int(pdfs[-1] in sil_pdfs)
    aligned = labels[labels >= 0]
    num_aligned = len(res["alis"])
    total_like = sum(res["likes"].values())
    info = {
        "num_aligned": num_aligned,
        "avg_loglike": round(total_like / max(aligned.size, 1), 4),
        "silence_share": round(float(np.isin(aligned, opt_sil_pdfs).mean()) if aligned.size else 0.0, 4),
        "first_frame_silence_share": round(first_sil / max(num_aligned, 1), 4),
        "last_frame_silence_share": round(last_sil / max(num_aligned, 1), 4),
        "num_retried": res["retried"],
        **oov,
        "model": str(model_file.resolve()),
        "seconds": round(time.time() - t0, 2),
    }
    write_labels(out_dir, labels, failed, model.num_pdfs, len(store.ids),
                 priors_floor=cfg.prior_floor if train_labels else None, extra_info=info)
    if failed:
        log.warning("%s: %d utterance(s) left out, listed in %s", out_dir, len(failed), out_dir / "failed.txt")
    log.info("%s: %d utterances aligned, %d failed, silence share %.3f, %.1fs", out_dir, num_aligned, len(failed),
             info["silence_share"], info["seconds"])
    mark_done(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# CLI


def _add_config_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--nj", type=int, default=1, help="worker processes")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-gmm", help="flat-start monophone GMM-HMM training + training-set alignment")
    p.add_argument("--feats-dir", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--lang-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--ali-dir", default=None, help="where the training labels go (default OUT_DIR/ali_train)")
    _add_config_args(p)
    p.set_defaults(func=_cli_train)

    p = subparsers.add_parser("align", help="forced alignment -> frame labels (ali/<set>/)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--lang-dir", required=True)
    p.add_argument("--feats-dir", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--train-labels", action="store_true", help="training set: also write priors.npy")
    _add_config_args(p)
    p.set_defaults(func=_cli_align)


def _cli_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(GmmConfig, args)
    train_mono(args.feats_dir, args.manifest, args.lang_dir, args.out_dir, cfg, nj=args.nj, ali_dir=args.ali_dir)
    return 0


def _cli_align(args: argparse.Namespace) -> int:
    cfg = None
    if args.config or args.overrides:
        base = _model_config(GmmModel.load(_model_path(args.model_dir)))
        cfg = config_from_args(GmmConfig, args)
        cfg = dataclasses.replace(cfg, **{f: getattr(base, f) for f in _FEATURE_FIELDS
                                          if f not in parse_kv(args.overrides)})
    align(args.model_dir, args.lang_dir, args.feats_dir, args.manifest, args.out_dir, nj=args.nj,
          train_labels=args.train_labels, cfg=cfg)
    return 0
