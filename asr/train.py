"""Training loop for N-member ensembles of frame classifiers (and, through ``Objective``, students).

One loop serves every model in the project: ``train_stack`` trains ``M = len(seeds)`` members of one
architecture together over one data pass (stacked weights, batched matmuls). Members are
independent: the loss is the sum of the members' mean losses, so each member's gradient is exactly
what it would be alone, and the optimiser keeps per-member learning rates and step counts, so the
newbob schedule and early stopping act on each member separately (a stopped member's loss is masked
and its weights frozen). A member trained in a stack therefore equals the same member trained alone
on the same data order, up to float rounding.

Resumability: ``train_state.pt`` (weights, optimiser moments, schedule, best weights, running
epoch statistics, the position in the epoch's data order and the config) is written atomically every
``checkpoint_every_steps`` steps and at each epoch end. The data order of epoch ``e`` is a
``randperm`` from a generator seeded with ``(data_order_seed, e)``, so a resumed run replays the same
batches from where the checkpoint left off and finishes with the same weights as an uninterrupted run.

Multi-GPU: under ``torchrun`` each rank either takes a slice of every global batch (data parallel,
PyTorch DDP; ``parallel=data``: dev is split too and the sums all-reduced) or trains its own share of
the members (``parallel=members``: each rank scores its members on the whole dev set, with no
collective until all are done). :class:`Shard` says which.

Reading order: :func:`train_stack` (set up, resume, loop, export), then :func:`_train_epochs` (the
loop itself) and the pieces it calls: ``_train_step``, ``_end_epoch`` (``evaluate``, ``_keep_best``,
``_schedule``: newbob), ``_save_state`` / ``_resume`` (checkpoints), ``_EpochLog`` (logs). The
posteriors and priors of trained models are written by :mod:`asr.posteriors`; when bf16 autocast is
on is said by :mod:`asr.precision`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from asr.config import add_config_args, config_from_args, config_hash, config_to_dict, write_config
from asr.frames import (FrameBatch, FrameData, iterate_batches, iterate_chunks, num_batches,
                        num_chunk_batches)
from asr.io import atomic_torch_save, atomic_write_json, atomic_write_text, is_done, mark_done, \
    read_json, safe_torch_load
from asr.models import ArchConfig, StackedModel, build_stack, get_arch, load_stack, save_model
from asr.posteriors import write_priors
from asr.precision import autocast, model_input, uses_bf16

__all__ = [
    "Objective",
    "CrossEntropyObjective",
    "TrainConfig",
    "TrainError",
    "StackedOptimizer",
    "resolve_arch",
    "train_stack",
    "train_seeds",
    "train_members",
    "Shard",
    "evaluate",
    "features_dtype",
    "add_cli",
]

log = logging.getLogger(__name__)


class TrainError(ValueError):
    """Inputs of a training run do not fit together (data, config, an existing run directory)."""


# --------------------------------------------------------------------------------------------
# Objectives


class Objective(Protocol):
    """A training criterion for a stack: logits ``(M, rows, pdfs)`` -> per-member mean loss ``(M,)``.

    The loop sums over members (they are independent). Optional attributes an objective may have:

    - ``needs_labels`` (default True): batches hold only labelled frames; False lets a criterion
      that needs no label (soft targets) learn from unlabelled frames too;
    - ``prepare(batch, generator) -> batch``: transforms a training batch before the forward pass
      (augmentation shared by teachers and student); ``generator`` is seeded per batch;
    - ``for_evaluation() -> Objective``: the criterion to score dev batches with, when it differs.
    """

    def __call__(self, logits: torch.Tensor, batch: FrameBatch) -> torch.Tensor: ...


class CrossEntropyObjective:
    """Hard-label frame cross-entropy against the alignment's pdf ids (rows labelled -1 ignored)."""

    def __call__(self, logits: torch.Tensor, batch: FrameBatch) -> torch.Tensor:
        M, rows, pdfs = logits.shape
        if batch.labels.shape != (rows,):
            raise ValueError(f"labels {tuple(batch.labels.shape)} do not match logits {tuple(logits.shape)}")
        nll = F.cross_entropy(logits.float().reshape(M * rows, pdfs), batch.labels.repeat(M),
                              ignore_index=-1, reduction="none").view(M, rows)
        count = (batch.labels >= 0).sum().clamp(min=1)
        return nll.sum(dim=1) / count


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class TrainConfig:
    """Every training option, with its default stated once (override with --config / --set)."""

    # model: a preset of asr.models.PRESETS, with optional field overrides (None = preset's value)
    arch: str = "small"
    left: Optional[int] = None
    right: Optional[int] = None
    window_step: Optional[int] = None
    hidden_layers: Optional[int] = None
    hidden_dim: Optional[int] = None
    dropout: Optional[float] = None
    # members (CLI): seeds first_seed .. first_seed + members - 1
    members: int = 10
    first_seed: int = 1
    data_order_seed: Optional[int] = None  # None: a lone member uses its own seed, a stack uses 0
    # data
    epochs: int = 10                     # upper bound; newbob / early stopping usually end sooner
    batch_size: int = 512                # frames per step (chunk batches: batch_size // chunk_len chunks)
    chunk_len: int = 0                   # > 0: utterance-chunk batches (tdnn models only)
    cmvn: str = "speaker"
    # optimiser
    optimizer: str = "adam"              # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9                # sgd
    beta1: float = 0.9                   # adam
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0            # decoupled (AdamW-style)
    # schedule: newbob halving on dev frame accuracy (absolute improvement), as Kaldi nnet1 does
    lr_schedule: str = "newbob"          # newbob | constant
    newbob_start: float = 0.005          # start halving once an epoch improves dev accuracy by less
    newbob_end: float = 0.0005           # while halving, a member stops when it improves by less
    newbob_factor: float = 0.5
    patience: int = 2                    # early stopping: epochs without a new best dev accuracy
    # runtime (not part of the run's identity: may change between a run and its resume)
    device: str = "cpu"
    dtype: str = "auto"                  # auto (bf16 autocast on cuda, fp32 on cpu) | float32 | bfloat16
    threads: int = 0                     # torch threads for the CLI (0: leave as is)
    parallel: str = "data"               # under torchrun: data (DDP) | members (share members out)
    checkpoint_every_steps: int = 1000
    max_steps: int = 0                   # > 0: stop after this many steps (smoke tests, benchmarks)
    eval_batch_size: int = 4096
    tensorboard: bool = True
    progress: bool = True
    keep_train_state: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in ("adam", "sgd"), f"optimizer must be adam or sgd, got {self.optimizer!r}"),
            (self.lr_schedule in ("newbob", "constant"), f"lr_schedule must be newbob or constant, "
                                                         f"got {self.lr_schedule!r}"),
            (self.dtype in ("auto", "float32", "bfloat16"), f"dtype must be auto/float32/bfloat16, got {self.dtype!r}"),
            (self.parallel in ("data", "members"), f"parallel must be data or members, got {self.parallel!r}"),
            (self.epochs >= 1 and self.batch_size >= 1 and self.members >= 1, "epochs, batch_size and members must be >= 1"),
            (self.lr > 0 and 0 < self.newbob_factor < 1, "lr must be > 0 and newbob_factor in (0, 1)"),
            (self.chunk_len >= 0 and self.max_steps >= 0 and self.checkpoint_every_steps >= 0, "negative count"),
            (self.chunk_len == 0 or self.batch_size >= self.chunk_len, "batch_size must be >= chunk_len"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


# Fields that do not change what a run computes (on one device): excluded from its identity.
RUNTIME_FIELDS = ("device", "threads", "checkpoint_every_steps", "max_steps", "eval_batch_size",
                  "tensorboard", "progress", "keep_train_state", "members", "first_seed", "parallel")


def resolve_arch(cfg: TrainConfig) -> ArchConfig:
    """The architecture a config asks for: its preset with the non-None field overrides."""
    return get_arch(cfg.arch, left=cfg.left, right=cfg.right, window_step=cfg.window_step,
                    hidden_layers=cfg.hidden_layers, hidden_dim=cfg.hidden_dim, dropout=cfg.dropout)


def _run_identity(cfg: TrainConfig, arch: ArchConfig, seeds: Sequence[int], names: Sequence[str],
                  objective: Any, data_seed: int, train: FrameData) -> dict:
    d = {k: v for k, v in config_to_dict(cfg).items() if k not in RUNTIME_FIELDS}
    return {"config": d, "arch": arch.to_dict(), "seeds": [int(s) for s in seeds], "names": list(names),
            "objective": type(objective).__name__, "data_order_seed": int(data_seed),
            "train_frames": train.num_frames, "train_labelled": train.num_labelled}


def _identity_hash(identity: dict) -> str:
    import hashlib
    import json

    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Optimiser with per-member learning rates


class StackedOptimizer:
    """Adam(W) or momentum SGD over stacked parameters, with a learning rate and step count per member.

    Every parameter has the member dimension first. ``step(active)`` updates only the active members
    (``(M,)`` bool); the others keep their weights and optimiser state unchanged, as if they had
    left the run. For one member it computes what ``torch.optim.AdamW`` / ``SGD`` compute.
    """

    def __init__(self, params: Sequence[torch.Tensor], cfg: TrainConfig, num_members: int) -> None:
        self.params = list(params)
        if any(p.shape[0] != num_members for p in self.params):
            raise ValueError("every stacked parameter needs the member dimension first")
        self.cfg = cfg
        device = self.params[0].device
        self.lr = torch.full((num_members,), float(cfg.lr), dtype=torch.float64, device=device)
        self.steps = torch.zeros(num_members, dtype=torch.int64, device=device)
        if cfg.optimizer == "adam":
            self.buffers = {"exp_avg": [torch.zeros_like(p) for p in self.params],
                            "exp_avg_sq": [torch.zeros_like(p) for p in self.params]}
        else:
            self.buffers = {"momentum": [torch.zeros_like(p) for p in self.params]}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @staticmethod
    def _bc(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        cfg = self.cfg
        a = active.to(torch.float64)
        self.steps += active.to(torch.int64)
        lr_a = self.lr * a                                                    # 0 for frozen members
        if cfg.optimizer == "adam":
            t = self.steps.clamp(min=1).to(torch.float64)
            # Per-member factors, computed once per step in float64 and cast once.
            dt = self.params[0].dtype
            w1 = ((1.0 - cfg.beta1) * a).to(dt)
            w2 = ((1.0 - cfg.beta2) * a).to(dt)
            inv_bc2 = (1.0 / (1.0 - cfg.beta2 ** t)).to(dt)
            step_size = (lr_a / (1.0 - cfg.beta1 ** t)).to(dt)
            decay = (1.0 - lr_a * cfg.weight_decay).to(dt)
            for i, p in enumerate(self.params):
                g = p.grad
                if g is None:
                    continue
                m, v = self.buffers["exp_avg"][i], self.buffers["exp_avg_sq"][i]
                if cfg.weight_decay:
                    p.mul_(self._bc(decay, p))
                m.lerp_(g, self._bc(w1, p))
                v.lerp_(g.square(), self._bc(w2, p))
                denom = v.mul(self._bc(inv_bc2, p)).sqrt_().add_(cfg.eps)
                p.addcdiv_(m * self._bc(step_size, p), denom, value=-1.0)
        else:
            for i, p in enumerate(self.params):
                g = p.grad
                if g is None:
                    continue
                buf = self.buffers["momentum"][i]
                if cfg.weight_decay:
                    g = g + cfg.weight_decay * p
                keep = self._bc(torch.where(active, torch.tensor(cfg.momentum, device=a.device, dtype=torch.float64),
                                            torch.ones_like(a)).to(p.dtype), p)
                buf.mul_(keep).add_(g * self._bc(a.to(p.dtype), p))
                p.sub_(buf * self._bc(lr_a.to(p.dtype), p))

    def state_dict(self) -> dict:
        return {"lr": self.lr.clone(), "steps": self.steps.clone(),
                "buffers": {k: [b.clone() for b in v] for k, v in self.buffers.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.lr.copy_(sd["lr"])
        self.steps.copy_(sd["steps"])
        for k, bufs in self.buffers.items():
            for b, src in zip(bufs, sd["buffers"][k]):
                b.copy_(src)


# --------------------------------------------------------------------------------------------
# Helpers


def _dist() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group, (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class Shard:
    """This process's share of every batch: rank ``rank`` of ``world`` data-parallel ranks.

    ``world > 1`` (``parallel=data`` under torchrun): each rank takes a slice of every training and
    dev batch, DDP averages the gradients and the epoch's sums are all-reduced, so every rank sees
    the same numbers and takes the same schedule decisions. ``world == 1`` (one process, or
    ``parallel=members``, where each rank trains members of its own): whole batches and no
    collective, so ranks with different members, or different numbers of them, never wait on each
    other and each member is scored on the whole dev set.
    """

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this rank writes the run's files (rank 0 of a data-parallel group)."""
        return self.rank == 0

    def slice(self, batch: FrameBatch, chunked: bool) -> FrameBatch:
        """This rank's share of a global batch (frames, or whole chunks for chunk batches)."""
        if self.world == 1:
            return batch
        n = batch.x.shape[0]
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        per = batch.labels.numel() // n if chunked else 1
        return FrameBatch(x=batch.x[lo:hi], labels=batch.labels[lo * per: hi * per],
                          frame_idx=batch.frame_idx[lo * per: hi * per])

    def all_reduce(self, *tensors: torch.Tensor) -> None:
        """Sum ``tensors`` in place over the ranks (nothing to do for one rank)."""
        if self.world > 1:
            import torch.distributed as dist

            for t in tensors:
                dist.all_reduce(t)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _shard_for(data_parallel: bool | None) -> Shard:
    """The shard of one ``train_stack`` call: data parallel over every rank when torch.distributed
    is initialised and ``data_parallel`` is not False, else the whole batch."""
    rank, world = _dist()
    return Shard(rank, world) if world > 1 and data_parallel is not False else Shard()


def _wrap_ddp(model: StackedModel, shard: Shard, device: torch.device) -> torch.nn.Module:
    """What the training forward pass goes through: DDP (gradients averaged over the ranks) for a
    data-parallel shard, else the model itself."""
    if shard.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def features_dtype(cfg: TrainConfig) -> torch.dtype:
    """How a data set is held in memory: bf16 on a GPU (half the memory, autocast reads it as is),
    float32 on a CPU (bf16 gathers are slow there; autocast casts each batch)."""
    return torch.bfloat16 if str(cfg.device).startswith("cuda") and cfg.dtype != "float32" else torch.float32


def _epoch_generator(data_seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(data_seed) * 1_000_003 + int(epoch) * 7_919 + 17)


def _batches(cfg: TrainConfig, model: StackedModel, data: FrameData, generator: torch.Generator | None,
             shuffle: bool, start_batch: int = 0, only_labelled: bool = True) -> Iterator[FrameBatch]:
    left, right = model.context
    bs = cfg.batch_size
    if cfg.chunk_len > 0 and shuffle:
        return iterate_chunks(data, cfg.chunk_len, max(1, bs // cfg.chunk_len), left, right, generator,
                              shuffle=shuffle, only_labelled=only_labelled, start_batch=start_batch)
    return iterate_batches(data, bs, left, right, generator, shuffle=shuffle, only_labelled=only_labelled,
                           start_batch=start_batch)


def _num_batches(cfg: TrainConfig, data: FrameData, only_labelled: bool = True) -> int:
    if cfg.chunk_len > 0:
        return num_chunk_batches(data, cfg.chunk_len, max(1, cfg.batch_size // cfg.chunk_len), only_labelled)
    return num_batches(data, cfg.batch_size, only_labelled)


def _batch_generator(data_seed: int, epoch: int, batch: int) -> torch.Generator:
    """The generator an objective's ``prepare`` draws from: fixed per (run, epoch, batch), so a
    resumed run augments exactly as an uninterrupted one."""
    return torch.Generator().manual_seed(int(data_seed) * 1_000_003 + int(epoch) * 104_729 + int(batch) * 31 + 5)


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on a CPU (the same seed gives the same weights), restored afterwards."""
    prev = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


@torch.no_grad()
def evaluate(model: torch.nn.Module | StackedModel, data: FrameData, cfg: TrainConfig,
             objective: Objective | None = None, shard: Shard = Shard()) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-member mean loss ``(M,)`` and frame accuracy ``(M,)`` over the labelled frames of ``data``.

    The objective's ``for_evaluation()`` (when it has one) scores the batches. ``shard``: with
    ``world > 1`` this rank scores a slice of every batch and the sums are all-reduced (data
    parallel, every rank must call); the default scores the whole set here, with no collective.
    """
    objective = objective or CrossEntropyObjective()
    if hasattr(objective, "for_evaluation"):
        objective = objective.for_evaluation()
    inner = model.module if hasattr(model, "module") else model
    device = next(inner.parameters()).device
    M = inner.num_members
    loss_sum = torch.zeros(M, dtype=torch.float64, device=device)
    correct = torch.zeros(M, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    bf16 = uses_bf16(device, cfg.dtype)
    was_training = inner.training
    inner.eval()
    left, right = inner.context
    for batch in iterate_batches(data, cfg.eval_batch_size, left, right, None, shuffle=False):
        batch = shard.slice(batch, chunked=False)
        if batch.labels.numel() == 0:
            continue
        with autocast(device, cfg.dtype):
            logits = inner(model_input(batch.x, bf16))                  # (M, rows, pdfs)
        n = (batch.labels >= 0).sum()
        loss_sum += objective(logits, batch).double() * n
        correct += ((logits.argmax(-1) == batch.labels) & (batch.labels >= 0)).sum(1).double()
        count += n
    shard.all_reduce(loss_sum, correct, count)
    inner.train(was_training)
    c = max(float(count), 1.0)
    return (loss_sum / c).float().cpu(), (correct / c).float().cpu(), int(count)


# --------------------------------------------------------------------------------------------
# The loop: its state, its pieces, then train_stack


@dataclass
class _Progress:
    """Everything besides weights and optimiser that a resumed run needs (plain numbers only)."""

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    active: list[bool] = dataclasses.field(default_factory=list)
    stop_reason: list[str] = dataclasses.field(default_factory=list)
    halving: list[bool] = dataclasses.field(default_factory=list)
    best_acc: list[float] = dataclasses.field(default_factory=list)
    best_loss: list[float] = dataclasses.field(default_factory=list)
    best_epoch: list[int] = dataclasses.field(default_factory=list)
    bad_epochs: list[int] = dataclasses.field(default_factory=list)
    history: list[list[dict]] = dataclasses.field(default_factory=list)

    @classmethod
    def fresh(cls, M: int) -> "_Progress":
        return cls(active=[True] * M, stop_reason=[""] * M, halving=[False] * M, best_acc=[-1.0] * M,
                   best_loss=[math.inf] * M, best_epoch=[-1] * M, bad_epochs=[0] * M,
                   history=[[] for _ in range(M)])


@dataclass
class _EpochSums:
    """The current epoch's training sums on this rank (per member loss x frames and correct
    frames, the frame count) and the seconds spent in it."""

    loss: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor
    seconds: float = 0.0

    @classmethod
    def zeros(cls, M: int, device: torch.device) -> "_EpochSums":
        return cls(torch.zeros(M, dtype=torch.float64, device=device),
                   torch.zeros(M, dtype=torch.float64, device=device),
                   torch.zeros((), dtype=torch.float64, device=device))

    @torch.no_grad()
    def add(self, loss_vec: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = (labels >= 0).sum()
        self.loss += loss_vec.detach().double() * n
        self.correct += ((logits.detach().argmax(-1) == labels) & (labels >= 0)).sum(1).double()
        self.count += n

    def lap(self, t0: float) -> float:
        """Add the seconds since ``t0`` to the epoch's time; return now."""
        now = time.time()
        self.seconds += now - t0
        return now

    def means(self, shard: Shard) -> tuple[list[float], list[float]]:
        """Per-member mean training loss and accuracy of the epoch over every rank of ``shard``."""
        shard.all_reduce(self.loss, self.correct, self.count)
        c = max(float(self.count), 1.0)
        return (self.loss / c).cpu().tolist(), (self.correct / c).cpu().tolist()

    def reset(self) -> None:
        for t in (self.loss, self.correct, self.count):
            t.zero_()
        self.seconds = 0.0


@dataclass(frozen=True)
class _Run:
    """The fixed facts of one ``train_stack`` call, worked out once before the loop."""

    cfg: TrainConfig
    arch: ArchConfig
    seeds: list[int]
    names: list[str]
    metas: list[dict]
    num_pdfs: int
    out_dir: Path
    state_dir: Path
    data_seed: int
    identity: dict
    shard: Shard

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)

    @property
    def model_paths(self) -> list[Path]:
        return [self.out_dir / n / "model.pt" for n in self.names]

    @property
    def state_path(self) -> Path:
        return self.state_dir / "train_state.pt"

    @property
    def ident_hash(self) -> str:
        return _identity_hash(self.identity)


@dataclass
class _State:
    """What the loop changes, and what ``train_state.pt`` holds: weights, optimiser, each
    member's best weights so far, the schedule's progress and the epoch's running sums."""

    model: StackedModel
    opt: StackedOptimizer
    best: list[torch.Tensor]
    prog: _Progress
    sums: _EpochSums


def _check_data(cfg: TrainConfig, arch: ArchConfig, train: FrameData, dev: FrameData) -> int:
    """The number of pdfs to train for, after checking that config, train and dev fit together."""
    if arch.kind != "tdnn" and cfg.chunk_len > 0:
        raise TrainError(f"chunk batches (chunk_len={cfg.chunk_len}) need a tdnn model, not {cfg.arch!r}")
    num_pdfs = train.num_pdfs or (int(train.labels.max()) + 1 if train.num_labelled else 0)
    if num_pdfs <= 0:
        raise TrainError("training data has no labelled frames")
    if dev.num_pdfs is not None and dev.num_pdfs != num_pdfs:
        raise TrainError(f"dev data has {dev.num_pdfs} pdfs, training data {num_pdfs}")
    if dev.feat_dim != train.feat_dim:
        raise TrainError(f"dev features have dim {dev.feat_dim}, training features {train.feat_dim}")
    if dev.num_labelled == 0:
        raise TrainError("dev data has no labelled frames: early stopping and newbob need them")
    return num_pdfs


def _plan_run(cfg: TrainConfig, train: FrameData, dev: FrameData, out_dir: str | os.PathLike,
              seeds: Sequence[int], objective: Objective, member_names: Sequence[str] | None,
              extra_meta: Sequence[dict] | None, state_dir: str | os.PathLike | None,
              data_parallel: bool | None) -> _Run:
    """Check the arguments of ``train_stack`` and fix the run's names, identity and shard."""
    seeds = [int(s) for s in seeds]
    M = len(seeds)
    if M == 0:
        raise TrainError("train_stack needs at least one seed")
    names = list(member_names) if member_names is not None else [f"seed{s}" for s in seeds]
    if len(names) != M or len(set(names)) != M:
        raise TrainError(f"member_names must be {M} unique names, got {names}")
    metas = list(extra_meta) if extra_meta is not None else [{} for _ in range(M)]
    if len(metas) != M:
        raise TrainError(f"extra_meta must have {M} entries, got {len(metas)}")
    arch = resolve_arch(cfg)
    num_pdfs = _check_data(cfg, arch, train, dev)
    data_seed = cfg.data_order_seed if cfg.data_order_seed is not None else (seeds[0] if M == 1 else 0)
    out_dir = Path(out_dir)
    return _Run(cfg=cfg, arch=arch, seeds=seeds, names=names, metas=metas, num_pdfs=num_pdfs, out_dir=out_dir,
                state_dir=Path(state_dir) if state_dir is not None else out_dir, data_seed=data_seed,
                identity=_run_identity(cfg, arch, seeds, names, objective, data_seed, train),
                shard=_shard_for(data_parallel))


def _new_state(run: _Run, train: FrameData) -> _State:
    """Freshly initialised members (each from its seed), optimiser and progress."""
    model = build_stack(run.arch, train.feat_dim, run.num_pdfs, run.seeds).to(run.device)
    M = len(run.seeds)
    log.info("%d member(s) of %s (%s): %d parameters each, context %s, %d labelled training frames",
             M, run.cfg.arch, run.arch.kind, model.params_per_member, model.context, train.num_labelled)
    return _State(model=model, opt=StackedOptimizer(list(model.parameters()), run.cfg, M),
                  best=[p.detach().clone() for p in model.parameters()], prog=_Progress.fresh(M),
                  sums=_EpochSums.zeros(M, run.device))


def _save_state(run: _Run, state: _State) -> None:
    """Write ``train_state.pt`` atomically (on the main rank only)."""
    if not run.shard.main:
        return
    s = state.sums
    atomic_torch_save({
        "identity": run.identity,
        "model": {k: v.detach() for k, v in state.model.state_dict().items()},
        "optimizer": state.opt.state_dict(),
        "best": list(state.best),
        "progress": dataclasses.asdict(state.prog),
        "acc_loss": s.loss, "acc_correct": s.correct, "acc_count": s.count,
        "epoch_seconds": s.seconds,
        "rng": {"torch_cpu": torch.get_rng_state()},   # unused by the loop (explicit generators)
    }, run.state_path)


def _resume(run: _Run, state: _State) -> None:
    """Load the ``train_state.pt`` a killed run left into ``state``; refuse another run's."""
    if not run.state_path.is_file():
        return
    st = safe_torch_load(run.state_path, map_location=run.device)
    if st.get("identity") != run.identity:
        raise TrainError(f"{run.state_path}: belongs to a different run (config, seeds or data changed); "
                         f"delete it or use another output directory")
    state.model.load_state_dict(st["model"])
    state.opt.load_state_dict(st["optimizer"])
    for b, src in zip(state.best, st["best"]):
        b.copy_(src)
    state.prog = _Progress(**st["progress"])
    for t, key in ((state.sums.loss, "acc_loss"), (state.sums.correct, "acc_correct"), (state.sums.count, "acc_count")):
        t.copy_(st[key])
    state.sums.seconds = float(st["epoch_seconds"])
    log.info("resuming %s at epoch %d, batch %d (step %d)", run.state_dir, state.prog.epoch + 1,
             state.prog.batch_in_epoch, state.prog.step)


LOG_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "dev_loss", "dev_acc", "active", "seconds"]


def _write_member_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in LOG_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _open_writers(out_dir: Path, names: Sequence[str]) -> list[Any]:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as e:  # tensorboard missing or broken: training must still run
        log.warning("TensorBoard logging disabled: %s", e)
        return []
    return [SummaryWriter(log_dir=str(out_dir / n / "tb")) for n in names]


class _EpochLog:
    """Where each member's epoch row goes: the log, and on the main rank ``<name>/train_log.csv``
    and TensorBoard (``<name>/tb/``)."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.writers = _open_writers(run.out_dir, run.names) if run.shard.main and run.cfg.tensorboard else []

    def __enter__(self) -> "_EpochLog":
        return self

    def __exit__(self, *exc: object) -> None:
        for w in self.writers:
            w.close()

    def write(self, m: int, prog: _Progress) -> None:
        row, name = prog.history[m][-1], self.run.names[m]
        log.info("%s epoch %d: lr %.3g train loss %.4f acc %.4f | dev loss %.4f acc %.4f%s", name,
                 row["epoch"], row["lr"], row["train_loss"], row["train_acc"], row["dev_loss"], row["dev_acc"],
                 "" if prog.active[m] else f" (stopped: {prog.stop_reason[m]})")
        if not self.run.shard.main:
            return
        (self.run.out_dir / name).mkdir(parents=True, exist_ok=True)
        _write_member_log(self.run.out_dir / name / "train_log.csv", prog.history[m])
        if self.writers:
            w = self.writers[m]
            for k in ("train_loss", "train_acc", "dev_loss", "dev_acc", "lr"):
                w.add_scalar(k.replace("_", "/", 1) if k != "lr" else "lr", row[k], row["epoch"])
            w.flush()


def _epoch_bar(run: _Run, prog: _Progress, total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=prog.batch_in_epoch, desc=f"epoch {prog.epoch + 1}/{run.cfg.epochs}",
                unit="batch", disable=(not run.cfg.progress or not run.shard.main) or None, leave=False)


def _prepare(run: _Run, prog: _Progress, batch: FrameBatch, objective: Objective) -> FrameBatch:
    """A batch's randomness, seeded by (run, epoch, batch) so that a resumed run repeats it: the
    objective's augmentation (``prepare``) and the dropout masks (global RNG)."""
    prepare = getattr(objective, "prepare", None)
    if prepare is not None:
        batch = prepare(batch, _batch_generator(run.data_seed, prog.epoch, prog.batch_in_epoch))
    if run.arch.dropout:
        torch.manual_seed(_batch_generator(run.data_seed, prog.epoch, prog.batch_in_epoch).initial_seed())
    return batch


def _train_step(run: _Run, state: _State, fwd: torch.nn.Module, objective: Objective, batch: FrameBatch,
                active: torch.Tensor) -> None:
    """One optimiser step of the active members on this rank's slice of a global batch."""
    world = run.shard.world
    gcount = (batch.labels >= 0).sum()
    batch = run.shard.slice(batch, chunked=run.cfg.chunk_len > 0)
    n = (batch.labels >= 0).sum()
    with autocast(run.device, run.cfg.dtype):
        logits = fwd(model_input(batch.x, uses_bf16(run.device, run.cfg.dtype)))  # (M, rows, pdfs)
    loss_vec = objective(logits, batch)                                         # (M,)
    # DDP averages gradients over ranks: weight each rank by its share of the global batch.
    scale = (n.double() * world / gcount.clamp(min=1)).to(loss_vec.dtype) if world > 1 else 1.0
    loss = (loss_vec * active.to(loss_vec.dtype)).sum() * scale
    state.opt.zero_grad()
    loss.backward()
    state.opt.step(active)
    state.sums.add(loss_vec, logits, batch.labels)


def _keep_best(state: _State, m: int, acc: float, loss: float) -> float:
    """Record member ``m``'s dev result; its weights become its best when dev accuracy improved.
    Returns the improvement (infinite on the first epoch)."""
    prog = state.prog
    impr = acc - prog.best_acc[m] if prog.best_epoch[m] >= 0 else math.inf
    if impr > 0:
        prog.best_acc[m], prog.best_loss[m], prog.best_epoch[m] = acc, loss, prog.epoch
        prog.bad_epochs[m] = 0
        with torch.no_grad():
            for b, p in zip(state.best, state.model.parameters()):
                b[m].copy_(p[m])
    else:
        prog.bad_epochs[m] += 1
    return impr


def _schedule(cfg: TrainConfig, prog: _Progress, m: int, impr: float, lr: float) -> float:
    """Member ``m``'s learning rate for the next epoch (newbob: halve once an epoch gains less than
    ``newbob_start``, stop while halving when it gains less than ``newbob_end``); early stopping
    after ``patience`` epochs without a new best."""
    if cfg.lr_schedule == "newbob":
        if prog.halving[m] and impr < cfg.newbob_end:
            prog.active[m], prog.stop_reason[m] = False, "newbob"
        elif prog.halving[m] or impr < cfg.newbob_start:
            prog.halving[m] = True
            lr = lr * cfg.newbob_factor
    if prog.active[m] and prog.bad_epochs[m] >= cfg.patience:
        prog.active[m], prog.stop_reason[m] = False, "early_stopping"
    return lr


def _end_epoch(run: _Run, state: _State, dev: FrameData, objective: Objective, elog: _EpochLog) -> None:
    """Score dev, keep best weights, apply the schedule per member, log the epoch, start the next."""
    prog = state.prog
    tr_loss, tr_acc = state.sums.means(run.shard)
    dev_loss, dev_acc, _ = evaluate(state.model, dev, run.cfg, objective, run.shard)
    lrs = state.opt.lr.cpu().tolist()
    new_lr = list(lrs)
    for m in range(len(lrs)):
        if not prog.active[m]:
            continue
        acc, loss = float(dev_acc[m]), float(dev_loss[m])
        row = {"epoch": prog.epoch + 1, "lr": lrs[m], "train_loss": tr_loss[m], "train_acc": tr_acc[m],
               "dev_loss": loss, "dev_acc": acc, "active": 1, "seconds": round(state.sums.seconds, 2)}
        prog.history[m].append(row)
        new_lr[m] = _schedule(run.cfg, prog, m, _keep_best(state, m, acc, loss), lrs[m])
        row["active"] = int(prog.active[m])
        elog.write(m, prog)
    state.opt.lr.copy_(torch.tensor(new_lr, dtype=torch.float64))
    prog.epoch += 1
    prog.batch_in_epoch = 0
    state.sums.reset()


def _train_epochs(run: _Run, state: _State, fwd: torch.nn.Module, train: FrameData, dev: FrameData,
                  objective: Objective, elog: _EpochLog,
                  step_callback: Callable[[int, StackedModel], None] | None) -> bool:
    """Epochs until every member has stopped or ``epochs`` is reached, checkpointing as it goes.
    Returns False when ``max_steps`` ended the run first."""
    cfg, prog = run.cfg, state.prog
    only_labelled = getattr(objective, "needs_labels", True)
    state.model.train()
    while prog.epoch < cfg.epochs and any(prog.active):
        active = torch.tensor(prog.active, device=run.device)
        order = _epoch_generator(run.data_seed, prog.epoch)
        bar = _epoch_bar(run, prog, _num_batches(cfg, train, only_labelled))
        t0 = time.time()
        for batch in _batches(cfg, state.model, train, order, shuffle=True, start_batch=prog.batch_in_epoch,
                              only_labelled=only_labelled):
            _train_step(run, state, fwd, objective, _prepare(run, prog, batch, objective), active)
            prog.batch_in_epoch += 1
            prog.step += 1
            bar.update(1)
            if cfg.checkpoint_every_steps and prog.step % cfg.checkpoint_every_steps == 0:
                t0 = state.sums.lap(t0)
                _save_state(run, state)
            if step_callback is not None:
                step_callback(prog.step, state.model)
            if cfg.max_steps and prog.step >= cfg.max_steps:
                bar.close()
                state.sums.lap(t0)
                _save_state(run, state)
                log.info("stopped after max_steps=%d (rerun without it to resume)", cfg.max_steps)
                return False
        bar.close()
        state.sums.lap(t0)
        _end_epoch(run, state, dev, objective, elog)
        _save_state(run, state)
    return True


def _member_with(model: StackedModel, m: int, tensors: Sequence[torch.Tensor]) -> StackedModel:
    """Member ``m`` of ``model`` with its weights taken from ``tensors`` (parallel to parameters())."""
    one = model.member(m)
    with torch.no_grad():
        for p, src in zip(one.parameters(), tensors):
            p.copy_(src[m: m + 1])
    return one


def _export_members(run: _Run, state: _State, complete: bool) -> None:
    """Each member's best-dev weights (its last ones if it never scored) as ``<name>/model.pt``,
    with ``summary.json`` beside it."""
    prog, params = state.prog, list(state.model.parameters())
    for m, (name, path) in enumerate(zip(run.names, run.model_paths)):
        member = _member_with(state.model, m, state.best if prog.best_epoch[m] >= 0 else params)
        summary = {
            "name": name, "seed": run.seeds[m], "params": state.model.params_per_member,
            "arch_preset": run.cfg.arch, "best_epoch": prog.best_epoch[m] + 1,
            "best_dev_acc": prog.best_acc[m], "best_dev_loss": prog.best_loss[m],
            "epochs_trained": len(prog.history[m]), "stop_reason": prog.stop_reason[m] or "max_epochs",
            "data_order_seed": run.data_seed, "steps": prog.step, "complete": complete,
        }
        save_model(member, path, {"train_config": config_to_dict(run.cfg), "summary": summary, **run.metas[m]})
        atomic_write_json(run.out_dir / name / "summary.json", summary)


def train_stack(cfg: TrainConfig, train: FrameData, dev: FrameData, out_dir: str | os.PathLike,
                seeds: Sequence[int], objective: Objective | None = None,
                member_names: Sequence[str] | None = None, extra_meta: Sequence[dict] | None = None,
                *, state_dir: str | os.PathLike | None = None,
                step_callback: Callable[[int, StackedModel], None] | None = None,
                data_parallel: bool | None = None) -> list[Path]:
    """Train ``len(seeds)`` members together; write ``out_dir/<name>/model.pt`` and return the paths.

    Each member's checkpoint holds its best-dev-accuracy weights. Per member ``train_log.csv``,
    ``summary.json`` and TensorBoard events (``tb/``) sit beside it. ``state_dir`` (default
    ``out_dir``) holds the run's ``config.yaml``, ``train_state.pt`` (resume) and ``.done``.
    ``step_callback(step, model)`` runs after every optimiser step (tests use it to simulate a kill).
    ``data_parallel`` (default: whether torch.distributed is initialised) shards every batch over
    the ranks with DDP; only rank 0 writes files. False: this process trains its members alone.
    """
    objective = objective or CrossEntropyObjective()
    run = _plan_run(cfg, train, dev, out_dir, seeds, objective, member_names, extra_meta, state_dir, data_parallel)
    if is_done(run.state_dir) and read_json(run.state_dir / ".done").get("run") == run.ident_hash \
            and all(p.is_file() for p in run.model_paths):
        log.info("%s: already trained (%d member(s)); skipping", run.state_dir, len(run.seeds))
        return run.model_paths
    train = train if train.device == run.device else train.to(run.device)
    dev = dev if dev.device == run.device else dev.to(run.device)
    state = _new_state(run, train)
    _resume(run, state)
    if run.shard.main:
        run.state_dir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, run.state_dir)
    fwd = _wrap_ddp(state.model, run.shard, run.device)
    with _deterministic(run.device), _EpochLog(run) as elog:
        complete = _train_epochs(run, state, fwd, train, dev, objective, elog, step_callback)
    if run.shard.main:
        _export_members(run, state, complete)
        if complete:
            mark_done(run.state_dir, {"run": run.ident_hash, "members": run.names})
            if not cfg.keep_train_state and run.state_path.is_file():
                run.state_path.unlink()
    run.shard.barrier()
    return run.model_paths


# --------------------------------------------------------------------------------------------
# Library entry point for the CLI


def _init_distributed(device: str) -> tuple[int, int, str]:
    """Join the torchrun process group when launched by torchrun; return (rank, world, device)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device


def _member_groups(seeds: Sequence[int], cfg: TrainConfig, sequential: bool) -> tuple[list[list[int]], bool | None]:
    """The stacks this rank trains, and ``train_stack``'s ``data_parallel`` for them.

    ``parallel=members`` under torch.distributed: rank r takes seeds r, r + world, ... (a rank may
    get none) and trains them on its own; otherwise every rank takes part in every stack (DDP).
    """
    rank, world = _dist()
    if world > 1 and cfg.parallel == "members":
        mine = list(seeds[rank::world])
        return ([[s] for s in mine] if sequential else ([mine] if mine else [])), False
    return ([[s] for s in seeds] if sequential else [list(seeds)]), None


def train_seeds(cfg: TrainConfig, train: FrameData, dev: FrameData, out_dir: str | os.PathLike,
                sequential: bool = False) -> list[Path]:
    """Train seeds ``first_seed .. first_seed + members - 1`` on sets already in memory into
    ``out_dir/seed<i>/`` (this rank's share of them under torch.distributed); returns every
    member's model path once all ranks are done."""
    out_dir = Path(out_dir)
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.members))
    rank, world = _dist()
    groups, dp = _member_groups(seeds, cfg, sequential)
    for group in groups:
        # Run-level files (config, train_state.pt, .done) of each stack live under runs/.
        run = f"seed{group[0]}" if sequential else (f"rank{rank}" if dp is False else "stack")
        train_stack(cfg, train, dev, out_dir, group, member_names=[f"seed{s}" for s in group],
                    state_dir=out_dir / "runs" / run, data_parallel=dp)
    Shard(rank, world).barrier()
    return [out_dir / f"seed{s}" / "model.pt" for s in seeds]


def train_members(cfg: TrainConfig, feats_dir: str | os.PathLike, ali_dir: str | os.PathLike,
                  dev_feats_dir: str | os.PathLike, dev_ali_dir: str | os.PathLike,
                  out_dir: str | os.PathLike, sequential: bool = False) -> list[Path]:
    """Train seeds ``first_seed .. first_seed + members - 1`` into ``out_dir/seed<i>/``.

    Batched (default): all members in one stack sharing one data order (``data_order_seed``).
    Sequential: one member at a time, each with its own data order (its seed) unless
    ``data_order_seed`` is set. Under torchrun: ``parallel=data`` shards batches (DDP);
    ``parallel=members`` gives each rank its own members.
    """
    out_dir = Path(out_dir)
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.members))
    names = [f"seed{s}" for s in seeds]
    rank, world, device = _init_distributed(cfg.device)
    cfg = dataclasses.replace(cfg, device=device)
    feats_dtype = features_dtype(cfg)
    train = FrameData.from_dirs(feats_dir, ali_dir, cmvn=cfg.cmvn, device=device, dtype=feats_dtype)
    dev = FrameData.from_dirs(dev_feats_dir, dev_ali_dir, cmvn=cfg.cmvn, device=device, dtype=feats_dtype)
    log.info("train: %d frames (%d labelled), dev: %d frames (%d labelled), %s pdfs",
             train.num_frames, train.num_labelled, dev.num_frames, dev.num_labelled, train.num_pdfs)
    train_seeds(cfg, train, dev, out_dir, sequential)
    if rank == 0:
        write_config(cfg, out_dir)
        rows = [read_json(out_dir / n / "summary.json") for n in names]
        if all(r.get("complete") for r in rows):
            stack = load_stack([out_dir / n / "model.pt" for n in names]).to(device)
            write_priors(stack, train, [out_dir / n / "priors.npy" for n in names],
                         batch_size=cfg.eval_batch_size, dtype=cfg.dtype)
        atomic_write_json(out_dir / "members.json", rows)
        if all(r.get("complete") for r in rows):
            mark_done(out_dir, {"config": config_hash(cfg), "members": names})
    return [out_dir / n / "model.pt" for n in names]


def _cli_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(TrainConfig, args, members=args.members, first_seed=args.first_seed,
                           device=args.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    train_members(cfg, args.feats_dir, args.ali_dir, args.dev_feats_dir, args.dev_ali_dir, args.out_dir,
                  sequential=args.sequential)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-members", help="train N frame-classifier members (seeds 1..N) with cross-entropy",
                       description="Example: asr train-members --feats-dir feats/train --ali-dir ali/train "
                                   "--dev-feats-dir feats/dev --dev-ali-dir ali/dev --out-dir exp/mini/members "
                                   "--members 10 --set arch=small")
    p.add_argument("--feats-dir", required=True)
    p.add_argument("--ali-dir", required=True)
    p.add_argument("--dev-feats-dir", required=True)
    p.add_argument("--dev-ali-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--members", type=int, default=None, help="number of members (seeds first_seed..)")
    p.add_argument("--first-seed", type=int, default=None)
    add_config_args(p)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--batched", dest="sequential", action="store_false", default=False,
                      help="train all members in one stacked pass (default)")
    mode.add_argument("--sequential", dest="sequential", action="store_true",
                      help="train members one after another, each with its own data order")
    p.set_defaults(func=_cli_train)
