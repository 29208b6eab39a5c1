"""Splitting one subset by speaker (mini-LibriSpeech without dev-clean-2): deterministic,
speaker-disjoint, balanced by sex, and usable from prepare-librispeech --split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from asr.manifest import Utterance, read_manifest, write_manifest
from conftest import make_librispeech
from data_prep.speaker_split import SplitError, assign_speakers, parse_split, part_sizes, split_subset


def _sexes(num_f: int, num_m: int) -> dict[str, str]:
    out = {str(100 + i): "F" for i in range(num_f)}
    out.update({str(200 + i): "M" for i in range(num_m)})
    return out


def _data(tmp_path: Path, sexes: dict[str, str], utts_per_speaker: int = 3) -> tuple[Path, dict]:
    utts = [Utterance(id=f"{s}-1-{i:04d}", speaker=s, chapter="1", audio="/nonexistent.flac",
                      num_samples=16000 * (i + 1), sample_rate=16000, text="HELLO")
            for s in sexes for i in range(utts_per_speaker)]
    write_manifest(tmp_path / "data" / "all" / "manifest.jsonl", utts)
    table = {s: {"sex": x, "subset": "all", "minutes": 1.0, "name": s} for s, x in sexes.items()}
    return tmp_path / "data", table


def test_split_is_deterministic_disjoint_and_balanced(tmp_path):
    sexes = _sexes(16, 12)      # the sexes of train-clean-5's 28 readers
    data, table = _data(tmp_path, sexes)
    spec = parse_split("all:train=20,dev=4,test=4")
    out = split_subset(data, spec, table)
    first = {n: p.read_text() for n, p in out.items()}
    parts = {n: {u.speaker for u in read_manifest(p)} for n, p in out.items()}
    assert {n: len(v) for n, v in parts.items()} == {"train": 20, "dev": 4, "test": 4}
    assert not (parts["train"] & parts["dev"]) and not (parts["train"] & parts["test"]) \
        and not (parts["dev"] & parts["test"])
    assert parts["train"] | parts["dev"] | parts["test"] == set(sexes)
    for n in ("dev", "test"):
        assert sorted(sexes[s] for s in parts[n]) == ["F", "F", "M", "M"], n
    # every utterance of a speaker goes with it
    assert all(len(read_manifest(p)) == 3 * len(parts[n]) for n, p in out.items())
    # same spec, same seed: byte-identical manifests; another seed: another split
    out2 = split_subset(data, spec, table)
    assert {n: p.read_text() for n, p in out2.items()} == first
    other = assign_speakers(sexes, part_sizes(spec, 28), seed=1)
    assert {n: set(v) for n, v in other.items()} != parts
    summary = json.loads((data / "all" / "split.json").read_text())
    assert summary["parts"]["dev"]["sexes"] == {"F": 2, "M": 2}


def test_split_fractions_and_unknown_sex(tmp_path):
    sexes = {str(300 + i): "?" for i in range(10)}
    spec = parse_split("all:dev=0.5,test=0.5")
    sizes = part_sizes(spec, 10)
    assert sizes == {"dev": 5, "test": 5}
    parts = assign_speakers(sexes, sizes)
    assert set(parts["dev"]).isdisjoint(parts["test"]) and len(set(parts["dev"]) | set(parts["test"])) == 10


@pytest.mark.parametrize("spec, match", [
    ("train=20,dev=4", "SUBSET:NAME"),
    ("all:train=20,dev=0.5", "mix of counts and fractions"),
    ("all:train=0.8,dev=0.3", "sum to more than 1"),
    ("all:train=2,train=1", "distinct"),
    ("all:all=3", "distinct"),
    ("all:dev=0", "more than 0"),
    ("all:de v=1", "bad part"),
])
def test_bad_specs_are_refused(spec, match):
    with pytest.raises(SplitError, match=match):
        parse_split(spec)


def test_too_many_speakers_requested(tmp_path):
    data, table = _data(tmp_path, _sexes(2, 2))
    with pytest.raises(SplitError, match="needs 5 speakers, the subset has 4"):
        split_subset(data, parse_split("all:train=3,dev=1,test=1"), table)


def test_prepare_librispeech_split_option(tmp_path):
    from data_prep.librispeech import _cli_prepare

    layout = {r: {"10": ["HELLO WORLD", "THE QUICK BROWN FOX"]} for r in ("19", "26", "31", "42")}
    corpus = make_librispeech(tmp_path / "LibriSpeech", "train-clean-5", layout)
    speakers = corpus / "SPEAKERS.TXT"
    speakers.write_text(speakers.read_text() + "31   | F | train-clean-5 | 0.05 | A\n42   | M | train-clean-5 | 0.05 | B\n")
    out = tmp_path / "data"
    args = argparse.Namespace(corpus_dir=str(corpus), subsets="", out_dir=str(out), nj=1, skip_bad=False, min_rms_db=-60.0,
                              split=["train-clean-5:train=2,dev=1,test=1"], split_seed=0)
    assert _cli_prepare(args) == 0
    spk = {n: {u.speaker for u in read_manifest(out / n / "manifest.jsonl")} for n in ("train", "dev", "test")}
    assert sorted(s for v in spk.values() for s in v) == ["19", "26", "31", "42"]
    assert len(spk["train"]) == 2
    sex = {"19": "F", "26": "M", "31": "F", "42": "M"}
    assert sorted(sex[s] for s in spk["train"]) == ["F", "M"]   # one of each sex per part where possible
    assert json.loads((out / "dev" / "speakers.json").read_text()).keys() == spk["dev"]
