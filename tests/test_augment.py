"""Function-matching augmentation: masks, mixup, determinism, and teachers seeing the student's input."""

from __future__ import annotations

import pytest
import torch

from asr.augment import AugmentConfig, augment_windows
from asr.distill import DistillObjective, TeacherEnsemble
from asr.frames import FrameBatch
from asr.models import build_stack, get_arch

FEAT = 5
ARCH = get_arch("small", left=2, right=2, window_step=1, hidden_layers=1, hidden_dim=8)


def _x(rows: int = 64, frames: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, frames * FEAT, generator=torch.Generator().manual_seed(seed)) + 3.0


def test_off_is_identity_and_config_is_validated():
    x = _x()
    assert augment_windows(x, FEAT, AugmentConfig(), torch.Generator()) is x
    with pytest.raises(ValueError):
        AugmentConfig(mixup=0.7)
    with pytest.raises(ValueError):
        AugmentConfig(freq_mask=-1)


def test_masks_zero_one_band_per_row_and_are_reproducible():
    x = _x()
    cfg = AugmentConfig(freq_mask=2, time_mask=1)
    a = augment_windows(x, FEAT, cfg, torch.Generator().manual_seed(3))
    b = augment_windows(x, FEAT, cfg, torch.Generator().manual_seed(3))
    c = augment_windows(x, FEAT, cfg, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    w = a.view(64, 5, FEAT)
    zero_bins = (w == 0).all(dim=1).sum(dim=1)              # bins masked over the whole window
    zero_frames = (w == 0).all(dim=2).sum(dim=1)            # frames masked over all bins
    assert int(zero_bins.max()) <= 2 and int(zero_frames.max()) <= 1
    assert int(zero_bins.sum()) > 0 and int(zero_frames.sum()) > 0
    kept = w != 0
    torch.testing.assert_close(w[kept], x.view(64, 5, FEAT)[kept])   # everything else untouched


def test_mixup_keeps_each_row_dominant():
    x = torch.zeros(32, 5 * FEAT)
    x[:, :] = torch.arange(32, dtype=torch.float32).unsqueeze(1)     # row r holds the value r
    y = augment_windows(x, FEAT, AugmentConfig(mixup=0.4), torch.Generator().manual_seed(0))
    own = x[:, 0]
    # y = (1 - w) * own + w * partner with w < 0.4: closer to the own row than to any partner
    assert ((y[:, 0] - own).abs() <= 0.4 * 31 + 1e-5).all()
    assert not torch.equal(x, y)


def test_teachers_see_exactly_the_students_augmented_input():
    """The objective augments once in prepare(); the teacher forward receives that same tensor."""
    teachers = build_stack(ARCH, FEAT, 4, [1, 2])
    seen = []
    teachers.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    obj = DistillObjective([2.0], 0.5, TeacherEnsemble(teachers),
                           augment=AugmentConfig(freq_mask=2, time_mask=1, mixup=0.3), feat_dim=FEAT)
    batch = FrameBatch(x=_x(16), labels=torch.randint(0, 4, (16,)), frame_idx=torch.arange(16))
    prepared = obj.prepare(batch, torch.Generator().manual_seed(1))
    assert not torch.equal(prepared.x, batch.x)               # it did augment
    student = build_stack(ARCH, FEAT, 4, [9])
    obj(student(prepared.x), prepared)
    assert len(seen) == 1 and torch.equal(seen[0], prepared.x)
    # Dev scoring never augments.
    assert obj.for_evaluation().augment is None


def test_frequency_warp_stretches_the_filterbank_axis_per_row():
    x = torch.arange(FEAT, dtype=torch.float32).repeat(8, 5)       # every frame holds bins 0..FEAT-1
    y = augment_windows(x, FEAT, AugmentConfig(warp=0.2), torch.Generator().manual_seed(0)).view(8, 5, FEAT)
    assert torch.equal(y[:, 0], y[:, 3])                           # one factor per row, all frames alike
    assert (y[:, :, 0] == 0).all()                                 # bin 0 stays; the axis is stretched
    slope = y[:, 0, 1]                                             # = 1 / alpha
    assert ((slope > 1 / 1.2 - 1e-5) & (slope < 1 / 0.8 + 1e-5)).all() and slope.std() > 0
    assert (y.diff(dim=2) >= -1e-6).all()                          # monotone, no bins swapped
