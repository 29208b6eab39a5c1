"""The synthetic mini corpus: text handling, planning, determinism, resumability, layout."""

from __future__ import annotations

import collections
import filecmp
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import data_prep.mini_corpus as mc
from asr.lexicon import load_cmudict
from asr.manifest import read_manifest
from data_prep.librispeech import find_subsets, prepare_librispeech, read_speakers
from data_prep.mini_corpus import (
    SUBSETS,
    MiniCorpusConfig,
    build_mini_corpus,
    normalise_text,
    plan_corpus,
    segment_chapter,
    tts_text,
)

TINY = dict(num_utts=8, train_speakers=2, eval_speakers=1, engine_weights=(0.34, 0.33, 0.33))


def test_normalise_text():
    assert normalise_text("And he said, Am I my brother's keeper?") == "AND HE SAID AM I MY BROTHER'S KEEPER"
    assert normalise_text("to God-ward, sin--; (and LORD)") == "TO GOD WARD SIN AND LORD"


def test_tts_text_has_the_same_words():
    raw = "Yet now, if thou wilt forgive their sin--; and if not, blot me (the LORD's servant) out."
    t = tts_text(raw)
    assert "LORD" not in t and "Lord's" in t and "(" not in t and "--" not in t
    assert normalise_text(t) == normalise_text(raw)


def test_segment_chapter_cuts_long_verses_at_punctuation():
    verses = [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep, and the Spirit "
        "of God moved upon the face of the waters, and it was so, and they were all there together.",
        "Jesus wept.",
        " ".join(["word"] * 45) + ".",
    ]
    segs = segment_chapter(verses, 6, 20)
    assert [s.index for s in segs] == list(range(len(segs)))
    lengths = [len(s.text.split()) for s in segs]
    assert all(6 <= n <= 20 for n in lengths)
    assert segs[0].text == "IN THE BEGINNING GOD CREATED THE HEAVEN AND THE EARTH"
    # Every kept word appears in order: the segments are a subsequence of the chapter's words.
    all_words = normalise_text(" ".join(verses)).split()
    kept = " ".join(s.text for s in segs).split()
    it = iter(all_words)
    assert all(w in it for w in kept)
    assert len(kept) >= len(all_words) - 2  # at most the lone short verse is left out
    assert all(normalise_text(s.tts) == s.text for s in segs)


def test_default_plan_sizes_speakers_voices_and_oov():
    cfg = MiniCorpusConfig()
    plan = plan_corpus(cfg)
    counts = collections.Counter(u.subset for u in plan.utts)
    assert sum(counts.values()) == cfg.num_utts
    assert counts["train-clean"] == pytest.approx(0.76 * cfg.num_utts, abs=2)
    spk_subset = {s.id: s.subset for s in plan.speakers}
    assert len(spk_subset) == len(plan.speakers)  # speaker ids unique, so subsets are disjoint
    assert all(spk_subset[u.speaker] == u.subset for u in plan.utts)
    assert all(s.id.isdigit() for s in plan.speakers)
    assert len({u.id for u in plan.utts}) == len(plan.utts)
    train_voices = {s.voice for s in plan.speakers if s.subset == "train-clean"}
    other_voices = {s.voice for s in plan.speakers if s.subset == "test-other"}
    assert not train_voices & other_voices
    assert {v.engine for v in train_voices} == {"espeak-ng", "flite", "festival"}
    lex = load_cmudict()
    for u in plan.utts:
        words = u.text.split()
        assert cfg.min_words <= len(words) <= cfg.max_words
        assert u.oov == any(w not in lex for w in words)
        if u.subset == "train-clean":
            assert not u.oov
    for subset in SUBSETS[1:]:
        oov = sum(u.oov for u in plan.utts if u.subset == subset)
        assert 0 < oov <= cfg.eval_oov_share * counts[subset]
    train_chapters = {u.chapter for u in plan.utts if u.subset == "train-clean"}
    eval_chapters = {u.chapter for u in plan.utts if u.subset != "train-clean"}
    assert not train_chapters & eval_chapters and eval_chapters <= plan.eval_chapters
    # The same seed plans the same corpus; another seed another one.
    assert plan_corpus(cfg) == plan
    assert plan_corpus(MiniCorpusConfig(seed=2)).utts != plan.utts


def test_config_is_validated():
    with pytest.raises(ValueError, match="sum to 1"):
        MiniCorpusConfig(train_share=0.9)
    with pytest.raises(ValueError, match="min_words"):
        MiniCorpusConfig(min_words=10, max_words=5)
    with pytest.raises(ValueError, match="engine_weights"):
        MiniCorpusConfig(engine_weights=(1.0, 0.0))


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini") / "corpus"
    build_mini_corpus(root, MiniCorpusConfig(seed=3, **TINY), nj=1)
    return root


def test_same_seed_gives_identical_files_other_seed_differs(tiny_corpus, tmp_path):
    again = build_mini_corpus(tmp_path / "again", MiniCorpusConfig(seed=3, **TINY), nj=2)
    files = _files(tiny_corpus)
    assert files == _files(again)
    assert sum(f.suffix == ".flac" for f in files) == 8
    match, mismatch, errors = filecmp.cmpfiles(tiny_corpus, again, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    other = build_mini_corpus(tmp_path / "other", MiniCorpusConfig(seed=4, **TINY), nj=1)
    assert (other / "SPEAKERS.TXT").read_text() != (tiny_corpus / "SPEAKERS.TXT").read_text()
    assert {f for f in _files(other) if f.suffix == ".flac"} != {f for f in files if f.suffix == ".flac"}


def test_layout_reads_back_as_librispeech(tiny_corpus, tmp_path):
    assert find_subsets(tiny_corpus) == sorted(SUBSETS)
    res = prepare_librispeech(tiny_corpus, None, tmp_path / "data")
    utts = {s: read_manifest(p) for s, p in res.items()}
    assert sum(len(v) for v in utts.values()) == 8
    speakers = {s: {u.speaker for u in v} for s, v in utts.items()}
    for a in SUBSETS:
        for b in SUBSETS:
            if a != b:
                assert not speakers[a] & speakers[b]
    table = read_speakers(tiny_corpus / "SPEAKERS.TXT")
    assert set(table) == set().union(*speakers.values())
    for s, v in utts.items():
        for u in v:
            assert table[u.speaker]["subset"] == s
            assert u.sample_rate == 16000 and 0.8 < u.duration < 12.0
            x, _ = sf.read(u.audio)
            rms_db = 20 * np.log10(np.sqrt(np.mean(x ** 2)))
            assert -45 < rms_db < -10 and np.max(np.abs(x)) < 1.0
    lm = (tiny_corpus / "lm_text.txt").read_text().splitlines()
    assert len(lm) > 20000 and all(line == line.upper() for line in lm[:1000])
    # Training text is in the LM text (whole chapters, in order); dev/test chapters are not.
    joined = " " + " ".join(lm) + " "
    for s, v in utts.items():
        for u in v:
            if len(u.text.split()) >= 14:  # shorter ones may be formulae found elsewhere
                assert (f" {u.text} " in joined) == (s == "train-clean"), u.id
    readme = (tiny_corpus / "README").read_text()
    assert "espeak-ng" in readme and "test-other" in readme


def test_resume_synthesises_only_missing_utterances(tiny_corpus, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_corpus, root)
    victim = next(p for p in sorted(root.rglob("*.flac")))
    original = victim.read_bytes()
    victim.unlink()
    (root / ".done").unlink()
    made = []
    real = mc._render

    def counting(spk, u, *a, **k):
        made.append(u.id)
        return real(spk, u, *a, **k)

    monkeypatch.setattr(mc, "_render", counting)
    build_mini_corpus(root, MiniCorpusConfig(seed=3, **TINY), nj=1)
    assert made == [victim.stem]
    assert victim.read_bytes() == original
    assert (root / ".done").is_file()
    with pytest.raises(mc.MiniCorpusError, match="another config"):
        build_mini_corpus(root, MiniCorpusConfig(seed=5, **TINY), nj=1)


def test_transfer_subset_adds_new_speakers_and_leaves_the_rest_unchanged():
    """The unlabelled transfer subset: new training-like speakers, chapters nobody else reads (so no
    dev/test text), and every other subset identical to the corpus built without it."""
    from data_prep.mini_corpus import TRANSFER_SUBSET

    base = plan_corpus(MiniCorpusConfig(num_utts=200))
    plan = plan_corpus(MiniCorpusConfig(num_utts=200, transfer_utts=120, transfer_speakers=10))
    assert [u for u in plan.utts if u.subset != TRANSFER_SUBSET] == list(base.utts)
    assert [s for s in plan.speakers if s.subset != TRANSFER_SUBSET] == list(base.speakers)
    extra = [u for u in plan.utts if u.subset == TRANSFER_SUBSET]
    extra_spk = {s.id for s in plan.speakers if s.subset == TRANSFER_SUBSET}
    assert len(extra) == 120 and len(extra_spk) == 10
    assert not extra_spk & {s.id for s in base.speakers}
    assert not {u.chapter for u in extra} & {u.chapter for u in base.utts}
    eval_texts = {u.text for u in base.utts if u.subset != "train-clean"}
    assert not {u.text for u in extra} & eval_texts
    other_voices = {s.voice for s in plan.speakers if s.subset == "test-other"}
    assert not {s.voice for s in plan.speakers if s.subset == TRANSFER_SUBSET} & other_voices
    assert MiniCorpusConfig(transfer_utts=5).subsets[-1] == TRANSFER_SUBSET
