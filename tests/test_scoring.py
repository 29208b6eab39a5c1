"""Scoring: WER counts, the Kaldi per_utt file, frame accuracy and the results folder."""

from __future__ import annotations

import json

import jiwer
import numpy as np
import pytest

from asr.scoring import (
    ScoringError,
    compute_wer,
    format_per_utt,
    frame_accuracy,
    read_hyps,
    score_decode,
)


def test_identical_is_zero():
    refs = {"u1": "A B C", "u2": "D E"}
    res = compute_wer(refs, dict(refs))
    assert res["wer"] == 0.0
    assert (res["sub"], res["del"], res["ins"]) == (0, 0, 0)
    assert res["ref_words"] == 5 and res["corr"] == 5 and res["utts"] == 2


def test_hand_computed_per_utt():
    # ref: THE CAT SAT ON THE MAT ; hyp: THE BAT SAT THE MAT MAT
    # alignment: THE=C, CAT->BAT=S, SAT=C, ON=D, THE=C, MAT=C, +MAT=I  -> C4 S1 I1 D1
    refs = {"u1": "THE CAT SAT ON THE MAT", "u2": "HELLO"}
    hyps = {"u1": "THE BAT SAT THE MAT MAT", "u2": ""}
    res = compute_wer(refs, hyps)
    u1 = res["per_utt"]["u1"]
    assert (u1["C"], u1["S"], u1["I"], u1["D"]) == (4, 1, 1, 1)
    assert (res["per_utt"]["u2"]["D"], res["per_utt"]["u2"]["C"]) == (1, 0)
    assert (res["sub"], res["del"], res["ins"]) == (1, 2, 1)
    assert res["ref_words"] == 7
    assert res["wer"] == pytest.approx(100 * 4 / 7)
    assert res["sent_err"] == pytest.approx(100.0)
    text = format_per_utt(res["per_utt"])
    lines = text.splitlines()
    assert lines[3] == "u1 #csid 4 1 1 1"
    assert lines[7] == "u2 #csid 0 0 0 1"
    assert lines[0].split()[2:] == ["THE", "CAT", "SAT", "ON", "THE", "MAT", "***"]
    assert lines[1].split()[2:] == ["THE", "BAT", "SAT", "***", "THE", "MAT", "MAT"]
    assert lines[2].split()[2:] == ["C", "S", "C", "D", "C", "C", "I"]
    # columns line up: every token of a column starts at the same offset
    assert [len(line) >= len(lines[2]) - 1 for line in lines[:2]] == [True, True]
    assert lines[0].index("CAT") == lines[1].index("BAT") == lines[2].index("S")


def test_matches_jiwer_on_random_strings():
    rng = np.random.default_rng(3)
    vocab = list("ABCDEFG")
    refs, hyps = {}, {}
    for i in range(40):
        refs[f"u{i:02d}"] = " ".join(rng.choice(vocab, rng.integers(1, 12)))
        hyps[f"u{i:02d}"] = " ".join(rng.choice(vocab, rng.integers(0, 12)))
    res = compute_wer(refs, hyps)
    ids = sorted(refs)
    jw = jiwer.process_words([refs[i] for i in ids], [hyps[i] if hyps[i] else "" for i in ids])
    assert res["errors"] == jw.substitutions + jw.deletions + jw.insertions
    assert res["wer"] == pytest.approx(100 * jw.wer)


def test_missing_and_extra_hyps():
    res = compute_wer({"a": "X Y", "b": "Z"}, {"a": "X Y", "c": "Q"})
    assert res["missing_hyps"] == 1 and res["extra_hyps"] == 1
    assert res["del"] == 1 and res["ins"] == 0


def test_frame_accuracy_ignores_minus_one():
    post = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.9, 0.05, 0.05]]))
    labels = np.array([0, 2, 2, -1])
    acc, n = frame_accuracy(post.astype(np.float16), labels, chunk=2)
    assert n == 3
    assert acc == pytest.approx(100 * 2 / 3)
    with pytest.raises(ScoringError):
        frame_accuracy(post, labels[:3])
    with pytest.raises(ScoringError):
        frame_accuracy(post, np.array([0, 1, 2, 3]))


def test_score_decode_writes_folder(tmp_path):
    refs = {"u1": "A B C", "u2": "D"}
    hyps = {"u1": "A C", "u2": "D E"}
    post = np.log(np.eye(3)[[0, 1, 2, 2]] * 0.9 + 0.05)
    labels = np.array([0, 1, 1, -1])
    summary = score_decode(tmp_path / "sys" / "dev", refs, hyps, log_post=post, labels=labels,
                           partial=["u2"], extra={"acwt": 0.1})
    d = tmp_path / "sys" / "dev"
    wer = json.loads((d / "wer.json").read_text())
    assert wer == summary
    assert (wer["sub"], wer["del"], wer["ins"], wer["ref_words"]) == (0, 1, 1, 4)
    assert wer["wer"] == pytest.approx(50.0) and wer["partial"] == 1 and wer["acwt"] == 0.1
    fa = json.loads((d / "frame_acc.json").read_text())
    assert fa["frames"] == 3 and fa["frame_acc"] == pytest.approx(100 * 2 / 3)
    assert read_hyps(d / "hyp.txt") == hyps
    assert (d / "partial.txt").read_text() == "u2\n"
    assert "u1 #csid 2 0 0 1" in (d / "per_utt").read_text()
    assert (d / ".done").is_file()
