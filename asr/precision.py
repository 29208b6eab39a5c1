"""Numeric precision of the networks' forward passes: when bf16 autocast is on, and what it reads.

Training, evaluation, posterior writing and distillation all run the same forward pass; this
module is the one place that says when matmuls run in bf16 (``dtype`` ``bfloat16``, or ``auto`` on
CUDA) and how a batch is fed to it, so that posteriors written after training are computed exactly
as the dev scores during training were.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["uses_bf16", "autocast", "model_input"]


def uses_bf16(device: torch.device, dtype: str) -> bool:
    """Whether matmuls run under bf16 autocast: ``bfloat16``, or ``auto`` on CUDA."""
    return dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when :func:`uses_bf16` says so, else a context that does nothing."""
    if uses_bf16(device, dtype):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_input(x: torch.Tensor, autocast_on: bool) -> torch.Tensor:
    """Features as the model takes them: as stored under autocast (it casts), float32 otherwise
    (features held in bf16 on a GPU would otherwise meet float32 weights)."""
    return x if autocast_on or x.dtype == torch.float32 else x.float()
