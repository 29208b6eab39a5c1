"""Why a student kept (or lost) the ensemble's gain: agreement and KL on training and dev frames.

Two questions decide what to try next when distillation falls short:

- Did the student fail to *fit* the ensemble? Then its agreement with the ensemble (argmax match)
  and its KL(ensemble || student) are poor already on the frames it was trained on.
- Did the targets *carry* nothing? Then the ensemble's gain over its members is small on the
  training frames (members that memorised them agree with each other there) and large only on
  unseen speakers: the student copies an ensemble that, where it learns, looks like one member.

:func:`distill_diagnostics` measures both on a fixed sample of training frames and on all labelled
dev frames; the report prints the result beside the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from asr.models import StackedModel

if TYPE_CHECKING:  # pragma: no cover
    from asr.distill import TeacherEnsemble
    from asr.frames import FrameData

__all__ = ["distill_diagnostics", "frame_sample"]


def frame_sample(data: "FrameData", n: int, seed: int = 0) -> torch.Tensor:
    """Up to ``n`` labelled frame indices of ``data``, a fixed random draw (sorted), or all of them."""
    idx = torch.nonzero(data.labels >= 0).squeeze(1)
    if n and idx.numel() > n:
        g = torch.Generator().manual_seed(seed)
        idx = idx[torch.randperm(idx.numel(), generator=g)[:n].to(idx.device)].sort().values
    return idx


@torch.no_grad()
def _scores(teachers: "TeacherEnsemble", students: StackedModel, names: Sequence[str], data: "FrameData",
            idx: torch.Tensor, batch_size: int) -> dict:
    from asr.frames import FrameBatch, splice

    left, right = students.context
    M = teachers.model.num_members
    member_correct = torch.zeros(M, dtype=torch.float64)
    ens_correct = 0.0
    st_correct = torch.zeros(students.num_members, dtype=torch.float64)
    agree = torch.zeros(students.num_members, dtype=torch.float64)
    kl = torch.zeros(students.num_members, dtype=torch.float64)
    was = students.training
    students.eval()
    for start in range(0, idx.numel(), batch_size):
        b = idx[start:start + batch_size]
        x = splice(data.feats, b, left, right, data.utt_start, data.utt_end)
        labels = data.labels[b]
        log_pm = torch.log_softmax(teachers.logits(FrameBatch(x=x, labels=labels, frame_idx=b)).float(), -1)
        log_ens = torch.logsumexp(log_pm, dim=0) - torch.log(torch.tensor(float(M)))      # (rows, pdfs)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=teachers.bf16):
            log_ps = torch.log_softmax(students(x.float()).float(), -1)                   # (S, rows, pdfs)
        ens_arg = log_ens.argmax(-1)
        member_correct += (log_pm.argmax(-1) == labels).sum(1).double().cpu()
        ens_correct += float((ens_arg == labels).sum())
        st_correct += (log_ps.argmax(-1) == labels).sum(1).double().cpu()
        agree += (log_ps.argmax(-1) == ens_arg).sum(1).double().cpu()
        kl += (log_ens.exp() * (log_ens - log_ps)).sum(-1).sum(-1).double().cpu()
    students.train(was)
    n = max(idx.numel(), 1)
    member_mean = float(member_correct.mean()) / n
    return {
        "frames": int(idx.numel()),
        "member_mean_acc": member_mean,
        "ensemble_acc": ens_correct / n,
        "ensemble_gain": ens_correct / n - member_mean,
        "students": {name: {"acc": float(st_correct[i]) / n, "agreement": float(agree[i]) / n,
                            "kl": float(kl[i]) / n} for i, name in enumerate(names)},
    }


def distill_diagnostics(teachers: "TeacherEnsemble", students: StackedModel, names: Sequence[str],
                        train: "FrameData", dev: "FrameData", train_frames: int = 50000,
                        batch_size: int = 4096) -> dict:
    """Accuracy of members / ensemble / students, student-ensemble agreement and KL(ensemble ||
    student) at T = 1, on ``train_frames`` sampled training frames and on every labelled dev frame."""
    return {"train": _scores(teachers, students, names, train, frame_sample(train, train_frames), batch_size),
            "dev": _scores(teachers, students, names, dev, frame_sample(dev, 0), batch_size)}
