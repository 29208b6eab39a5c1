"""Ensembles of member posteriors: arithmetic / geometric means, chunking, files on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from asr.ensemble import (
    EnsembleConfig,
    EnsembleError,
    ensemble_log_posteriors,
    order_members_by_seed,
    write_ensemble,
)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _members(m: int, n: int = 50, p: int = 7, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_log_softmax(rng.normal(scale=3.0, size=(n, p))).astype(np.float32) for _ in range(m)]


@pytest.mark.parametrize("mode", ["arithmetic", "geometric"])
def test_ensemble_of_one_equals_member(mode):
    (m,) = _members(1)
    out = ensemble_log_posteriors([m], mode=mode, chunk_frames=8)
    np.testing.assert_allclose(out, m, atol=1e-5)
    assert out.dtype == np.float32 and out.shape == m.shape


def test_arithmetic_is_log_mean_prob():
    ms = _members(3)
    expected = np.log(np.mean([np.exp(m.astype(np.float64)) for m in ms], axis=0))
    for chunk in (1, 7, 1000):
        out = ensemble_log_posteriors(ms, chunk_frames=chunk)
        np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, atol=1e-5)


def test_arithmetic_survives_very_small_posteriors():
    ms = [np.full((4, 3), -1000.0, np.float32), np.full((4, 3), -1001.0, np.float32)]
    out = ensemble_log_posteriors(ms)
    expected = -1000.0 + np.log((1 + np.exp(-1.0)) / 2)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_geometric_is_normalised_mean_log():
    ms = _members(4, seed=1)
    out = ensemble_log_posteriors(ms, mode="geometric", chunk_frames=9)
    expected = _log_softmax(np.mean(ms, axis=0).astype(np.float64))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, atol=1e-5)
    # Geometric and arithmetic means differ for disagreeing members.
    assert np.abs(out - ensemble_log_posteriors(ms)).max() > 1e-3


def test_memmapped_inputs_and_float16_output(tmp_path):
    ms = _members(3, n=100)
    paths = []
    for i, m in enumerate(ms):
        p = tmp_path / f"m{i}.npy"
        np.save(p, m.astype(np.float16))
        paths.append(p)
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float16, shape=ms[0].shape)
    res = ensemble_log_posteriors(paths, chunk_frames=16, out=out)
    assert res is out
    expected = ensemble_log_posteriors([m.astype(np.float16) for m in ms])
    np.testing.assert_allclose(out.astype(np.float32), expected, atol=1e-2)


def test_errors():
    ms = _members(2)
    with pytest.raises(EnsembleError, match="shape"):
        ensemble_log_posteriors([ms[0], ms[1][:10]])
    with pytest.raises(ValueError, match="mode"):
        ensemble_log_posteriors(ms, mode="harmonic")
    with pytest.raises(EnsembleError, match="zero members"):
        ensemble_log_posteriors([])
    with pytest.raises(EnsembleError, match="does not exist"):
        ensemble_log_posteriors(["/nonexistent/post.npy"])


def test_order_members_by_seed(tmp_path):
    dirs = [tmp_path / f"seed{i}" for i in (10, 2, 1)]
    assert [d.name for d in order_members_by_seed(dirs)] == ["seed1", "seed2", "seed10"]
    other = [tmp_path / "b", tmp_path / "a"]
    assert order_members_by_seed(other) == other


def _write_members(tmp_path, sets, m=4, n=30, p=5):
    members = []
    for i in range(1, m + 1):
        d = tmp_path / "members" / f"seed{i}"
        for s_i, s in enumerate(sets):
            (d / "post").mkdir(parents=True, exist_ok=True)
            np.save(d / "post" / f"{s}.npy", _members(1, n=n + s_i, p=p, seed=100 * i + s_i)[0].astype(np.float16))
        members.append(d)
    return members


def test_write_ensemble(tmp_path):
    sets = ["dev", "test"]
    members = _write_members(tmp_path, sets)
    out = tmp_path / "ensemble"
    got = write_ensemble(list(reversed(members)), sets, out, sizes=[1, 2])
    assert sorted(got) == [1, 2, 4]  # the full ensemble is always written
    for s in sets:
        one = np.load(got[1] / f"{s}.npy")
        np.testing.assert_array_equal(one, np.load(members[0] / "post" / f"{s}.npy"))  # first by seed
        two = np.load(got[2] / f"{s}.npy")
        assert two.dtype == np.float16
        expected = ensemble_log_posteriors([m / "post" / f"{s}.npy" for m in members[:2]])
        np.testing.assert_allclose(two.astype(np.float32), expected, atol=1e-2)
    info = json.loads((got[4] / "members.json").read_text())
    assert info["k"] == 4 and info["members"] == [str(m) for m in members]
    assert (out / ".done").is_file() and (out / "config.yaml").is_file()
    # A rerun with the same inputs writes the same posteriors; a different mode recomputes.
    first = (got[2] / "dev.npy").read_bytes()
    write_ensemble(members, sets, out, sizes=[1, 2])
    assert (got[2] / "dev.npy").read_bytes() == first
    write_ensemble(members, sets, out, sizes=[1, 2], cfg=EnsembleConfig(mode="geometric"))
    geo = np.load(got[2] / "dev.npy").astype(np.float32)
    expected = ensemble_log_posteriors([m / "post" / "dev.npy" for m in members[:2]], mode="geometric")
    np.testing.assert_allclose(geo, expected, atol=1e-2)


def test_write_ensemble_errors(tmp_path):
    members = _write_members(tmp_path, ["dev"], m=2)
    with pytest.raises(EnsembleError, match="outside 1..2"):
        write_ensemble(members, ["dev"], tmp_path / "e", sizes=[3])
    with pytest.raises(EnsembleError, match="missing posteriors"):
        write_ensemble(members, ["test"], tmp_path / "e2")


def test_cli(tmp_path):
    from asr.cli import main

    members = _write_members(tmp_path, ["dev"], m=3)
    rc = main(["ensemble", "--members", *map(str, members), "--sets", "dev", "--sizes", "1,2",
               "--out-dir", str(tmp_path / "ens"), "--mode", "geometric"])
    assert rc == 0
    for k in (1, 2, 3):
        assert (tmp_path / "ens" / f"post_{k}" / "dev.npy").is_file()
    assert "mode: geometric" in (tmp_path / "ens" / "config.yaml").read_text()


def test_ensemble_priors_and_frame_accuracy(tmp_path):
    """An arithmetic ensemble's posterior priors are the mean of its members'; every size gets its
    frame accuracy against the reference labels without decoding."""
    from asr.labels import write_labels

    members = _write_members(tmp_path, ["dev"], m=3, n=30, p=5)
    g = np.random.default_rng(5)
    for d in members:
        pri = g.dirichlet(np.ones(5))
        np.save(d / "priors.npy", pri)
    labels = g.integers(-1, 5, size=30)
    write_labels(tmp_path / "ali" / "dev", labels, {}, num_pdfs=5, num_utts=1)
    got = write_ensemble(members, ["dev"], tmp_path / "ens", sizes=[2], ali_root=tmp_path / "ali")
    expected = np.mean([np.load(d / "priors.npy") for d in members[:2]], axis=0)
    np.testing.assert_allclose(np.load(got[2] / "priors.npy"), expected / expected.sum(), rtol=1e-12)
    post = np.load(got[2] / "dev.npy").astype(np.float32)
    ok = labels >= 0
    want = 100.0 * float((post.argmax(1) == labels)[ok].mean())
    assert json.loads((got[2] / "frame_acc.json").read_text())["frame_acc"]["dev"] == pytest.approx(want)
