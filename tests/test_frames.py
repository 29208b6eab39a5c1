"""Frame data, spliced windows and frame / chunk batching."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from asr.frames import (FrameBatch, FrameData, FrameDataError, iterate_batches, iterate_chunks, num_batches,
                        num_chunk_batches, splice)

torch.set_num_threads(1)


def _data(lengths=(7, 1, 12, 5), dim=3, unlabelled_utt=None, seed=0) -> FrameData:
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    labels = rng.integers(0, 4, n)
    if unlabelled_utt is not None:
        start = sum(lengths[:unlabelled_utt])
        labels[start: start + lengths[unlabelled_utt]] = -1
    return FrameData.from_arrays(feats, list(lengths), labels, num_pdfs=4)


def _naive_window(feats: torch.Tensor, lengths, i: int, left: int, right: int) -> torch.Tensor:
    starts = np.cumsum([0] + list(lengths))
    u = np.searchsorted(starts, i, side="right") - 1
    s, e = starts[u], starts[u + 1]
    rows = [feats[min(max(i + o, s), e - 1)] for o in range(-left, right + 1)]
    return torch.cat(rows)


def test_utterance_bounds_per_frame():
    d = _data()
    assert d.utt_start.tolist()[:8] == [0] * 7 + [7]
    assert d.utt_end.tolist()[:8] == [7] * 7 + [8]
    offsets, lengths = d.utterance_bounds()
    assert offsets.tolist() == [0, 7, 8, 20]
    assert lengths.tolist() == [7, 1, 12, 5]


@pytest.mark.parametrize("left,right", [(0, 0), (3, 2), (20, 5)])
def test_splice_matches_naive_edge_replication(left, right):
    lengths = (7, 1, 12, 5)
    d = _data(lengths)
    idx = torch.arange(d.num_frames)
    got = splice(d.feats, idx, left, right, d.utt_start, d.utt_end)
    assert got.shape == (d.num_frames, (left + 1 + right) * d.feat_dim)
    for i in range(d.num_frames):
        torch.testing.assert_close(got[i], _naive_window(d.feats, lengths, i, left, right), rtol=0, atol=0)


def test_splice_rejects_bad_index():
    d = _data()
    with pytest.raises(ValueError):
        splice(d.feats, torch.arange(3, dtype=torch.int32), 1, 1, d.utt_start, d.utt_end)


def test_iterate_batches_covers_labelled_frames_once_and_is_seeded():
    d = _data(unlabelled_utt=2)
    labelled = set(torch.nonzero(d.labels >= 0).squeeze(1).tolist())
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    batches = list(iterate_batches(d, 5, 2, 1, g(3)))
    assert len(batches) == num_batches(d, 5) == (len(labelled) + 4) // 5
    seen = torch.cat([b.frame_idx for b in batches]).tolist()
    assert sorted(seen) == sorted(labelled)
    for b in batches:
        assert torch.equal(b.labels, d.labels[b.frame_idx])
        assert torch.equal(b.x, splice(d.feats, b.frame_idx, 2, 1, d.utt_start, d.utt_end))
    again = torch.cat([b.frame_idx for b in iterate_batches(d, 5, 2, 1, g(3))])
    other = torch.cat([b.frame_idx for b in iterate_batches(d, 5, 2, 1, g(4))])
    assert torch.equal(again, torch.tensor(seen))
    assert not torch.equal(other, torch.tensor(seen))
    # resuming at batch k replays the tail of the same order
    tail = torch.cat([b.frame_idx for b in iterate_batches(d, 5, 2, 1, g(3), start_batch=2)])
    assert torch.equal(tail, torch.tensor(seen[10:]))


def test_iterate_batches_all_frames_in_order():
    d = _data(unlabelled_utt=0)
    idx = torch.cat([b.frame_idx for b in iterate_batches(d, 4, 0, 0, None, shuffle=False, only_labelled=False)])
    assert idx.tolist() == list(range(d.num_frames))
    with pytest.raises(ValueError):
        next(iterate_batches(d, 4, 0, 0, None, shuffle=True))


def test_iterate_chunks_windows_labels_and_coverage():
    lengths = (7, 1, 12, 5)
    d = _data(lengths, unlabelled_utt=3)
    T, left, right = 4, 2, 3
    g = torch.Generator().manual_seed(0)
    batches = list(iterate_chunks(d, T, 3, left, right, g))
    # chunks: utt0 2, utt1 1, utt2 3, utt3 dropped (unlabelled) = 6 chunks -> 2 batches of 3
    assert len(batches) == num_chunk_batches(d, T, 3) == 2
    covered = []
    for b in batches:
        B = b.x.shape[0]
        assert b.x.shape == (B, T + left + right, d.feat_dim)
        assert b.labels.shape == b.frame_idx.shape == (B * T,)
        for r in range(B):
            first = int(b.frame_idx[r * T])
            # the row's input at position left + k is the window centre of output k
            for k in range(T):
                fi = int(b.frame_idx[r * T + k])
                lab = int(b.labels[r * T + k])
                if lab >= 0:
                    assert fi == first + k
                    covered.append(fi)
                    assert lab == int(d.labels[fi])
                    win = b.x[r, k: k + left + right + 1].reshape(-1)
                    torch.testing.assert_close(win, _naive_window(d.feats, lengths, fi, left, right), rtol=0, atol=0)
                else:
                    assert int(d.utt_end[first]) <= first + k  # padding only past the utterance end
    assert sorted(covered) == torch.nonzero(d.labels >= 0).squeeze(1).tolist()
    assert FrameBatch(batches[0].x, batches[0].labels, batches[0].frame_idx).mask.sum() > 0


def test_from_arrays_validation():
    with pytest.raises(FrameDataError):
        FrameData.from_arrays(np.zeros((5, 2), np.float32), [2, 2])
    with pytest.raises(FrameDataError):
        FrameData.from_arrays(np.zeros((4, 2), np.float32), [2, 2], np.array([0, 1, -2, 0]))
    with pytest.raises(FrameDataError):
        FrameData.from_arrays(np.zeros((4, 2), np.float32), [2, 2], np.array([0, 1, 5, 0]), num_pdfs=3)


class _FakeStore:
    """Stands in for asr.features.FeatureStore (the features step is written elsewhere)."""

    def __init__(self, d):
        self.lengths = np.array([3, 4], dtype=np.int64)
        self.offsets = np.array([0, 3], dtype=np.int64)
        self.num_frames_total = 7
        self.dim = 2
        self.ids = ["a", "b"]

    def load_all(self, cmvn="speaker"):
        return np.arange(14, dtype=np.float32).reshape(7, 2) + (100 if cmvn == "speaker" else 0)


def test_from_dirs_reads_store_and_labels(tmp_path, monkeypatch):
    mod = types.ModuleType("asr.features")
    mod.FeatureStore = _FakeStore
    monkeypatch.setitem(sys.modules, "asr.features", mod)
    ali = tmp_path / "ali"
    ali.mkdir()
    np.save(ali / "labels.npy", np.array([0, 1, 2, -1, -1, -1, -1], dtype=np.int32))
    (ali / "info.json").write_text('{"num_pdfs": 3, "num_frames": 7, "num_utts": 2, "num_failed": 1}')
    d = FrameData.from_dirs(tmp_path / "feats", ali)
    assert d.num_pdfs == 3 and d.num_labelled == 3
    assert d.labels.dtype == torch.int64 and d.feats[0, 0].item() == 100.0
    assert d.utt_start.tolist() == [0, 0, 0, 3, 3, 3, 3] and d.utt_end.tolist() == [3] * 3 + [7] * 4
    np.save(ali / "labels.npy", np.zeros(6, dtype=np.int32))
    with pytest.raises(FrameDataError, match="labels.npy"):
        FrameData.from_dirs(tmp_path / "feats", ali)
    d2 = FrameData.from_dirs(tmp_path / "feats", None, cmvn="none")
    assert d2.num_labelled == 0 and d2.feats[0, 0].item() == 0.0
