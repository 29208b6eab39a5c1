"""Paired bootstrap significance for WER differences (Bisani & Ney, ICASSP 2004).

Two systems decoded on the same utterances are compared by resampling *utterances* with
replacement: the per-utterance error counts of both systems travel together, so the interval
reflects how much the difference depends on which sentences happened to be in the test set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "PerUttError",
    "UttErrors",
    "read_per_utt",
    "paired_bootstrap_wer",
    "align_utt_errors",
]


class PerUttError(ValueError):
    """A per_utt file is malformed, or two systems were scored on different utterances."""


class UttErrors(tuple):
    """``(errors, ref_words)`` of one utterance: errors = S + D + I, ref_words = C + S + D."""

    __slots__ = ()

    def __new__(cls, errors: int, ref_words: int) -> "UttErrors":
        return super().__new__(cls, (int(errors), int(ref_words)))

    @property
    def errors(self) -> int:
        return self[0]

    @property
    def ref_words(self) -> int:
        return self[1]


_CSID = re.compile(r"^(\S+)\s+#csid\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")


def read_per_utt(path: str | os.PathLike) -> dict[str, UttErrors]:
    """Read the ``#csid`` lines of a Kaldi-style ``per_utt`` file.

    Only ``<utt> #csid C S I D`` lines carry counts; ``ref``/``hyp``/``op`` lines are skipped. An
    utterance listed twice, or a ``#csid`` line that does not have four integers, is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise PerUttError(f"per_utt file {path} does not exist")
    out: dict[str, UttErrors] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if len(parts) < 2 or parts[1] != "#csid":
                continue
            m = _CSID.match(line.strip())
            if m is None:
                raise PerUttError(f"{path}:{lineno}: bad #csid line {line.strip()!r} (want '<utt> #csid C S I D')")
            utt = m.group(1)
            c, s, i, d = (int(m.group(k)) for k in range(2, 6))
            if utt in out:
                raise PerUttError(f"{path}:{lineno}: utterance {utt} listed twice")
            out[utt] = UttErrors(s + d + i, c + s + d)
    if not out:
        raise PerUttError(f"{path}: no '#csid' lines found")
    return out


def align_utt_errors(
    a: Mapping[str, UttErrors], b: Mapping[str, UttErrors], name_a: str = "a", name_b: str = "b"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-utterance error arrays of two systems over the same utterances, in sorted id order.

    Both systems must have been scored on the same utterances with the same references: a
    paired test over different sets would be meaningless, so a mismatch is an error naming an id.
    """
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    if only_a or only_b:
        raise PerUttError(
            f"systems {name_a} and {name_b} were scored on different utterances: "
            f"{len(only_a)} only in {name_a} (e.g. {only_a[:3]}), {len(only_b)} only in {name_b} (e.g. {only_b[:3]})"
        )
    ids = sorted(a)
    for u in ids:
        if a[u].ref_words != b[u].ref_words:
            raise PerUttError(f"utterance {u}: reference has {a[u].ref_words} words for {name_a} "
                              f"but {b[u].ref_words} for {name_b}")
    errs_a = np.array([a[u].errors for u in ids], dtype=np.int64)
    errs_b = np.array([b[u].errors for u in ids], dtype=np.int64)
    ref = np.array([a[u].ref_words for u in ids], dtype=np.int64)
    return errs_a, errs_b, ref


def paired_bootstrap_wer(
    errs_a: Sequence[int] | np.ndarray,
    errs_b: Sequence[int] | np.ndarray,
    ref_words: Sequence[int] | np.ndarray,
    num_samples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of ``WER(b) - WER(a)`` in percent points, resampling utterances.

    Args:
        errs_a, errs_b: ``(utts,)`` error counts (S + D + I) of systems a and b per utterance.
        ref_words: ``(utts,)`` reference word counts per utterance.
    Returns:
        ``delta`` (point estimate, WER_b - WER_a: negative means b is better), ``ci_low`` /
        ``ci_high`` (2.5 / 97.5 percentiles of the resampled deltas), ``p_value`` (two-sided:
        twice the smaller share of resampled deltas on either side of zero, at most 1),
        ``num_samples`` and ``num_utts``.
    """
    a = np.asarray(errs_a, dtype=np.int64)
    b = np.asarray(errs_b, dtype=np.int64)
    r = np.asarray(ref_words, dtype=np.int64)
    if a.ndim != 1 or a.shape != b.shape or a.shape != r.shape:
        raise ValueError(f"paired_bootstrap_wer: errs_a {a.shape}, errs_b {b.shape} and ref_words {r.shape} "
                         "must be 1-D arrays of the same length")
    if a.size == 0:
        raise ValueError("paired_bootstrap_wer: no utterances")
    if num_samples < 1:
        raise ValueError(f"paired_bootstrap_wer: num_samples must be >= 1, got {num_samples}")
    if (a < 0).any() or (b < 0).any() or (r < 0).any():
        raise ValueError("paired_bootstrap_wer: negative counts")
    total_ref = int(r.sum())
    if total_ref == 0:
        raise ValueError("paired_bootstrap_wer: the references have no words")
    delta = 100.0 * float(b.sum() - a.sum()) / total_ref

    rng = np.random.default_rng(seed)
    n = a.size
    diff = b - a
    deltas = np.empty(num_samples, dtype=np.float64)
    # Resample in blocks so that a large test set times many samples stays small in memory.
    block = max(1, 2_000_000 // n)
    for start in range(0, num_samples, block):
        stop = min(num_samples, start + block)
        idx = rng.integers(0, n, size=(stop - start, n))
        ref_s = r[idx].sum(axis=1)
        d_s = diff[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            deltas[start:stop] = np.where(ref_s > 0, 100.0 * d_s / np.maximum(ref_s, 1), 0.0)
    ci_low, ci_high = np.percentile(deltas, [2.5, 97.5])
    p_le = float(np.mean(deltas <= 0.0))
    p_ge = float(np.mean(deltas >= 0.0))
    p_value = min(1.0, 2.0 * min(p_le, p_ge))
    return {
        "delta": delta,
        "ci_low": float(ci_low),
        "ci_high": float(ci_high),
        "p_value": p_value,
        "num_samples": int(num_samples),
        "num_utts": int(n),
    }
