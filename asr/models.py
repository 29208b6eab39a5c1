"""Frame-level acoustic models over pdfs, stacked so that N ensemble members train in one pass.

Every model here is a *stack* of ``M`` members with one architecture: each weight has a leading
member dimension ``(M, in, out)`` and the forward pass is a batched matmul, so ten members cost one
data pass and one set of kernel launches instead of ten. Member ``m`` is initialised from its own
``torch.Generator`` seeded with ``seeds[m]`` (drawing its layers in order), which makes a member
the same tensor whether it was built alone or inside a stack; that is what lets a member trained in
a stack be compared with (and equal, within float tolerance) the same member trained alone.

Architectures (``ArchConfig.kind``):

- ``mlp`` (the ``hinton2015`` family): a spliced window of ``left + 1 + right`` frames (optionally
  subsampled every ``window_step`` frames inside the model), ``hidden_layers`` ReLU layers of width
  ``hidden_dim``, a linear output over pdfs (softmax in the loss).
- ``tdnn``: a time-delay network (Peddinti et al. 2015): each layer splices its input at the given
  frame offsets, so the receptive field grows layer by layer. It accepts either a spliced window
  ``(batch, in_dim)`` (one output frame per row, like the MLP) or a chunk ``(batch, chunk + left +
  right, feat)`` (``chunk`` output frames per row, computed with shared work), and in both cases
  returns logits with one row per labelled position, so the same objectives and loop apply.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from asr.io import atomic_torch_save, safe_torch_load

__all__ = [
    "ArchConfig",
    "PRESETS",
    "get_arch",
    "StackedLinear",
    "StackedModel",
    "build_stack",
    "stack_members",
    "save_model",
    "load_model",
    "load_stack",
    "ModelFileError",
]

log = logging.getLogger(__name__)


class ModelFileError(ValueError):
    """A checkpoint is missing fields or does not match its stated architecture."""


@dataclass(frozen=True)
class ArchConfig:
    """Architecture of one member; the preset names below are what configs refer to."""

    kind: str = "mlp"                 # "mlp" (hinton2015) | "tdnn"
    left: int = 20                    # past context frames seen by the model
    right: int = 5                    # future context frames
    window_step: int = 1              # mlp only: keep every k-th frame of the window (0 always kept)
    hidden_layers: int = 8
    hidden_dim: int = 2560
    tdnn_contexts: tuple[tuple[int, ...], ...] = ()   # tdnn only: frame offsets spliced per layer
    dropout: float = 0.0              # mlp only: dropout after each hidden layer while training

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "tdnn"):
            raise ValueError(f"unknown model kind {self.kind!r}; expected 'mlp' or 'tdnn'")
        if self.hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be positive, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.kind == "mlp":
            if self.left < 0 or self.right < 0 or self.hidden_layers < 0:
                raise ValueError(f"bad mlp context/depth: left={self.left} right={self.right} "
                                 f"hidden_layers={self.hidden_layers}")
            if self.window_step < 1 or self.left % self.window_step or self.right % self.window_step:
                raise ValueError(f"window_step={self.window_step} must divide left={self.left} and "
                                 f"right={self.right} so that the current frame stays in the window")
        else:
            if not self.tdnn_contexts or any(len(c) == 0 for c in self.tdnn_contexts):
                raise ValueError("a tdnn needs tdnn_contexts: one non-empty offset list per layer")
            if any(list(c) != sorted(set(c)) for c in self.tdnn_contexts):
                raise ValueError(f"tdnn_contexts must be sorted and unique per layer: {self.tdnn_contexts}")
            left = sum(-min(min(c), 0) for c in self.tdnn_contexts)
            right = sum(max(max(c), 0) for c in self.tdnn_contexts)
            if (left, right) != (self.left, self.right):
                # Derive the context from the layers so the two can never disagree.
                object.__setattr__(self, "left", left)
                object.__setattr__(self, "right", right)
            object.__setattr__(self, "hidden_layers", len(self.tdnn_contexts))
        object.__setattr__(self, "tdnn_contexts", tuple(tuple(int(o) for o in c) for c in self.tdnn_contexts))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tdnn_contexts"] = [list(c) for c in self.tdnn_contexts]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ModelFileError(f"unknown architecture field(s): {sorted(unknown)}")
        d = dict(d)
        if "tdnn_contexts" in d:
            d["tdnn_contexts"] = tuple(tuple(c) for c in d["tdnn_contexts"])
        return cls(**d)


# Presets. ``hinton2015`` is the paper's model (26 frames of 40 fbank -> 8 x 2560 ReLU -> 14k pdfs
# = ~85M parameters). ``small`` is sized so that ten members train on the mini corpus on 2 CPU cores
# in a few minutes (see benchmarks/bench_train_cpu.py): 13-frame window seen every second frame.
PRESETS: dict[str, ArchConfig] = {
    "hinton2015": ArchConfig(kind="mlp", left=20, right=5, window_step=1, hidden_layers=8, hidden_dim=2560),
    "small": ArchConfig(kind="mlp", left=6, right=6, window_step=2, hidden_layers=3, hidden_dim=256),
    "medium": ArchConfig(kind="mlp", left=10, right=5, window_step=1, hidden_layers=4, hidden_dim=1024),
    "tdnn_small": ArchConfig(kind="tdnn", hidden_dim=256,
                             tdnn_contexts=((-2, -1, 0, 1, 2), (-1, 0, 1), (-3, 0, 3), (0,))),
    "tdnn": ArchConfig(kind="tdnn", hidden_dim=1024,
                       tdnn_contexts=((-2, -1, 0, 1, 2), (-1, 0, 1), (-1, 0, 1), (-3, 0, 3), (-3, 0, 3),
                                      (-3, 0, 3), (0,))),
}


def get_arch(name: str, **overrides: Any) -> ArchConfig:
    """A preset by name, with fields replaced by the non-None ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown architecture preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[name], **changes) if changes else PRESETS[name]


class StackedLinear(nn.Module):
    """``M`` independent affine maps: weight ``(M, in, out)``, bias ``(M, out)``."""

    def __init__(self, num_members: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(num_members, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(rows, in)`` shared by all members, or ``(M, rows, in)`` -> ``(M, rows, out)``."""
        if x.dim() == 2:
            # One input for every member: matmul broadcasts it over the member dimension.
            out = torch.matmul(x, self.weight)
            return out + self.bias.unsqueeze(1).to(out.dtype)   # stay in bf16 under autocast
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


def _init_member(layers: Sequence[StackedLinear], m: int, seed: int, gains: Sequence[float]) -> None:
    """Initialise member ``m`` of every layer from one generator: He-normal hidden, scaled output."""
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for layer, gain in zip(layers, gains):
            fan_in, fan_out = layer.weight.shape[1:]
            w = torch.randn(fan_in, fan_out, generator=g) * (gain / math.sqrt(fan_in))
            layer.weight[m].copy_(w)
            layer.bias[m].zero_()


class StackedModel(nn.Module):
    """``M`` members of one architecture; ``forward(x) -> (M, rows, num_pdfs)`` logits.

    ``x`` is a spliced window ``(batch, (left + 1 + right) * feat)`` (rows = batch), or, for a tdnn,
    a chunk ``(batch, chunk + left + right, feat)`` (rows = batch * chunk, chunk-major per row).
    """

    def __init__(self, arch: ArchConfig, input_feat_dim: int, num_pdfs: int, seeds: Sequence[int],
                 init: bool = True) -> None:
        super().__init__()
        if input_feat_dim <= 0 or num_pdfs <= 0:
            raise ValueError(f"input_feat_dim and num_pdfs must be positive: {input_feat_dim}, {num_pdfs}")
        if len(seeds) == 0:
            raise ValueError("a stack needs at least one member seed")
        self.arch = arch
        self.input_feat_dim = int(input_feat_dim)
        self.num_pdfs = int(num_pdfs)
        self.seeds = [int(s) for s in seeds]
        M = len(self.seeds)
        dims: list[int]
        if arch.kind == "mlp":
            n_frames = (arch.left + arch.right) // arch.window_step + 1
            dims = [n_frames * input_feat_dim] + [arch.hidden_dim] * arch.hidden_layers + [num_pdfs]
            ins = dims[:-1]
        else:
            ins = []
            d = input_feat_dim
            for ctx in arch.tdnn_contexts:
                ins.append(len(ctx) * d)
                d = arch.hidden_dim
            ins.append(d)
            dims = ins + [num_pdfs]
        outs = [arch.hidden_dim] * (len(ins) - 1) + [num_pdfs]
        self.layers = nn.ModuleList(StackedLinear(M, i, o) for i, o in zip(ins, outs))
        gains = [math.sqrt(2.0)] * (len(ins) - 1) + [1.0]
        if init:
            for m, seed in enumerate(self.seeds):
                _init_member(self.layers, m, seed, gains)

    # -- properties -------------------------------------------------------------------------
    @property
    def num_members(self) -> int:
        return len(self.seeds)

    @property
    def context(self) -> tuple[int, int]:
        """Frames of context ``(left, right)`` the input window must carry."""
        return (self.arch.left, self.arch.right)

    @property
    def params_per_member(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    @property
    def flops_per_frame(self) -> int:
        """Multiply-adds x 2 of one member's forward pass for one output frame (window input)."""
        return 2 * sum(layer.weight[0].numel() for layer in self.layers)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch.kind == "mlp":
            return self._forward_mlp(x)
        return self._forward_tdnn(x)

    def _check_window(self, x: torch.Tensor) -> int:
        width = self.arch.left + 1 + self.arch.right
        if x.dim() != 2 or x.shape[1] != width * self.input_feat_dim:
            raise ValueError(f"expected a spliced window (batch, {width * self.input_feat_dim}) "
                             f"= {width} frames x {self.input_feat_dim}, got {tuple(x.shape)}")
        return width

    def _forward_mlp(self, x: torch.Tensor) -> torch.Tensor:
        width = self._check_window(x)
        if self.arch.window_step > 1:
            x = x.view(x.shape[0], width, self.input_feat_dim)[:, :: self.arch.window_step].reshape(x.shape[0], -1)
        h = x
        drop = self.arch.dropout if self.training else 0.0
        for layer in self.layers[:-1]:
            h = torch.relu(layer(h))                     # (M, batch, hidden)
            if drop:
                h = torch.nn.functional.dropout(h, drop)   # the loop seeds the global RNG per batch
        out = self.layers[-1](h)
        if out.dim() == 2:                               # no hidden layers: still (M, batch, pdfs)
            out = out.unsqueeze(0).expand(self.num_members, -1, -1)
        return out

    def _forward_tdnn(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            width = self._check_window(x)
            x = x.view(x.shape[0], width, self.input_feat_dim)
        if x.dim() != 3 or x.shape[2] != self.input_feat_dim:
            raise ValueError(f"tdnn input must be (batch, frames, {self.input_feat_dim}) or a spliced "
                             f"window, got {tuple(x.shape)}")
        batch, t_in = x.shape[0], x.shape[1]
        t_out = t_in - self.arch.left - self.arch.right
        if t_out <= 0:
            raise ValueError(f"tdnn input of {t_in} frames is shorter than its context "
                             f"{self.arch.left}+1+{self.arch.right}")
        h = x                                            # (batch, T, feat), then (M, batch, T, hidden)
        for layer, ctx in zip(self.layers[:-1], self.arch.tdnn_contexts):
            lo, hi = min(ctx), max(ctx)
            t = h.shape[-2] - (hi - lo)
            spliced = torch.cat([h[..., o - lo: o - lo + t, :] for o in ctx], dim=-1)
            if spliced.dim() == 3:                       # shared input of the first layer
                flat = spliced.reshape(batch * t, -1)
            else:
                flat = spliced.reshape(self.num_members, batch * t, -1)
            h = torch.relu(layer(flat)).view(self.num_members, batch, t, -1)
        return self.layers[-1](h.reshape(self.num_members, batch * t_out, -1))   # (M, batch*T, pdfs)

    # -- members ----------------------------------------------------------------------------
    def member(self, i: int) -> "StackedModel":
        """A copy of member ``i`` as a stack of one (on the same device)."""
        if not 0 <= i < self.num_members:
            raise IndexError(f"member {i} out of range for a stack of {self.num_members}")
        return stack_members([self], indices=[i])


def _empty_stack(arch: ArchConfig, input_feat_dim: int, num_pdfs: int, seeds: Sequence[int]) -> StackedModel:
    """A stack with the right shapes but no random initialisation (to be loaded into)."""
    with torch.device("meta"):
        model = StackedModel(arch, input_feat_dim, num_pdfs, seeds, init=False)
    return model.to_empty(device="cpu")


def build_stack(arch: ArchConfig, input_feat_dim: int, num_pdfs: int, seeds: Sequence[int]) -> StackedModel:
    """Build ``len(seeds)`` members on the CPU; member ``m`` initialised from seed ``seeds[m]``."""
    model = StackedModel(arch, input_feat_dim, num_pdfs, seeds)
    log.debug("built %d x %s member(s): %d parameters each", model.num_members, arch.kind, model.params_per_member)
    return model


def stack_members(models: Sequence[StackedModel], indices: Sequence[int] | None = None) -> StackedModel:
    """Concatenate members of stacks with identical architecture into one stack.

    ``indices`` (only with a single source stack) picks members of that stack.
    """
    if not models:
        raise ValueError("stack_members needs at least one model")
    first = models[0]
    for m in models[1:]:
        if (m.arch, m.input_feat_dim, m.num_pdfs) != (first.arch, first.input_feat_dim, first.num_pdfs):
            raise ValueError(f"cannot stack members of different architectures: {first.arch} "
                             f"({first.input_feat_dim} -> {first.num_pdfs}) vs {m.arch} "
                             f"({m.input_feat_dim} -> {m.num_pdfs})")
    if indices is not None:
        if len(models) != 1:
            raise ValueError("indices can only select from one stack")
        picks = [(first, i) for i in indices]
    else:
        picks = [(m, i) for m in models for i in range(m.num_members)]
    seeds = [m.seeds[i] for m, i in picks]
    out = _empty_stack(first.arch, first.input_feat_dim, first.num_pdfs, seeds)
    device = next(first.parameters()).device
    out = out.to(device)
    with torch.no_grad():
        for name, p in out.named_parameters():
            srcs = [dict(m.named_parameters())[name][i] for m, i in picks]
            p.copy_(torch.stack([s.detach().to(device) for s in srcs]))
    return out


_REQUIRED = ("arch", "input_feat_dim", "num_pdfs", "seed", "state_dict")


def save_model(model: StackedModel, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write one member as a self-describing checkpoint (rebuildable from the file alone), atomically.

    Contents: ``arch`` (dict), ``input_feat_dim``, ``num_pdfs``, ``seed``, ``state_dict`` (CPU
    tensors with a member dimension of 1), ``params`` (parameter count), plus ``meta``'s keys.
    """
    if model.num_members != 1:
        raise ValueError(f"save_model writes one member; got a stack of {model.num_members} "
                         f"(use model.member(i))")
    meta = dict(meta or {})
    clash = set(meta) & set(_REQUIRED)
    if clash:
        raise ValueError(f"meta may not override checkpoint fields {sorted(clash)}")
    obj = {
        "arch": model.arch.to_dict(),
        "input_feat_dim": model.input_feat_dim,
        "num_pdfs": model.num_pdfs,
        "seed": model.seeds[0],
        "params": model.params_per_member,
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
    }
    obj.update(meta)
    path = Path(path)
    atomic_torch_save(obj, path)
    return path


def load_model(path: str | os.PathLike) -> tuple[StackedModel, dict]:
    """Load a checkpoint written by ``save_model`` (``weights_only=True``) -> (stack of 1, meta)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or any(k not in obj for k in _REQUIRED):
        missing = [k for k in _REQUIRED if not isinstance(obj, dict) or k not in obj]
        raise ModelFileError(f"{path}: not a model checkpoint (missing {missing})")
    try:
        arch = ArchConfig.from_dict(obj["arch"])
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: bad architecture: {e}") from None
    model = _empty_stack(arch, int(obj["input_feat_dim"]), int(obj["num_pdfs"]), [int(obj["seed"])])
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not match the architecture: {e}") from None
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return model, meta


def load_stack(paths: Sequence[str | os.PathLike]) -> StackedModel:
    """Load several single-member checkpoints into one stack (ensembles, teachers)."""
    if not paths:
        raise ValueError("load_stack needs at least one path")
    models = []
    for p in paths:
        m, _ = load_model(p)
        if models and (m.arch, m.input_feat_dim, m.num_pdfs) != (models[0].arch, models[0].input_feat_dim,
                                                                models[0].num_pdfs):
            raise ModelFileError(f"{p}: architecture differs from {paths[0]}; cannot stack")
        models.append(m)
    return stack_members(models)
