"""Augmentation of spliced input windows for function matching (Beyer et al. 2022).

A student matches its teachers best when both see exactly the same input and that input keeps
changing: the teachers then label a fresh neighbourhood of every training frame at each step instead
of the same memorised points (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient
and consistent", arXiv 2106.05237; Stanton et al. 2021, arXiv 2106.05945). The distillation
objective applies :func:`augment_windows` to a batch *once*; teachers and student are both run on
the result, so they can never disagree about the input.

Operations on a spliced window ``(rows, frames * feat)`` of CMVN-normalised features (0 = the mean):

- frequency mask: per row, one band of up to ``freq_mask`` bins set to 0 over the whole window;
- time mask: per row, up to ``time_mask`` consecutive window frames set to 0;
- frequency warp: per row, the filterbank axis stretched by a factor drawn from
  ``U[1 - warp, 1 + warp]`` (linear interpolation between bins, edges held), a cheap stand-in for
  a new vocal tract: the direction in which synthetic voices differ most;
- mixup: each row mixed with a random partner row of the batch, ``x = (1 - w) x + w x_partner`` with
  ``w ~ U[0, mixup)``, ``mixup <= 0.5`` so the row's own frame stays dominant (its hard label keeps
  meaning something).

Every random draw comes from the ``torch.Generator`` passed in (the training loop seeds one per
batch), so an augmented run is reproducible and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AugmentConfig", "augment_windows"]


@dataclass(frozen=True)
class AugmentConfig:
    freq_mask: int = 0          # widest frequency band masked per row (bins); 0 = off
    time_mask: int = 0          # most consecutive window frames masked per row; 0 = off
    mixup: float = 0.0          # partner weight drawn from U[0, mixup); 0 = off, at most 0.5
    warp: float = 0.0           # frequency-warp factor drawn from U[1 - warp, 1 + warp]; 0 = off

    def __post_init__(self) -> None:
        if self.freq_mask < 0 or self.time_mask < 0:
            raise ValueError(f"freq_mask and time_mask must be >= 0, got {self.freq_mask}, {self.time_mask}")
        if not 0.0 <= self.warp < 0.5:
            raise ValueError(f"warp must be in [0, 0.5), got {self.warp}")
        if not 0.0 <= self.mixup <= 0.5:
            raise ValueError(f"mixup must be in [0, 0.5] (the row's own frame stays dominant), got {self.mixup}")

    @property
    def enabled(self) -> bool:
        return self.freq_mask > 0 or self.time_mask > 0 or self.mixup > 0 or self.warp > 0


def _band_mask(rows: int, size: int, widest: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``(rows, size)`` bool: True inside one random band of width ``U{0..widest}`` per row."""
    width = torch.randint(0, widest + 1, (rows, 1), generator=generator).to(device)
    start = (torch.rand(rows, 1, generator=generator).to(device) * (size - width + 1)).long()
    pos = torch.arange(size, device=device).unsqueeze(0)
    return (pos >= start) & (pos < start + width)


def _warp(out: torch.Tensor, warp: float, generator: torch.Generator) -> torch.Tensor:
    """Stretch the last (filterbank) axis of ``(rows, frames, feat)`` by a random factor per row."""
    rows, _, feat = out.shape
    alpha = (1.0 + (torch.rand(rows, 1, generator=generator) * 2 - 1) * warp).to(out.device)
    src = (torch.arange(feat, device=out.device, dtype=torch.float32).unsqueeze(0) / alpha).clamp(0, feat - 1)
    lo = src.floor().long()                                         # (rows, feat)
    hi = (lo + 1).clamp(max=feat - 1)
    frac = (src - lo).to(out.dtype).unsqueeze(1)                    # (rows, 1, feat)
    idx = lambda i: i.unsqueeze(1).expand(-1, out.shape[1], -1)     # noqa: E731
    return out.gather(2, idx(lo)) * (1 - frac) + out.gather(2, idx(hi)) * frac


def augment_windows(x: torch.Tensor, feat_dim: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augmented copy of spliced windows ``x`` ``(rows, frames * feat_dim)`` (same shape and dtype)."""
    if not cfg.enabled:
        return x
    if x.dim() != 2 or x.shape[1] % feat_dim:
        raise ValueError(f"expected spliced windows (rows, frames * {feat_dim}), got {tuple(x.shape)}")
    rows, frames = x.shape[0], x.shape[1] // feat_dim
    out = x.reshape(rows, frames, feat_dim).clone()                     # (rows, frames, feat)
    if cfg.warp > 0:
        out = _warp(out, cfg.warp, generator)
    if cfg.mixup > 0 and rows > 1:
        partner = torch.randperm(rows, generator=generator).to(x.device)
        w = (torch.rand(rows, 1, 1, generator=generator) * cfg.mixup).to(x.device, out.dtype)
        out = out * (1 - w) + out[partner] * w
    if cfg.freq_mask > 0:
        band = _band_mask(rows, feat_dim, min(cfg.freq_mask, feat_dim), generator, x.device)
        out = out.masked_fill(band.unsqueeze(1), 0.0)
    if cfg.time_mask > 0:
        band = _band_mask(rows, frames, min(cfg.time_mask, frames), generator, x.device)
        out = out.masked_fill(band.unsqueeze(2), 0.0)
    return out.reshape(rows, frames * feat_dim)
