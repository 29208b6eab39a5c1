"""Paired bootstrap of WER differences and the per_utt reader."""

from __future__ import annotations

import numpy as np
import pytest

from asr.scoring import compute_wer, write_per_utt
from asr.significance import (
    PerUttError,
    align_utt_errors,
    paired_bootstrap_wer,
    read_per_utt,
)


def _systems(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ref = rng.integers(5, 30, size=n)
    a = rng.binomial(ref, 0.12)
    b = rng.binomial(ref, 0.09)
    return a, b, ref


def test_point_estimate_is_wer_difference_and_inside_ci():
    rng = np.random.default_rng(3)
    a, b, ref = _systems(300, rng)
    res = paired_bootstrap_wer(a, b, ref, num_samples=500, seed=1)
    expected = 100.0 * (b.sum() / ref.sum() - a.sum() / ref.sum())
    assert res["delta"] == pytest.approx(expected)
    assert res["ci_low"] <= res["delta"] <= res["ci_high"]
    assert res["ci_low"] < res["ci_high"]
    assert 0.0 <= res["p_value"] <= 1.0
    assert res["num_utts"] == 300


def test_interval_shrinks_with_more_utterances():
    rng = np.random.default_rng(0)
    small = paired_bootstrap_wer(*_systems(40, rng), num_samples=800, seed=0)
    large = paired_bootstrap_wer(*_systems(4000, rng), num_samples=800, seed=0)
    w_small = small["ci_high"] - small["ci_low"]
    w_large = large["ci_high"] - large["ci_low"]
    assert w_large < 0.5 * w_small  # ~sqrt(100) = 10x narrower in expectation
    # With 4000 utterances a 3-point true difference is clearly significant.
    assert large["ci_high"] < 0 and large["p_value"] < 0.01


def test_identical_systems_give_zero_and_p_one():
    rng = np.random.default_rng(1)
    a, _, ref = _systems(50, rng)
    res = paired_bootstrap_wer(a, a.copy(), ref, num_samples=200)
    assert res["delta"] == 0.0 and res["ci_low"] == 0.0 and res["ci_high"] == 0.0
    assert res["p_value"] == 1.0


def test_deterministic_for_seed_and_changes_with_seed():
    rng = np.random.default_rng(2)
    a, b, ref = _systems(100, rng)
    r1 = paired_bootstrap_wer(a, b, ref, num_samples=300, seed=5)
    r2 = paired_bootstrap_wer(a, b, ref, num_samples=300, seed=5)
    r3 = paired_bootstrap_wer(a, b, ref, num_samples=300, seed=6)
    assert r1 == r2
    assert (r1["ci_low"], r1["ci_high"]) != (r3["ci_low"], r3["ci_high"])


@pytest.mark.parametrize("bad", [
    dict(errs_a=[1, 2], errs_b=[1], ref_words=[3, 3]),
    dict(errs_a=[], errs_b=[], ref_words=[]),
    dict(errs_a=[1], errs_b=[1], ref_words=[0]),
    dict(errs_a=[-1], errs_b=[1], ref_words=[3]),
])
def test_bad_input_raises(bad):
    with pytest.raises(ValueError):
        paired_bootstrap_wer(**bad)


def test_read_per_utt_from_scoring_output(tmp_path):
    refs = {"u1": "THE CAT SAT ON THE MAT", "u2": "HELLO WORLD", "u3": "A B C"}
    hyps = {"u1": "THE BAT SAT THE MAT MAT", "u2": "", "u3": "A B C"}
    res = compute_wer(refs, hyps)
    write_per_utt(tmp_path / "per_utt", res["per_utt"])
    got = read_per_utt(tmp_path / "per_utt")
    assert sorted(got) == ["u1", "u2", "u3"]
    for u, d in res["per_utt"].items():
        assert got[u].errors == d["S"] + d["I"] + d["D"]
        assert got[u].ref_words == d["C"] + d["S"] + d["D"] == len(refs[u].split())
    assert sum(e.errors for e in got.values()) == res["errors"]


def test_read_per_utt_errors(tmp_path):
    p = tmp_path / "per_utt"
    p.write_text("u1 ref A B\nu1 #csid 1 x 0 0\n")
    with pytest.raises(PerUttError, match="per_utt:2"):
        read_per_utt(p)
    p.write_text("u1 #csid 1 0 0 0\nu1 #csid 1 0 0 0\n")
    with pytest.raises(PerUttError, match="u1 listed twice"):
        read_per_utt(p)
    with pytest.raises(PerUttError, match="does not exist"):
        read_per_utt(tmp_path / "nope")


def test_align_requires_same_utterances(tmp_path):
    (tmp_path / "a").write_text("u1 #csid 3 1 0 0\nu2 #csid 2 0 1 0\n")
    (tmp_path / "b").write_text("u1 #csid 4 0 0 0\nu2 #csid 1 1 0 0\n")
    (tmp_path / "c").write_text("u1 #csid 4 0 0 0\n")
    a, b, c = (read_per_utt(tmp_path / n) for n in "abc")
    ea, eb, ref = align_utt_errors(a, b)
    assert ea.tolist() == [1, 1] and eb.tolist() == [0, 1] and ref.tolist() == [4, 2]
    with pytest.raises(PerUttError, match="different utterances"):
        align_utt_errors(a, c, "A", "C")
