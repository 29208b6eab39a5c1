"""Lexicon: stress removal, CMUdict parsing, merging, vocabulary restriction, OOV counting."""

from __future__ import annotations

import json

import pytest

from asr.lexicon import (
    PHONES,
    SPN,
    UNK,
    LexiconConfig,
    LexiconError,
    build_lexicon,
    load_cmudict,
    map_oov,
    merge_lexicons,
    oov_report,
    prepare_lexicon,
    read_lexicon,
    strip_stress,
)
from asr.manifest import Utterance, write_manifest


def test_phone_set_is_the_39_cmu_phones():
    assert len(PHONES) == 39 == len(set(PHONES))
    assert all(p.isalpha() and p.isupper() for p in PHONES)
    assert {"AA", "ZH", "NG", "DH"} <= set(PHONES)


def test_strip_stress():
    assert [strip_stress(p) for p in ("AH0", "EY1", "IH2", "K", "SPN")] == ["AH", "EY", "IH", "K", "SPN"]


def test_cmudict_is_upper_case_unstressed_with_variants():
    d = load_cmudict()
    assert len(d) > 120_000
    assert d["READ"] == [("R", "EH", "D"), ("R", "IY", "D")]  # READ and READ(2)
    assert all(w == w.upper() and "(" not in w for w in list(d)[:5000])
    phones = {p for prons in d.values() for pron in prons for p in pron}
    assert phones == set(PHONES)
    # Pronunciations that differ only in stress collapse into one.
    assert all(len(set(prons)) == len(prons) for prons in d.values())
    d["READ"].append(("X",))  # callers get their own copy
    assert load_cmudict()["READ"] == [("R", "EH", "D"), ("R", "IY", "D")]


def test_read_lexicon_librispeech_format(tmp_path):
    p = tmp_path / "librispeech-lexicon.txt"
    p.write_text("A\tAH0\nA\tEY1\nABBA\tAE1 B AH0\nZYZZYVA\tZ IH1 Z IH0 V AH0\n", encoding="utf-8")
    lex = read_lexicon(p)
    assert lex == {"A": [("AH",), ("EY",)], "ABBA": [("AE", "B", "AH")], "ZYZZYVA": [("Z", "IH", "Z", "IH", "V", "AH")]}
    kept = read_lexicon(p, strip=False)
    assert kept["A"] == [("AH0",), ("EY1",)]


@pytest.mark.parametrize("line,problem", [("HELLO HH AH0 L QX1", "unknown phone"), ("HELLO", "no pronunciation")])
def test_bad_lexicon_line_names_the_line(tmp_path, line, problem):
    p = tmp_path / "lex.txt"
    p.write_text(f"WORLD W ER1 L D\n{line}\n", encoding="utf-8")
    with pytest.raises(LexiconError, match=rf"lex.txt: line 2: .*{problem}"):
        read_lexicon(p)


def test_merge_keeps_order_and_removes_duplicates():
    a = {"TOMATO": [("T", "AH", "M", "EY", "T", "OW")]}
    b = {"TOMATO": [("T", "AH", "M", "AA", "T", "OW"), ("T", "AH", "M", "EY", "T", "OW")], "NEW": [("N", "UW")]}
    m = merge_lexicons(a, b)
    assert m["TOMATO"] == [("T", "AH", "M", "EY", "T", "OW"), ("T", "AH", "M", "AA", "T", "OW")]
    assert m["NEW"] == [("N", "UW")]


def test_build_lexicon_merges_extra_and_restricts(tmp_path):
    extra = tmp_path / "extra.txt"
    extra.write_text("ZEBEDEE Z EH1 B AH0 D IY0\nREAD R EY1 D\n", encoding="utf-8")
    out = tmp_path / "lexicon.txt"
    lex = build_lexicon(out, extra=[extra], vocabulary=["read", "ZEBEDEE", "THE", "NOSUCHWORDXYZ"])
    assert set(lex) == {"READ", "ZEBEDEE", "THE", UNK}
    assert lex["READ"] == [("R", "EH", "D"), ("R", "IY", "D"), ("R", "EY", "D")]
    lines = out.read_text().splitlines()
    assert f"{UNK} {SPN}" in lines
    assert "ZEBEDEE Z EH B AH D IY" in lines
    assert sum(line.startswith("READ ") for line in lines) == 3
    assert lines == sorted(lines, key=lambda x: x.split()[0])
    assert read_lexicon(out) == lex


def test_oov_report_counts_tokens_and_utterances():
    lex = {"THE": [("DH", "AH")], "LORD": [("L", "AO", "R", "D")], "SAID": [("S", "EH", "D")]}
    rep = oov_report(["THE LORD SAID", "THE ZEBEDEE SAID ZEBEDEE", "ABRAM SAID"], lex, top=5)
    assert rep["num_utts"] == 3 and rep["num_words"] == 9
    assert rep["oov_count"] == 3 and rep["oov_rate"] == pytest.approx(3 / 9)
    assert rep["oov_utts"] == 2 and rep["oov_utt_rate"] == pytest.approx(2 / 3)
    assert rep["oov_types"] == 2
    assert rep["top"] == [["ZEBEDEE", 2], ["ABRAM", 1]]
    assert map_oov("THE ABRAM SAID".split(), lex) == ["THE", UNK, "SAID"]


def test_prepare_lexicon_writes_oov_json_per_set(tmp_path):
    data = tmp_path / "data"
    for name, texts in {"train": ["THE LORD SAID", "AND GOD SAW"], "dev": ["ZEBEDEE SAID UNTO LOT"]}.items():
        utts = [Utterance(f"1-2-{i:04d}", "1", "2", "/x.flac", 16000, 16000, t) for i, t in enumerate(texts)]
        write_manifest(data / name / "manifest.jsonl", utts)
    cfg = LexiconConfig(manifests=(str(data / "train/manifest.jsonl"), str(data / "dev/manifest.jsonl")))
    lex_path = prepare_lexicon(data / "local", cfg)
    assert lex_path == data / "local" / "lexicon.txt" and (data / "local" / ".done").is_file()
    train = json.loads((data / "train" / "oov.json").read_text())
    dev = json.loads((data / "dev" / "oov.json").read_text())
    assert train["oov_count"] == 0
    cmu = load_cmudict()
    expected = [w for w in "ZEBEDEE SAID UNTO LOT".split() if w not in cmu]
    assert expected == ["ZEBEDEE"]
    assert dev["oov_count"] == len(expected) and dev["num_words"] == 4
    assert [w for w, _ in dev["top"]] == sorted(expected)
    # A rerun with the same config writes the same lexicon (skipping is asr/step.py's decision).
    first = lex_path.read_bytes()
    prepare_lexicon(data / "local", cfg)
    assert lex_path.read_bytes() == first
