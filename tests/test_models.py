"""Stacked frame classifiers: shapes, parameter counts, member identity, checkpoints, tdnn chunks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from asr.frames import FrameData, iterate_chunks, splice
from asr.models import (PRESETS, ArchConfig, ModelFileError, build_stack, get_arch, load_model, load_stack,
                        save_model, stack_members)

torch.set_num_threads(1)


def _tiny(kind="mlp", **kw) -> ArchConfig:
    if kind == "mlp":
        return ArchConfig(kind="mlp", left=2, right=1, hidden_layers=2, hidden_dim=16, **kw)
    return ArchConfig(kind="tdnn", hidden_dim=12, tdnn_contexts=((-1, 0, 1), (-2, 0, 2), (0,)), **kw)


def test_paper_preset_parameter_count():
    arch = PRESETS["hinton2015"]
    P, F = 14000, 40
    expected = (26 * F * 2560 + 2560) + 7 * (2560 * 2560 + 2560) + (2560 * P + P)
    with torch.device("meta"):  # shapes only: no 85M-parameter initialisation in a unit test
        from asr.models import StackedModel
        m = StackedModel(arch, F, P, [1], init=False)
    assert m.params_per_member == expected
    assert 80e6 < expected < 90e6        # the paper's "about 85M"


def test_stack_shapes_and_member_identity():
    arch = _tiny()
    stack = build_stack(arch, 5, 7, [3, 1, 4])
    x = torch.randn(6, 4 * 5)
    out = stack(x)
    assert out.shape == (3, 6, 7) and stack.num_members == 3 and stack.context == (2, 1)
    for i, seed in enumerate([3, 1, 4]):
        alone = build_stack(arch, 5, 7, [seed])
        for p, q in zip(stack.member(i).parameters(), alone.parameters()):
            assert torch.equal(p, q)
        torch.testing.assert_close(alone(x)[0], out[i], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[0], out[1])
    restacked = stack_members([stack.member(2), stack.member(0)])
    assert restacked.seeds == [4, 3]
    torch.testing.assert_close(restacked(x), out[[2, 0]], rtol=1e-6, atol=1e-6)


def test_window_step_drops_odd_frames():
    arch = ArchConfig(kind="mlp", left=4, right=2, window_step=2, hidden_layers=1, hidden_dim=8)
    m = build_stack(arch, 3, 5, [0])
    assert m.layers[0].weight.shape[1] == 4 * 3        # frames -4, -2, 0, 2
    x = torch.randn(2, 7 * 3)
    y = x.clone()
    y[:, 3:6] += 1.0                                    # frame -3: not seen
    torch.testing.assert_close(m(x), m(y))
    y[:, 0:3] += 1.0                                    # frame -4: seen
    assert not torch.allclose(m(x), m(y))
    with pytest.raises(ValueError):
        ArchConfig(kind="mlp", left=3, right=2, window_step=2)


def test_bad_input_shape_raises():
    m = build_stack(_tiny(), 5, 7, [0])
    with pytest.raises(ValueError, match="spliced window"):
        m(torch.randn(2, 19))


def test_tdnn_context_and_chunk_equals_window():
    arch = _tiny("tdnn")
    assert (arch.left, arch.right) == (3, 3)
    m = build_stack(arch, 4, 6, [1, 2])
    rng = np.random.default_rng(0)
    lengths = [9, 3, 14]
    n = sum(lengths)
    d = FrameData.from_arrays(rng.normal(size=(n, 4)).astype(np.float32), lengths, rng.integers(0, 6, n), 6)
    g = torch.Generator().manual_seed(0)
    for batch in iterate_chunks(d, 5, 2, 3, 3, g):
        chunk_out = m(batch.x)                                        # (M, rows, pdfs)
        assert chunk_out.shape == (2, batch.labels.numel(), 6)
        win = splice(d.feats, batch.frame_idx, 3, 3, d.utt_start, d.utt_end)
        window_out = m(win)
        valid = batch.labels >= 0
        torch.testing.assert_close(chunk_out[:, valid], window_out[:, valid], rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip(tmp_path):
    arch = _tiny("tdnn")
    stack = build_stack(arch, 4, 6, [5, 9])
    x = torch.randn(3, 7 * 4)
    p = save_model(stack.member(1), tmp_path / "m" / "model.pt", {"note": "x", "dev_acc": 0.5})
    model, meta = load_model(p)
    assert meta["seed"] == 9 and meta["note"] == "x" and meta["params"] == stack.params_per_member
    assert ArchConfig.from_dict(meta["arch"]) == arch
    torch.testing.assert_close(model(x)[0], stack(x)[1], rtol=0, atol=0)
    obj = torch.load(p, weights_only=True)             # loadable without pickle
    assert set(obj) >= {"arch", "input_feat_dim", "num_pdfs", "seed", "state_dict"}
    save_model(stack.member(0), tmp_path / "a.pt")
    both = load_stack([tmp_path / "a.pt", p])
    torch.testing.assert_close(both(x), stack(x), rtol=0, atol=0)
    with pytest.raises(ValueError):
        save_model(stack, tmp_path / "b.pt")
    with pytest.raises(ValueError):
        save_model(stack.member(0), tmp_path / "c.pt", {"seed": 3})
    save_model(build_stack(_tiny(), 4, 6, [1]), tmp_path / "other.pt")
    with pytest.raises(ModelFileError):
        load_stack([p, tmp_path / "other.pt"])
    torch.save({"state_dict": {}}, tmp_path / "junk.pt")
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "junk.pt")


def test_get_arch_overrides():
    a = get_arch("small", hidden_dim=64, left=None)
    assert a.hidden_dim == 64 and a.left == PRESETS["small"].left
    assert dataclasses.replace(a, hidden_dim=PRESETS["small"].hidden_dim) == PRESETS["small"]
    with pytest.raises(ValueError):
        get_arch("nope")
