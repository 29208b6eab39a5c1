"""The GMM-HMM acoustic model: its config, diagonal GMMs with a Kaldi transition model, and the
statistics and maximum-likelihood re-estimation the training passes use.

The HMM side is kaldi-hmm-gmm (topology, transition model, context dependency). The Gaussian side
(likelihoods, statistics, ML re-estimation, Gaussian splitting) is numpy: it is vectorised over
frames, and it is deterministic for a seed, which Kaldi's splitting (global C ``rand()``) is not
inside one process. Training is ``asr.gmm`` (monophone) and ``asr.tri`` (triphone); alignment is
``asr.align``; the features are ``asr.cepstra``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import kaldi_hmm_gmm as khg  # noqa: I001  (must be imported before kaldifst)

from asr.cepstra import GmmFeatureSource
from asr.config import load_config
from asr.io import atomic_path

__all__ = [
    "GmmConfig",
    "GmmError",
    "GmmModel",
    "GmmScorer",
    "load_model",
    "gmm_loglikes",
    "transition_tables",
    "set_transition_log_probs",
]

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
        set_transition_log_probs(tm, self.transition_log_probs)
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


def set_transition_log_probs(tm: khg.TransitionModel, log_probs: np.ndarray) -> None:
    """Give ``tm`` the transition probabilities ``exp(log_probs)`` (index 0 unused). The bindings
    have no setter, so one ML update whose counts are those probabilities, with no floor and no
    minimum count, reproduces them."""
    stats = np.exp(np.asarray(log_probs, dtype=np.float64)) * 1e6
    stats[0] = 0.0
    tm.mle_update(stats, khg.MleTransitionUpdateConfig(floor=1e-30, mincount=0.0))


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
        self.source = GmmFeatureSource(feats_dir, _model_config(self.model))

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
