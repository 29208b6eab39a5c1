"""Distillation (Hinton, Vinyals & Dean 2015, section 4): soft targets from the ensemble, one student.

Soft targets at temperature ``T`` are the mean over the teachers of ``softmax(logits / T)``. They
come from a :class:`SoftTargetSource`:

- :class:`TeacherEnsemble` runs the teacher stack inside the student's training loop on the same
  spliced batch (exact; eval mode; no gradients). Its logits are kept for the current batch, so
  students at several temperatures share one teacher pass.
- :class:`TopKCache` reads targets written once by :func:`write_soft_target_caches`: per frame the
  ``k`` largest probabilities (fp16) and their pdf ids (int16 / int32) plus the remaining mass
  (fp32). As a target, the remaining mass is spread uniformly over the pdfs outside the top k.
  Dense caching does not scale (docs/docs/DESIGN.md section 3: ~300 GB on train-clean-100), top-k does.

The student loss (per student ``m``, mean over labelled rows of the batch)::

    T_m^2 * CE(q_T, softmax(z_m / T_m)) + hard_weight * CE(labels, softmax(z_m))

The ``T^2`` keeps the soft term's gradient magnitude comparable across temperatures (the paper's
scaling). Students for several temperatures train *stacked* in one :func:`asr.train.train_stack`
call (member ``m`` uses ``temperatures[m]``), so a temperature sweep costs one data pass.

The reported student is chosen on dev *frame accuracy* (written to ``choice.json``): it is what
the student is trained to improve, it needs no decoding of every student, and it is the quantity
whose gain the paper reports as kept. Test sets are never looked at.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from asr.config import add_config_args, config_from_args, config_hash, load_config, parse_kv, write_config
from asr.io import atomic_path, atomic_write_json, is_done, mark_done, read_json
from asr.augment import AugmentConfig
from asr.models import StackedModel, load_model, load_stack

if TYPE_CHECKING:  # pragma: no cover
    from asr.frames import FrameBatch, FrameData

__all__ = [
    "DistillError",
    "DistillConfig",
    "SoftTargetConfig",
    "SoftTargetSource",
    "TeacherEnsemble",
    "TopKTargets",
    "TopKCache",
    "DistillObjective",
    "soft_targets",
    "topk_from_probs",
    "dense_from_topk",
    "compute_topk_targets",
    "write_topk",
    "read_topk",
    "write_soft_target_caches",
    "temperature_name",
    "distill",
    "add_cli",
]

log = logging.getLogger(__name__)


class DistillError(ValueError):
    """Soft targets, teachers and students do not fit together; the message names the file."""


def temperature_name(t: float) -> str:
    """``T2`` for 2.0, ``T0.5`` for 0.5: the directory / system suffix of a temperature."""
    return f"T{float(t):g}"


# ---------------------------------------------------------------------------------------------
# Soft targets


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Ensemble soft targets: ``mean_m softmax(logits[m] / T)``.

    logits: ``(M, rows, pdfs)`` teacher logits. Returns ``(rows, pdfs)`` float32 probabilities.
    """
    if logits.dim() != 3:
        raise ValueError(f"teacher logits must be (members, rows, pdfs), got {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return torch.softmax(logits.float() / temperature, dim=-1).mean(dim=0)


@dataclass
class BucketTargets:
    """Soft targets known only on a support (the cached top k) plus the mass outside it.

    probs: ``(rows, pdfs)``, zero outside ``support``; support: ``(rows, pdfs)`` bool; rest:
    ``(rows,)`` target mass outside the support. The loss treats everything outside the support as
    one "rest" class (its student probability is the student's own mass there), so nothing is
    assumed about how the teachers spread the tail: a uniform spread would turn the dark knowledge
    of high temperatures into a flat floor.
    """

    probs: torch.Tensor
    support: torch.Tensor
    rest: torch.Tensor

    def to(self, device: torch.device) -> "BucketTargets":
        return BucketTargets(self.probs.to(device), self.support.to(device), self.rest.to(device))

    @property
    def shape(self) -> torch.Size:
        return self.probs.shape


@runtime_checkable
class SoftTargetSource(Protocol):
    """Anything that gives soft targets for a batch at temperature T: ``(rows, pdfs)``
    probabilities, or :class:`BucketTargets` when only a top k is known."""

    def targets(self, batch: "FrameBatch", temperature: float) -> "torch.Tensor | BucketTargets": ...


class TeacherEnsemble:
    """Soft targets computed on the fly by the teacher stack (exact).

    The teacher runs in eval mode without gradients on ``batch.x``; its logits for the latest
    batch are kept, so asking for several temperatures of the same batch costs one forward pass.
    """

    def __init__(self, model: StackedModel, bf16: bool = False) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.bf16 = bool(bf16)        # forward passes under bf16 autocast (CUDA, CPUs with avx512_bf16)
        self._last_x: torch.Tensor | None = None
        self._last_logits: torch.Tensor | None = None

    @classmethod
    def from_paths(cls, paths: Sequence[str | os.PathLike], device: str | torch.device = "cpu",
                   bf16: bool = False) -> "TeacherEnsemble":
        return cls(load_stack(paths).to(device), bf16=bf16)

    @property
    def num_pdfs(self) -> int:
        return self.model.num_pdfs

    def logits(self, batch: "FrameBatch") -> torch.Tensor:
        """``(M, rows, pdfs)`` teacher logits for ``batch`` (cached for the latest batch)."""
        if self._last_x is not batch.x:
            p0 = next(self.model.parameters())
            if p0.device != batch.x.device:
                self.model.to(batch.x.device)
            with torch.no_grad(), torch.autocast(batch.x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                self._last_logits = self.model(batch.x.to(p0.dtype)).float()
            self._last_x = batch.x
        return self._last_logits  # type: ignore[return-value]

    def targets(self, batch: "FrameBatch", temperature: float) -> torch.Tensor:
        return soft_targets(self.logits(batch), temperature)


@dataclass
class TopKTargets:
    """Top-k soft targets of a whole data set at one temperature (the ``topk_T<T>.npz`` content).

    On disk (``np.savez``, no pickle): ``values``, ``indices``, ``rest``, ``T``, ``k``, ``num_pdfs``.

    values: ``(N, k)`` float16 probabilities, largest first; indices: ``(N, k)`` int16 (int32 when
    there are more than 32767 pdfs) pdf ids; rest: ``(N,)`` float32 probability mass outside the
    top k (``1 - sum(values)`` computed from the stored fp16 values, so a row sums to one).
    """

    values: np.ndarray
    indices: np.ndarray
    rest: np.ndarray
    temperature: float
    k: int
    num_pdfs: int

    def __post_init__(self) -> None:
        n = self.values.shape[0] if self.values.ndim == 2 else -1
        if self.values.shape != (n, self.k) or self.indices.shape != (n, self.k) or self.rest.shape != (n,):
            raise DistillError(f"top-k arrays disagree: values {self.values.shape}, indices "
                               f"{self.indices.shape}, rest {self.rest.shape}, k={self.k}")
        if not 1 <= self.k <= self.num_pdfs:
            raise DistillError(f"k={self.k} must be in 1..num_pdfs={self.num_pdfs}")

    @property
    def num_frames(self) -> int:
        return int(self.values.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.indices.nbytes + self.rest.nbytes)


def _index_dtype(num_pdfs: int) -> np.dtype:
    return np.dtype(np.int16) if num_pdfs <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def topk_from_probs(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, pdfs)`` probabilities -> fp16 values ``(rows, k)``, int indices, fp32 rest ``(rows,)``."""
    if probs.dim() != 2:
        raise ValueError(f"probs must be (rows, pdfs), got {tuple(probs.shape)}")
    num_pdfs = probs.shape[1]
    if not 1 <= k <= num_pdfs:
        raise ValueError(f"k={k} must be in 1..{num_pdfs}")
    vals, idx = torch.topk(probs.float(), k, dim=1)
    v16 = vals.to(torch.float16).cpu().numpy()
    rest = np.clip(1.0 - v16.astype(np.float32).sum(axis=1), 0.0, None).astype(np.float32)
    return v16, idx.cpu().numpy().astype(_index_dtype(num_pdfs)), rest


def dense_from_topk(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, num_pdfs: int) -> torch.Tensor:
    """Dense ``(rows, num_pdfs)`` float32 targets: top-k values in place, ``rest`` spread uniformly
    over the other ``num_pdfs - k`` pdfs (dropped when k = num_pdfs)."""
    rows, k = values.shape
    if k < num_pdfs:
        fill = (rest.float() / (num_pdfs - k)).unsqueeze(1).expand(rows, num_pdfs).clone()
    else:
        fill = torch.zeros(rows, num_pdfs, device=values.device)
    return fill.scatter_(1, indices.long(), values.float())


def write_topk(path: str | os.PathLike, t: TopKTargets) -> Path:
    """Write a top-k cache as an uncompressed ``.npz`` (no pickle), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, values=t.values, indices=t.indices, rest=t.rest,
                     T=np.float64(t.temperature), k=np.int64(t.k), num_pdfs=np.int64(t.num_pdfs))
    return path


def read_topk(path: str | os.PathLike) -> TopKTargets:
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"soft-target cache {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("values", "indices", "rest", "T", "k", "num_pdfs") if k not in z.files]
        if missing:
            raise DistillError(f"{path}: not a top-k cache (missing {missing})")
        try:
            return TopKTargets(values=z["values"], indices=z["indices"], rest=z["rest"],
                               temperature=float(z["T"]), k=int(z["k"]), num_pdfs=int(z["num_pdfs"]))
        except DistillError as e:
            raise DistillError(f"{path}: {e}") from None


TAILS = ("bucket", "uniform")


class TopKCache:
    """Soft targets read from top-k caches, one per temperature, indexed by ``batch.frame_idx``.

    The caches cover the *training* set in its global frame order; asking for a temperature
    without a cache is an error (top-k probabilities cannot be re-tempered exactly). ``tail``:
    ``bucket`` (default) gives :class:`BucketTargets` (the mass outside the top k is one class);
    ``uniform`` spreads it evenly over the other pdfs (the first implementation, kept for the
    ablation).
    """

    def __init__(self, caches: Sequence[TopKTargets], tail: str = "bucket") -> None:
        if tail not in TAILS:
            raise DistillError(f"tail must be one of {TAILS}, got {tail!r}")
        self.tail = tail
        if not caches:
            raise DistillError("TopKCache needs at least one cache")
        n, p = caches[0].num_frames, caches[0].num_pdfs
        for c in caches:
            if (c.num_frames, c.num_pdfs) != (n, p):
                raise DistillError(f"caches disagree: {c.num_frames} frames x {c.num_pdfs} pdfs at "
                                   f"T={c.temperature} vs {n} x {p}")
        self.num_frames = n
        self.num_pdfs = p
        self._np = {float(c.temperature): c for c in caches}
        self._t: dict[tuple[float, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], tail: str = "bucket") -> "TopKCache":
        return cls([read_topk(p) for p in paths], tail=tail)

    @property
    def temperatures(self) -> list[float]:
        return sorted(self._np)

    def _tensors(self, temperature: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = next((x for x in self._np if math.isclose(x, temperature, rel_tol=1e-6)), None)
        if t is None:
            raise DistillError(f"no top-k cache for T={temperature}; caches exist for T={self.temperatures}")
        key = (t, str(device))
        if key not in self._t:
            c = self._np[t]
            self._t[key] = (torch.from_numpy(np.ascontiguousarray(c.values)).to(device),
                            torch.from_numpy(np.ascontiguousarray(c.indices)).to(device),
                            torch.from_numpy(np.ascontiguousarray(c.rest)).to(device))
        return self._t[key]

    def targets(self, batch: "FrameBatch", temperature: float) -> "torch.Tensor | BucketTargets":
        idx = batch.frame_idx
        values, indices, rest = self._tensors(temperature, idx.device)
        if idx.numel() and (int(idx.max()) >= self.num_frames or int(idx.min()) < 0):
            raise DistillError(f"frame index {int(idx.max())} outside the cache's {self.num_frames} frames "
                               "(is the batch from the set the cache was made for?)")
        if self.tail == "uniform":
            return dense_from_topk(values[idx], indices[idx], rest[idx], self.num_pdfs)
        rows = idx.numel()
        ind = indices[idx].long()
        probs = torch.zeros(rows, self.num_pdfs, device=idx.device).scatter_(1, ind, values[idx].float())
        support = torch.zeros(rows, self.num_pdfs, dtype=torch.bool, device=idx.device).scatter_(1, ind, True)
        return BucketTargets(probs, support, rest[idx].float())


@torch.no_grad()
def compute_topk_targets(
    teacher: StackedModel,
    data: "FrameData",
    temperatures: Sequence[float],
    k: int,
    batch_size: int = 4096,
    bf16: bool = False,
) -> list[TopKTargets]:
    """Run the teacher stack over every frame of ``data`` (in order) and keep the top k per frame.

    One teacher pass serves every temperature. Memory: ``batch_size x pdfs`` per member on the
    device plus the output arrays ``(N, k)`` on the host.
    """
    from asr.frames import splice

    if not temperatures:
        raise DistillError("no temperatures given")
    teacher = teacher.eval()
    device = data.feats.device
    teacher.to(device)
    left, right = teacher.context
    n, p = data.num_frames, teacher.num_pdfs
    if not 1 <= k <= p:
        raise DistillError(f"top-k size k={k} must be in 1..{p} (the teacher's pdfs)")
    outs = [(np.empty((n, k), np.float16), np.empty((n, k), _index_dtype(p)), np.empty(n, np.float32))
            for _ in temperatures]
    for start in tqdm(range(0, n, batch_size), desc="soft targets", disable=None):
        idx = torch.arange(start, min(n, start + batch_size), device=device)
        x = splice(data.feats, idx, left, right, data.utt_start, data.utt_end)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = teacher(x.float()).float()
        for (vals, inds, rest), t in zip(outs, temperatures):
            v, i, r = topk_from_probs(soft_targets(logits, t), k)
            vals[start:start + len(v)], inds[start:start + len(v)], rest[start:start + len(v)] = v, i, r
    return [TopKTargets(v, i, r, float(t), k, p) for (v, i, r), t in zip(outs, temperatures)]


@dataclass(frozen=True)
class SoftTargetConfig:
    temperatures: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)
    k: int = 20                       # top-k kept per frame (docs/docs/DESIGN.md section 3: 10..50)
    batch_size: int = 4096            # frames per teacher forward pass
    cmvn: str = "speaker"


def write_soft_target_caches(
    teacher_model_paths: Sequence[str | os.PathLike],
    feats_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: SoftTargetConfig | None = None,
    device: str = "cpu",
    data: "FrameData | None" = None,
    bf16: bool = False,
) -> list[Path]:
    """Write ``out_dir/topk_T<T>.npz`` for each temperature, plus ``info.json`` with the sizes.

    ``data``: the set of ``feats_dir`` already in memory (saves loading it a second time).

    ``info.json`` records the cache bytes, what dense fp16 caching would take, and the mean mass
    kept in the top k, so the size argument of docs/DESIGN.md section 3 is measured, not assumed.
    """
    from asr.frames import FrameData

    cfg = cfg or SoftTargetConfig()
    out_dir = Path(out_dir)
    paths = [out_dir / f"topk_{temperature_name(t)}.npz" for t in cfg.temperatures]
    h = config_hash(cfg)
    teachers = [str(p) for p in teacher_model_paths]
    if is_done(out_dir):
        info = read_json(out_dir / ".done")
        same_data = data is None or info.get("num_frames") == data.num_frames
        if info.get("config_hash") == h and info.get("teachers") == teachers and same_data \
                and all(p.is_file() for p in paths):
            log.info("%s is done; skipping", out_dir)
            return paths
        (out_dir / ".done").unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out_dir)
    teacher = load_stack(teacher_model_paths)
    if data is None:
        data = FrameData.from_dirs(feats_dir, None, cmvn=cfg.cmvn, device=device)
    caches = compute_topk_targets(teacher, data, cfg.temperatures, cfg.k, cfg.batch_size, bf16=bf16)
    info: dict[str, Any] = {"num_frames": data.num_frames, "num_pdfs": teacher.num_pdfs, "k": cfg.k,
                            "dense_fp16_bytes": 2 * data.num_frames * teacher.num_pdfs, "caches": {}}
    for c, p in zip(caches, paths):
        write_topk(p, c)
        info["caches"][temperature_name(c.temperature)] = {
            "file": p.name, "bytes": p.stat().st_size, "array_bytes": c.nbytes,
            "mean_topk_mass": float(1.0 - c.rest.mean()) if c.num_frames else None,
        }
        log.info("%s: %.1f MB (dense fp16 would be %.1f MB); mean top-%d mass %.4f", p,
                 p.stat().st_size / 1e6, info["dense_fp16_bytes"] / 1e6, cfg.k,
                 info["caches"][temperature_name(c.temperature)]["mean_topk_mass"] or float("nan"))
    atomic_write_json(out_dir / "info.json", info)
    mark_done(out_dir, {"config_hash": h, "teachers": teachers, "num_frames": data.num_frames})
    return paths


# ---------------------------------------------------------------------------------------------
# Objective


def soft_cross_entropy(targets: "torch.Tensor | BucketTargets", log_p: torch.Tensor) -> torch.Tensor:
    """``(rows,)`` cross-entropy of student log-probabilities ``log_p`` ``(rows, pdfs)`` against
    soft targets; with :class:`BucketTargets` the mass outside the support is one class."""
    if isinstance(targets, BucketTargets):
        tail = torch.logsumexp(log_p.masked_fill(targets.support, float("-inf")), dim=-1)   # (rows,)
        return -(targets.probs * log_p).sum(dim=-1) - targets.rest * tail.clamp(min=-80.0)
    return -(targets * log_p).sum(dim=-1)


class DistillObjective:
    """Soft + hard cross-entropy for a stack of students, one temperature per student.

    Satisfies :class:`asr.train.Objective`: ``(logits (M, rows, pdfs), batch) -> (M,)``. Per student
    ``m``, averaged over all rows of the batch::

        T_m^2 * CE(q_T, softmax(z_m / T_m))  +  hard_weight * CE(label, softmax(z_m)) [labelled rows]

    Soft targets need no label, so ``needs_labels`` is False: unlabelled transfer frames (and
    frames whose alignment failed) train the student through the soft term alone.

    ``augment`` (an :class:`asr.augment.AugmentConfig`): ``prepare`` augments each training batch
    once, before the forward pass; the teachers (an online source) then see exactly the student's
    input. ``eval_source``: where dev batches get their targets (a top-k cache covers training
    frames only); :meth:`for_evaluation` returns that objective, without augmentation.
    """

    needs_labels = False

    def __init__(self, temperatures: Sequence[float], hard_weight: float, source: SoftTargetSource,
                 eval_source: SoftTargetSource | None = None, augment: Any = None, feat_dim: int = 0) -> None:
        if not temperatures:
            raise ValueError("DistillObjective needs one temperature per student")
        if any(not t > 0 for t in temperatures):
            raise ValueError(f"temperatures must be positive, got {list(temperatures)}")
        if hard_weight < 0:
            raise ValueError(f"hard_weight must be >= 0, got {hard_weight}")
        if augment is not None and augment.enabled and feat_dim <= 0:
            raise ValueError("augmentation needs the feature dimension of the spliced windows")
        self.temperatures = [float(t) for t in temperatures]
        self.hard_weight = float(hard_weight)
        self.source = source
        self.eval_source = eval_source
        self.augment = augment if augment is not None and augment.enabled else None
        self.feat_dim = int(feat_dim)

    def for_evaluation(self) -> "DistillObjective":
        """The objective for dev batches: targets from ``eval_source`` (if any), no augmentation."""
        return DistillObjective(self.temperatures, self.hard_weight, self.eval_source or self.source)

    def prepare(self, batch: "FrameBatch", generator: torch.Generator) -> "FrameBatch":
        """Augment a training batch once; teachers and student both see the result."""
        if self.augment is None:
            return batch
        from asr.augment import augment_windows
        from asr.frames import FrameBatch

        return FrameBatch(x=augment_windows(batch.x, self.feat_dim, self.augment, generator),
                          labels=batch.labels, frame_idx=batch.frame_idx)

    def __call__(self, logits: torch.Tensor, batch: "FrameBatch") -> torch.Tensor:
        if logits.dim() != 3 or logits.shape[0] != len(self.temperatures):
            raise ValueError(f"expected logits (M={len(self.temperatures)}, rows, pdfs), got {tuple(logits.shape)}")
        rows = logits.shape[1]
        if rows != batch.labels.shape[0]:
            raise ValueError(f"logits have {rows} rows but the batch has {batch.labels.shape[0]} labels")
        labelled = (batch.labels >= 0).to(torch.float32)
        labels = batch.labels.clamp(min=0)
        targets: dict[float, Any] = {}
        losses = []
        for m, t in enumerate(self.temperatures):
            if t not in targets:
                q = self.source.targets(batch, t).to(logits.device)
                if q.shape != logits.shape[1:]:
                    raise DistillError(f"soft targets {tuple(q.shape)} do not match student logits "
                                       f"{tuple(logits.shape[1:])}")
                targets[t] = q
            z = logits[m].float()                                               # (rows, pdfs)
            soft = soft_cross_entropy(targets[t], F.log_softmax(z / t, dim=-1))  # (rows,)
            per_row = (t * t) * soft
            if self.hard_weight:
                per_row = per_row + self.hard_weight * labelled * F.cross_entropy(z, labels, reduction="none")
            losses.append(per_row.sum() / max(rows, 1))
        return torch.stack(losses)


# ---------------------------------------------------------------------------------------------
# The distillation stage


@dataclass(frozen=True)
class DistillConfig:
    temperatures: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)   # one student per temperature (stacked)
    hard_weight: float = 0.5          # weight of the hard-label CE (the paper's 0.5)
    seed: int = 1000                  # student init seed; the same for every T, so only T differs
    soft_targets: str = "online"      # online (teachers in the loop, exact) | cache (top-k files)
    topk: int = 20                    # cache mode: pdfs kept per frame
    tail: str = "bucket"              # cache mode: mass outside the top k is one class | uniform spread
    teacher_batch_size: int = 4096    # cache mode: frames per teacher pass when writing the caches
    cmvn: str = "speaker"
    # The student's schedule; None = the teachers' own (from their checkpoints). The stopping rule
    # is the members' (newbob on dev frame accuracy); epochs is only its safety cap.
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    dropout: Optional[float] = None
    threads: int = 0                  # torch threads (0: leave as is)
    transfer: bool = True             # learn from the --transfer-feats sets given (false: training frames only)
    train_frames: bool = True         # learn from the training frames too (false: the transfer sets only)
    # Function matching (online targets only): augmentation shared by teachers and student.
    freq_mask: int = 0
    time_mask: int = 0
    mixup: float = 0.0
    warp: float = 0.0
    diagnostics_frames: int = 50000   # training frames sampled for the agreement / KL diagnostics

    def __post_init__(self) -> None:
        if self.soft_targets not in ("online", "cache"):
            raise ValueError(f"soft_targets must be 'online' or 'cache', got {self.soft_targets!r}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
        if not self.temperatures or any(not t > 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be a non-empty list of positive numbers, got {self.temperatures}")
        if self.hard_weight < 0 or self.topk < 1:
            raise ValueError(f"hard_weight must be >= 0 and topk >= 1, got {self.hard_weight}, {self.topk}")
        if self.soft_targets == "cache" and self.augment.enabled:
            raise ValueError("augmentation needs online soft targets (a cache holds the targets of "
                             "un-augmented frames); set soft_targets: online")

    @property
    def augment(self) -> AugmentConfig:
        return AugmentConfig(freq_mask=self.freq_mask, time_mask=self.time_mask, mixup=self.mixup, warp=self.warp)


def _train_config_for(teacher_meta: dict, train_cfg: Any | None, overrides: dict | None = None) -> Any:
    """The student's TrainConfig: the given one, else the teachers' own (so arch and size match),
    with ``overrides`` on top either way."""
    from asr.config import apply_overrides
    from asr.train import TrainConfig

    if train_cfg is not None:
        return apply_overrides(train_cfg, overrides or {})
    stored = teacher_meta.get("train_config") or teacher_meta.get("config")
    if isinstance(stored, dict):
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        base = apply_overrides(TrainConfig(), {k: v for k, v in stored.items() if k in names})
        return apply_overrides(base, overrides or {})
    log.warning("teacher checkpoints carry no training config; using TrainConfig() defaults")
    return apply_overrides(TrainConfig(), overrides or {})


def _student_schedule(cfg: DistillConfig, train_cfg: Any) -> Any:
    """Apply the DistillConfig schedule fields that are set to the student's TrainConfig."""
    changes = {k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "dropout") if getattr(cfg, k) is not None}
    if cfg.threads:
        changes["threads"] = cfg.threads
    return dataclasses.replace(train_cfg, **changes) if changes else train_cfg


def _check_same_arch(student: StackedModel, teacher_path: Path, teacher: StackedModel) -> None:
    """Same layers and sizes; dropout is a training setting (the student's schedule), not a layer."""
    def shape(m: StackedModel) -> tuple:
        return dataclasses.replace(m.arch, dropout=0.0), m.input_feat_dim, m.num_pdfs

    if shape(student) != shape(teacher):
        raise DistillError(f"student architecture {student.arch} ({student.input_feat_dim} -> "
                           f"{student.num_pdfs}) differs from the teacher's in {teacher_path}: "
                           f"{teacher.arch} ({teacher.input_feat_dim} -> {teacher.num_pdfs})")


def _use_bf16(train_cfg: Any) -> bool:
    from asr.precision import uses_bf16

    return uses_bf16(torch.device(train_cfg.device), train_cfg.dtype)


def _student_data(train_cfg: Any, cfg: DistillConfig, train_feats_dir: str | os.PathLike,
                  train_ali_dir: str | os.PathLike, transfer_feats_dirs: Sequence[str | os.PathLike],
                  feat_dim: int) -> "tuple[FrameData, FrameData]":
    """(labelled training set, training set + unlabelled transfer frames): the second is what the
    students learn from; its first ``train.num_frames`` frames are the training set."""
    from asr.frames import FrameData
    from asr.train import features_dtype

    dtype = features_dtype(train_cfg)
    train = FrameData.from_dirs(train_feats_dir, train_ali_dir, cmvn=cfg.cmvn, device=train_cfg.device, dtype=dtype)
    if train.feat_dim != feat_dim:
        raise DistillError(f"{train_feats_dir}: features have dim {train.feat_dim}, the teachers expect {feat_dim}")
    parts = [train] if cfg.train_frames else []
    for d in transfer_feats_dirs:
        extra = FrameData.from_dirs(d, None, cmvn=cfg.cmvn, device=train_cfg.device, dtype=dtype)
        if extra.feat_dim != feat_dim:
            raise DistillError(f"{d}: transfer features have dim {extra.feat_dim}, the teachers expect {feat_dim}")
        parts.append(extra)
    if not parts:
        raise DistillError("train_frames: false needs transfer sets (--transfer-feats) to learn from")
    if len(parts) > 1 or not cfg.train_frames:
        n_transfer = sum(p.num_frames for p in parts) - (train.num_frames if cfg.train_frames else 0)
        log.info("students learn from %d unlabelled transfer frames%s", n_transfer,
                 f" and {train.num_frames} training frames" if cfg.train_frames else " only")
    return train, FrameData.concat(parts, num_pdfs=train.num_pdfs)


def _soft_target_source(cfg: DistillConfig, teachers: TeacherEnsemble, teacher_paths: Sequence[Path],
                        data: "FrameData", cache_dir: Path, device: str) -> SoftTargetSource:
    if cfg.soft_targets == "online":
        return teachers
    st_cfg = SoftTargetConfig(temperatures=tuple(cfg.temperatures), k=cfg.topk,
                              batch_size=cfg.teacher_batch_size, cmvn=cfg.cmvn)
    cache_paths = write_soft_target_caches(teacher_paths, "", cache_dir, st_cfg, device=device, data=data,
                                           bf16=teachers.bf16)
    cache = TopKCache.from_files(cache_paths, tail=cfg.tail)
    if cache.num_frames != data.num_frames:
        raise DistillError(f"{cache_dir}: caches hold {cache.num_frames} frames, the student's training "
                           f"data has {data.num_frames} (delete the cache to rebuild it)")
    return cache


def _run_hash(cfg: DistillConfig) -> str:
    """The config hash that names a distillation run: runtime fields (threads) may change between a
    run and its resume."""
    return config_hash(dataclasses.replace(cfg, threads=0))


def _write_choice(out_dir: Path, cfg: DistillConfig, names: Sequence[str], paths: Sequence[Path],
                  teacher_paths: Sequence[Path], dev_set: str) -> dict:
    """Per-student ``distill.json`` and the temperature chosen on dev frame accuracy (``choice.json``)."""
    accs = []
    for t, p in zip(cfg.temperatures, paths):
        atomic_write_json(p.parent / "distill.json", {"temperature": float(t), "hard_weight": cfg.hard_weight,
                                                      "seed": cfg.seed, "soft_targets": cfg.soft_targets,
                                                      "teachers": [str(x) for x in teacher_paths]})
        accs.append(100.0 * float(read_json(p.parent / "summary.json")["best_dev_acc"]))
    best = int(np.argmax(accs))
    choice = {"criterion": "dev frame accuracy", "dev_set": dev_set,
              "per_temperature": {f"{t:g}": a for t, a in zip(cfg.temperatures, accs)},
              "best_temperature": float(cfg.temperatures[best]), "best_dir": names[best],
              "hard_weight": cfg.hard_weight, "soft_targets": cfg.soft_targets}
    atomic_write_json(out_dir / "choice.json", choice)
    log.info("dev frame accuracy per temperature: %s; chosen %s", choice["per_temperature"], names[best])
    return choice


def _student_names(cfg: DistillConfig, teacher_model_paths: Sequence[str | os.PathLike]) -> list[str]:
    """The students' directory names (``T<T>``), after checking that there is something to distil."""
    names = [temperature_name(t) for t in cfg.temperatures]
    if len(set(names)) != len(names):
        raise ValueError(f"temperatures repeat: {list(cfg.temperatures)}")
    if not teacher_model_paths:
        raise DistillError("no teacher models given")
    return names


def _student_train_config(cfg: DistillConfig, teacher_meta: dict, train_cfg: Any | None,
                          overrides: dict | None, device: str | None) -> Any:
    """The students' TrainConfig: the teachers' (or the given) config, the schedule fields of
    ``cfg`` on top, and ``device`` when one is given."""
    train_cfg = _student_schedule(cfg, _train_config_for(teacher_meta, train_cfg, overrides))
    if device is not None and device != train_cfg.device:
        train_cfg = dataclasses.replace(train_cfg, device=device)
    return train_cfg


def _student_objective(cfg: DistillConfig, teachers: TeacherEnsemble, teacher_paths: Sequence[Path],
                       data: "FrameData", feat_dim: int, cache_dir: Path, device: str) -> DistillObjective:
    """The students' loss. Dev batches are scored against the teachers themselves: a top-k cache
    covers only the training frames (``DistillObjective.for_evaluation``)."""
    source = _soft_target_source(cfg, teachers, teacher_paths, data, cache_dir, device)
    return DistillObjective(cfg.temperatures, cfg.hard_weight, source,
                            eval_source=teachers if source is not teachers else None,
                            augment=cfg.augment, feat_dim=feat_dim)


def _student_metas(cfg: DistillConfig, teacher_paths: Sequence[Path], transfer: Sequence[str]) -> list[dict]:
    """What each student's ``model.pt`` records about how it was made."""
    common = {"kind": "distilled", "hard_weight": cfg.hard_weight, "teachers": [str(p) for p in teacher_paths],
              "soft_targets": cfg.soft_targets, "transfer": list(transfer)}
    return [{**common, "temperature": float(t)} for t in cfg.temperatures]


def _write_diagnostics(out_dir: Path, cfg: DistillConfig, train_cfg: Any, teachers: TeacherEnsemble,
                       students: StackedModel, names: Sequence[str], train: "FrameData", dev: "FrameData") -> None:
    """``diagnostics.json``: how closely each student follows the ensemble on training and dev frames."""
    from asr.diagnostics import distill_diagnostics

    atomic_write_json(out_dir / "diagnostics.json",
                      distill_diagnostics(teachers, students, names, train, dev, cfg.diagnostics_frames,
                                          batch_size=train_cfg.eval_batch_size))


def _write_posteriors(students: StackedModel, names: Sequence[str], out_dir: Path,
                      post_sets: Mapping[str, str | os.PathLike], cmvn: str, train_cfg: Any) -> None:
    """``<T>/post/<set>.npy`` for every set of ``post_sets``, one set in memory at a time."""
    from asr.frames import FrameData
    from asr.posteriors import save_posteriors
    from asr.train import features_dtype

    for set_name, feats_dir in post_sets.items():
        data = FrameData.from_dirs(feats_dir, None, cmvn=cmvn, device=train_cfg.device, dtype=features_dtype(train_cfg))
        save_posteriors(students, data, [out_dir / n / "post" / f"{set_name}.npy" for n in names],
                        batch_size=train_cfg.eval_batch_size, dtype=train_cfg.dtype)
        del data


def distill(
    cfg: DistillConfig,
    train_feats_dir: str | os.PathLike,
    train_ali_dir: str | os.PathLike,
    dev_feats_dir: str | os.PathLike,
    dev_ali_dir: str | os.PathLike,
    teacher_model_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    train_cfg: Any | None = None,
    train_overrides: dict | None = None,
    post_sets: Mapping[str, str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    transfer_feats_dirs: Sequence[str | os.PathLike] = (),
) -> list[Path]:
    """Train one student per temperature (stacked, one call of ``train_stack``) and pick one on dev.

    ``train_cfg`` (an :class:`asr.train.TrainConfig`) defaults to the teachers' own stored training config, so
    the student has the members' architecture and size; the schedule fields of ``cfg`` (epochs, batch_size,
    lr, threads) go on top. ``transfer_feats_dirs``: feature dirs of unlabelled audio the students also
    learn from (soft loss only; their transcripts are never read). Writes ``out_dir/T<T>/model.pt``
    (+ ``train_log.csv``, ``summary.json``, ``distill.json``, ``priors.npy``: the student's mean posterior
    over the training frames), ``T<T>/post/<set>.npy`` for each ``post_sets`` entry (``{set name: feats
    dir}``), ``choice.json`` (per-temperature dev frame accuracy, the chosen T), ``diagnostics.json``
    (student-ensemble agreement and KL on training and dev frames), ``config.yaml``, ``train_config.yaml``,
    ``.done``; the training loop's own state lives in ``out_dir/train-<hash>/``. In cache mode the top-k
    caches are read from / written to ``cache_dir`` (default ``out_dir/soft_targets``). Returns the
    students' model paths in ``cfg.temperatures`` order.
    """
    from asr.frames import FrameData
    from asr.posteriors import write_priors
    from asr.train import features_dtype, train_stack

    names = _student_names(cfg, teacher_model_paths)
    out_dir = Path(out_dir)
    teacher_paths = [Path(p) for p in teacher_model_paths]
    teacher_one, teacher_meta = load_model(teacher_paths[0])
    train_cfg = _student_train_config(cfg, teacher_meta, train_cfg, train_overrides, device)
    device = train_cfg.device
    if train_cfg.threads > 0:
        torch.set_num_threads(train_cfg.threads)
    post_sets = dict(post_sets or {})
    transfer = [str(d) for d in transfer_feats_dirs] if cfg.transfer else []
    from asr.train import RUNTIME_FIELDS

    stable_train = dataclasses.replace(train_cfg, **{f: getattr(type(train_cfg)(), f) for f in RUNTIME_FIELDS})
    done_key = {"config_hash": _run_hash(cfg) + "-" + config_hash(stable_train),
                "teachers": [str(p) for p in teacher_paths], "post_sets": sorted(post_sets), "transfer": transfer}
    (out_dir / ".done").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out_dir)
    write_config(train_cfg, out_dir, name="train_config.yaml")

    train, student_data = _student_data(train_cfg, cfg, train_feats_dir, train_ali_dir, transfer,
                                        teacher_one.input_feat_dim)
    dev = FrameData.from_dirs(dev_feats_dir, dev_ali_dir, cmvn=cfg.cmvn, device=device, dtype=features_dtype(train_cfg))
    teachers = TeacherEnsemble(load_stack(teacher_paths).to(device), bf16=_use_bf16(train_cfg))
    objective = _student_objective(cfg, teachers, teacher_paths, student_data, teacher_one.input_feat_dim,
                                   Path(cache_dir) if cache_dir is not None else out_dir / "soft_targets", device)
    paths = [Path(p) for p in train_stack(train_cfg, student_data, dev, out_dir, seeds=[cfg.seed] * len(names),
                                          objective=objective, member_names=names,
                                          extra_meta=_student_metas(cfg, teacher_paths, transfer),
                                          state_dir=out_dir / f"train-{_run_hash(cfg)}")]
    del objective, student_data
    # What the students are: the choice of T on dev, priors, diagnostics, posteriors.
    students = load_stack(paths).to(device)
    _check_same_arch(students, teacher_paths[0], teacher_one)
    _write_choice(out_dir, cfg, names, paths, teacher_paths, Path(dev_feats_dir).name)
    write_priors(students, train, [p.parent / "priors.npy" for p in paths], dtype=train_cfg.dtype)
    _write_diagnostics(out_dir, cfg, train_cfg, teachers, students, names, train, dev)
    del teachers, train
    _write_posteriors(students, names, out_dir, post_sets, cfg.cmvn, train_cfg)
    mark_done(out_dir, {**done_key, "best_temperature": read_json(out_dir / "choice.json")["best_temperature"]})
    return paths


# ---------------------------------------------------------------------------------------------
# CLI


def _train_cfg_from_args(args: argparse.Namespace) -> Any | None:
    """A --train-config file replaces the teachers' config; --train-set overrides apply on top of
    whichever is used (see ``distill(train_overrides=...)``)."""
    if args.train_config is None:
        return None
    from asr.train import TrainConfig

    return load_config(TrainConfig, args.train_config)


def _cli_distill(args: argparse.Namespace) -> int:
    cfg = config_from_args(DistillConfig, args, temperatures=args.temperatures, hard_weight=args.hard_weight,
                           soft_targets=args.soft_targets, seed=args.seed)
    post_sets = {}
    for item in args.post or []:
        if "=" not in item:
            raise ValueError(f"--post {item!r}: expected SET=FEATS_DIR")
        k, v = item.split("=", 1)
        post_sets[k] = v
    distill(cfg, args.train_feats, args.train_ali, args.dev_feats, args.dev_ali, args.teachers, args.out_dir,
            train_cfg=_train_cfg_from_args(args), train_overrides=parse_kv(args.train_set), post_sets=post_sets,
            cache_dir=args.cache_dir, device=args.device, transfer_feats_dirs=args.transfer_feats)
    return 0


def _cli_soft_targets(args: argparse.Namespace) -> int:
    cfg = config_from_args(SoftTargetConfig, args, temperatures=args.temperatures, k=args.k)
    paths = write_soft_target_caches(args.teachers, args.feats, args.out_dir, cfg, device=args.device)
    info = read_json(Path(args.out_dir) / "info.json")
    for p in paths:
        print(f"{p}: {p.stat().st_size / 1e6:.2f} MB")
    print(f"dense fp16 would be {info['dense_fp16_bytes'] / 1e6:.2f} MB "
          f"({info['num_frames']} frames x {info['num_pdfs']} pdfs)")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill",
        help="train distilled students (one per temperature) from an ensemble of teachers",
        description="Example: asr distill --teachers exp/mini/members/seed*/model.pt "
                    "--train-feats exp/mini/feats/train-clean --train-ali exp/mini/ali/train-clean "
                    "--dev-feats exp/mini/feats/dev-clean --dev-ali exp/mini/ali/dev-clean "
                    "--train-config recipes/mini/conf/train.yaml --post dev-clean=exp/mini/feats/dev-clean "
                    "--post test-clean=exp/mini/feats/test-clean --out-dir exp/mini/distill",
    )
    p.add_argument("--teachers", nargs="+", required=True, help="teacher model.pt files")
    p.add_argument("--train-feats", required=True)
    p.add_argument("--train-ali", required=True)
    p.add_argument("--dev-feats", required=True)
    p.add_argument("--dev-ali", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--transfer-feats", nargs="+", action="extend", default=[], metavar="FEATS_DIR",
                   help="unlabelled transfer set(s): the students learn the teachers' soft targets there too")
    p.add_argument("--post", action="append", metavar="SET=FEATS_DIR",
                   help="write the students' posteriors for this set (repeatable)")
    p.add_argument("--temperatures", default=None, help="comma-separated, e.g. 1,2,5,10")
    p.add_argument("--hard-weight", dest="hard_weight", type=float, default=None)
    p.add_argument("--soft-targets", dest="soft_targets", choices=("online", "cache"), default=None)
    p.add_argument("--seed", type=int, default=None, help="student seed")
    p.add_argument("--cache-dir", default=None, help="cache mode: where the top-k caches live")
    add_config_args(p)
    p.add_argument("--train-config", default=None,
                   help="YAML with TrainConfig overrides (default: the teachers' stored training config)")
    p.add_argument("--train-set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="TrainConfig override")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the training config's device)")
    p.set_defaults(func=_cli_distill)

    q = subparsers.add_parser(
        "soft-targets",
        help="write top-k soft-target caches (topk_T<T>.npz) of a teacher ensemble",
        description="Example: asr soft-targets --teachers exp/mini/members/seed*/model.pt "
                    "--feats exp/mini/feats/train-clean --temperatures 1,2,5,10 --k 20 "
                    "--out-dir exp/mini/ensemble/soft_targets",
    )
    q.add_argument("--teachers", nargs="+", required=True)
    q.add_argument("--feats", required=True, help="feature dir of the set (the training set)")
    q.add_argument("--out-dir", required=True)
    q.add_argument("--temperatures", default=None)
    q.add_argument("--k", type=int, default=None)
    add_config_args(q)
    q.add_argument("--device", default="cpu")
    q.set_defaults(func=_cli_soft_targets)
