"""Scoring: word error rate (Kaldi-identical alignments), per-utterance errors and frame accuracy.

WER is computed from kaldialign's edit-distance alignment, so substitution / deletion / insertion
counts agree with Kaldi's ``compute-wer`` and ``align-text``; jiwer gives the same totals and is used
as a cross-check in the tests. Every (system, set) gets its own results folder,
``exp/<corpus>/decode/<system>/<set>/``, holding:

- ``hyp.txt``: ``<utt> words`` (sorted by utterance id; empty hypothesis = id alone);
- ``per_utt``: Kaldi's ``wer_per_utt_details`` layout: ``<utt> ref ...``, ``<utt> hyp ...``,
  ``<utt> op ...`` (C, S, I, D; ``***`` marks the empty side) and ``<utt> #csid C S I D``;
- ``wer.json``: ``{wer, sub, del, ins, errors, ref_words, hyp_words, utts, sent_err, ...}``, WER in
  percent;
- ``frame_acc.json``: ``{frame_acc, frames}`` (percent) when posteriors and reference labels exist;
- ``partial.txt``: utterances whose search reached no final state (best partial path used).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import kaldialign
import numpy as np

from asr.io import atomic_write_json, atomic_write_text, mark_done

__all__ = [
    "ScoringError",
    "EPS",
    "align_words",
    "compute_wer",
    "format_per_utt",
    "write_per_utt",
    "write_hyps",
    "read_hyps",
    "frame_accuracy",
    "score_decode",
]

log = logging.getLogger(__name__)

EPS = "***"  # the empty side of an insertion / deletion in ``per_utt`` (as Kaldi's align-text)


class ScoringError(ValueError):
    """Inconsistent scoring input; the message names the utterance or file."""


def align_words(ref: list[str], hyp: list[str]) -> list[tuple[str, str, str]]:
    """Kaldi-identical minimum edit-distance alignment as ``(ref_word, hyp_word, op)`` triples.

    op is ``C`` (correct), ``S`` (substitution), ``I`` (insertion: ref is ``***``) or ``D``
    (deletion: hyp is ``***``).
    """
    if EPS in ref or EPS in hyp:
        raise ScoringError(f"the word {EPS!r} is reserved for alignment gaps")
    out = []
    for r, h in kaldialign.align(ref, hyp, EPS):
        if r == EPS:
            op = "I"
        elif h == EPS:
            op = "D"
        elif r == h:
            op = "C"
        else:
            op = "S"
        out.append((r, h, op))
    return out


def _counts(ops: Iterable[str]) -> dict[str, int]:
    c = {"C": 0, "S": 0, "I": 0, "D": 0}
    for op in ops:
        c[op] += 1
    return c


def compute_wer(refs: Mapping[str, str], hyps: Mapping[str, str]) -> dict:
    """Corpus WER over the utterances of ``refs``, with per-utterance alignments.

    A reference utterance with no hypothesis counts as an empty hypothesis (all deletions) and is
    listed in ``missing_hyps``; hypotheses without a reference are ignored and counted in
    ``extra_hyps`` (both are warned about). Returns ``{wer (percent), sub, del, ins, errors,
    ref_words, hyp_words, corr, utts, sent_err (percent), missing_hyps, extra_hyps, per_utt}`` where
    ``per_utt`` maps utterance id to ``{"align": [(ref, hyp, op), ...], "C", "S", "I", "D"}``.
    """
    missing = sorted(set(refs) - set(hyps))
    extra = sorted(set(hyps) - set(refs))
    if missing:
        log.warning("%d reference utterance(s) have no hypothesis, scored as empty: %s%s",
                    len(missing), " ".join(missing[:5]), " ..." if len(missing) > 5 else "")
    if extra:
        log.warning("%d hypothesis utterance(s) have no reference and are ignored: %s%s",
                    len(extra), " ".join(extra[:5]), " ..." if len(extra) > 5 else "")
    per_utt: dict[str, dict] = {}
    tot = {"C": 0, "S": 0, "I": 0, "D": 0}
    ref_words = hyp_words = sent_err = 0
    for utt in sorted(refs):
        ref = refs[utt].split()
        hyp = hyps.get(utt, "").split()
        ali = align_words(ref, hyp)
        c = _counts(op for _, _, op in ali)
        per_utt[utt] = {"align": ali, **c}
        for k in tot:
            tot[k] += c[k]
        ref_words += len(ref)
        hyp_words += len(hyp)
        sent_err += int(c["S"] + c["I"] + c["D"] > 0)
    errors = tot["S"] + tot["I"] + tot["D"]
    if ref_words == 0 and errors > 0:
        wer = float("inf")
    else:
        wer = 100.0 * errors / ref_words if ref_words else 0.0
    return {
        "wer": wer,
        "sub": tot["S"],
        "del": tot["D"],
        "ins": tot["I"],
        "errors": errors,
        "corr": tot["C"],
        "ref_words": ref_words,
        "hyp_words": hyp_words,
        "utts": len(refs),
        "sent_err": 100.0 * sent_err / len(refs) if refs else 0.0,
        "missing_hyps": len(missing),
        "extra_hyps": len(extra),
        "per_utt": per_utt,
    }


def format_per_utt(per_utt: Mapping[str, dict]) -> str:
    """Kaldi ``per_utt`` text: ref / hyp / op rows with aligned columns, then ``#csid C S I D``."""
    lines = []
    for utt in sorted(per_utt):
        d = per_utt[utt]
        ali = d["align"]
        widths = [max(len(r), len(h), 1) for r, h, _ in ali]
        lines.append(f"{utt} ref  " + " ".join(r.ljust(w) for (r, _, _), w in zip(ali, widths)).rstrip())
        lines.append(f"{utt} hyp  " + " ".join(h.ljust(w) for (_, h, _), w in zip(ali, widths)).rstrip())
        lines.append(f"{utt} op   " + " ".join(op.ljust(w) for (_, _, op), w in zip(ali, widths)).rstrip())
        lines.append(f"{utt} #csid {d['C']} {d['S']} {d['I']} {d['D']}")
    return "\n".join(lines) + ("\n" if lines else "")


def write_per_utt(path: str | os.PathLike, per_utt: Mapping[str, dict]) -> None:
    """Write the ``per_utt`` file (see :func:`format_per_utt`) atomically."""
    atomic_write_text(path, format_per_utt(per_utt))


def write_hyps(path: str | os.PathLike, hyps: Mapping[str, str]) -> None:
    """``<utt> words`` per line, sorted by id (Kaldi text format)."""
    atomic_write_text(path, "".join(f"{u} {hyps[u]}".rstrip() + "\n" for u in sorted(hyps)))


def read_hyps(path: str | os.PathLike) -> dict[str, str]:
    """Read a Kaldi text file (``<utt> words``); duplicate ids are an error naming the id."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.strip().split(maxsplit=1)
            if not parts:
                continue
            if parts[0] in out:
                raise ScoringError(f"{path}: line {n}: duplicate utterance id {parts[0]}")
            out[parts[0]] = parts[1] if len(parts) > 1 else ""
    return out


def frame_accuracy(log_post: np.ndarray, labels: np.ndarray, chunk: int = 65536) -> tuple[float, int]:
    """Share of frames (percent) whose argmax pdf equals the reference label; labels < 0 ignored.

    log_post: ``(frames, pdfs)`` log posteriors or any per-pdf score (float16 memmaps are fine; it
    is processed in chunks of ``chunk`` rows). labels: ``(frames,)`` integer pdf ids, ``-1`` for
    frames without a reference. Returns ``(accuracy_percent, frames_counted)``; accuracy is NaN when
    no frame is counted.
    """
    if log_post.ndim != 2:
        raise ScoringError(f"log_post must be (frames, pdfs), got shape {log_post.shape}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != log_post.shape[0]:
        raise ScoringError(f"labels shape {labels.shape} does not match log_post {log_post.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ScoringError(f"labels must be integers, got {labels.dtype}")
    if labels.size and labels.max() >= log_post.shape[1]:
        raise ScoringError(f"label {int(labels.max())} out of range for {log_post.shape[1]} pdfs")
    correct = counted = 0
    for s in range(0, log_post.shape[0], chunk):
        lab = labels[s:s + chunk]
        keep = lab >= 0
        if not keep.any():
            continue
        pred = np.argmax(np.asarray(log_post[s:s + chunk]), axis=1)
        correct += int((pred[keep] == lab[keep]).sum())
        counted += int(keep.sum())
    return (100.0 * correct / counted if counted else float("nan")), counted


def score_decode(
    out_dir: str | os.PathLike,
    refs: Mapping[str, str],
    hyps: Mapping[str, str],
    *,
    log_post: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    partial: Iterable[str] = (),
    extra: Mapping | None = None,
) -> dict:
    """Write one (system, set) results folder and return the ``wer.json`` summary.

    ``partial`` lists utterances whose search reached no final state (written to ``partial.txt``
    and counted in ``wer.json``). ``log_post``/``labels`` (whole set, global frame order) give
    ``frame_acc.json``. ``extra`` is merged into ``wer.json`` (e.g. acwt, beam, system name).
    ``.done`` is written last.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = compute_wer(refs, hyps)
    write_hyps(out / "hyp.txt", hyps)
    write_per_utt(out / "per_utt", res["per_utt"])
    partial = sorted(set(partial))
    atomic_write_text(out / "partial.txt", "".join(u + "\n" for u in partial))
    summary = {k: v for k, v in res.items() if k != "per_utt"}
    summary["partial"] = len(partial)
    if extra:
        summary.update(dict(extra))
    if log_post is not None or labels is not None:
        if log_post is None or labels is None:
            raise ScoringError(f"{out}: frame accuracy needs both log_post and labels")
        acc, frames = frame_accuracy(log_post, labels)
        atomic_write_json(out / "frame_acc.json", {"frame_acc": acc, "frames": frames})
        summary["frame_acc"] = acc
    atomic_write_json(out / "wer.json", summary)
    log.info("%s: %%WER %.2f [ %d / %d, %d ins, %d del, %d sub ]%s", out, summary["wer"],
             summary["errors"], summary["ref_words"], summary["ins"], summary["del"], summary["sub"],
             f" frame acc {summary['frame_acc']:.2f}%" if "frame_acc" in summary else "")
    mark_done(out, {"wer": summary["wer"]})
    return summary
