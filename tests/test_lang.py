"""Tests for asr.lang: symbol tables, topology, disambiguation and the lexicon FSTs."""

from __future__ import annotations

import kaldi_hmm_gmm as khg  # noqa: F401  (before kaldifst)
import kaldifst
import pytest

from asr.lang import CMU_PHONES, LangConfig, LangError, load_lang, prepare_lang

LEXICON = """<UNK> SPN
A AH0
A EY1
AN AE1 N
AND AE1 N D
ANT AE1 N T
AUNT AE1 N T
CAT K AE1 T
THE DH AH0
THE DH IY0
ZEBRA Z IY1 B R AH0
"""


@pytest.fixture(scope="module")
def lang(tmp_path_factory):
    d = tmp_path_factory.mktemp("lang")
    (d / "lexicon.txt").write_text(LEXICON)
    prepare_lang(d / "lexicon.txt", d / "lang", LangConfig())
    return load_lang(d / "lang")


def _pron_of(lang, name: str = "lexicon.txt") -> list[tuple[str, list[str]]]:
    out = []
    for line in (lang.dir / name).read_text().splitlines():
        w, *p = line.split()
        out.append((w, p))
    return out


def _words_through(fst, phone_ids: list[int]) -> list[int] | None:
    """Word ids of the best path of ``fst`` accepting exactly ``phone_ids``; None if no path."""
    acc = kaldifst.make_linear_acceptor(phone_ids)
    composed = kaldifst.compose(acc, fst)
    if composed.num_states == 0:
        return None
    best = kaldifst.shortest_path(composed)
    ok, _, osyms, _ = kaldifst.get_linear_symbol_sequence(best)
    assert ok
    return list(osyms)


def test_symbol_tables(lang):
    assert lang.phones[0] == "<eps>" and lang.words[0] == "<eps>"
    assert set(CMU_PHONES) <= set(lang.phones)
    assert len(CMU_PHONES) == 39
    assert [lang.phones[i] for i in lang.silence_phone_ids] == ["SIL", "SPN"]
    assert lang.phones[lang.optional_silence_id] == "SIL"
    # disambiguation symbols are the last phones, #0 first, contiguous
    names = [lang.phones[i] for i in lang.disambig_phone_ids]
    assert names == [f"#{i}" for i in range(len(names))]
    assert lang.disambig_phone_ids == list(range(len(lang.phones) - len(names), len(lang.phones)))
    assert lang.words[-3:] == ["#0", "<s>", "</s>"]
    assert lang.word2id["<UNK>"] == lang.unk_id
    assert {w for w, _ in _pron_of(lang)} == set(lang.words[1:-3])
    assert lang.words_to_ids(["CAT", "DOG", "<s>"]) == [lang.word2id["CAT"], lang.unk_id, lang.unk_id]


def test_topology_and_pdfs(lang):
    topo = lang.topology()
    n_cls = topo.get_phone_to_num_pdf_classes()
    for p in lang.nonsilence_phone_ids:
        assert n_cls[p] == 3
    for p in lang.silence_phone_ids:
        assert n_cls[p] == 5
    assert lang.num_pdfs == 39 * 3 + 2 * 5
    tm = lang.transition_model()
    assert tm.num_pdfs == lang.num_pdfs
    # every pdf belongs to exactly one phone; silence pdfs are those of SIL and SPN
    assert sorted(set(lang.pdf2phone.tolist())) == lang.real_phone_ids
    assert len(lang.silence_pdf_ids) == 10
    assert lang.tid2pdf[0] == -1 and lang.tid2pdf[1:].min() == 0 and lang.tid2pdf.max() == lang.num_pdfs - 1


def test_stress_is_stripped_and_disambig_where_needed(lang):
    lex = dict((w, p) for w, p in _pron_of(lang) if w != "A" and w != "THE")
    assert lex["CAT"] == ["K", "AE", "T"]
    dis = {}
    for w, p in _pron_of(lang, "lexicon_disambig.txt"):
        dis.setdefault(w, []).append(p)
    # AN is a prefix of AND/ANT; ANT and AUNT are homophones: they need distinct #n
    assert dis["AN"][0][-1].startswith("#")
    assert dis["ANT"][0][-1].startswith("#") and dis["AUNT"][0][-1].startswith("#")
    assert dis["ANT"][0][-1] != dis["AUNT"][0][-1]
    # unique, non-prefix pronunciations get none
    assert not dis["CAT"][0][-1].startswith("#")
    assert not dis["AND"][0][-1].startswith("#")
    used = {p[-1] for prons in dis.values() for p in prons if p[-1].startswith("#")}
    assert used <= {lang.phones[i] for i in lang.disambig_phone_ids}


def test_every_word_has_a_path_in_L(lang):
    L = lang.L()
    sil = lang.optional_silence_id
    for word, pron in _pron_of(lang):
        ids = [lang.phone2id[p] for p in pron]
        got = _words_through(L, ids)
        # homophones (ANT/AUNT) may come out as either word; the pronunciation must be accepted
        homophones = {w for w, p in _pron_of(lang) if p == pron}
        assert got is not None and len(got) == 1 and lang.words[got[0]] in homophones, word
        # with optional silence before and after
        got = _words_through(L, [sil] + ids + [sil])
        assert got is not None and lang.words[got[0]] in homophones
    # a word sequence with and without silence in between
    seq = [lang.phone2id[p] for p in ("K", "AE", "T")] + [sil] + [lang.phone2id[p] for p in ("DH", "AH")]
    assert [lang.words[i] for i in _words_through(L, seq)] == ["CAT", "THE"]
    seq = [lang.phone2id[p] for p in ("K", "AE", "T", "DH", "IY")]
    assert [lang.words[i] for i in _words_through(L, seq)] == ["CAT", "THE"]
    # phones that are no word are rejected
    assert _words_through(L, [lang.phone2id["ZH"]]) is None
    # two silences in a row are not allowed (silence is optional, once)
    assert _words_through(L, [sil, sil] + seq) is None


def test_L_disambig(lang):
    Ld = lang.L_disambig()
    assert Ld.is_olabel_sorted
    sil = lang.optional_silence_id
    d0 = lang.phone_disambig0_id
    for word, pron in _pron_of(lang, "lexicon_disambig.txt"):
        ids = [lang.phone2id[p] for p in pron]
        got = _words_through(Ld, ids)
        assert got is not None and [lang.words[i] for i in got] == [word]
    # without its disambiguation symbol, AUNT's phones are not accepted
    assert _words_through(Ld, [lang.phone2id[p] for p in ("AE", "N", "T")]) is None
    # silence is followed by the silence disambiguation symbol (the last one)
    sil_d = lang.disambig_phone_ids[-1]
    cat = [lang.phone2id[p] for p in ("K", "AE", "T")]
    assert _words_through(Ld, [sil, sil_d] + cat) == [lang.word2id["CAT"]]
    assert _words_through(Ld, [sil] + cat) is None
    # G's backoff #0 passes through word boundaries (input #0 -> output #0)
    got = _words_through(Ld, cat + [d0])
    assert got == [lang.word2id["CAT"], lang.word_disambig_id]


def test_vocabulary_restriction_and_rerun(tmp_path):
    (tmp_path / "lexicon.txt").write_text(LEXICON)
    (tmp_path / "text.txt").write_text("THE CAT\nA ZEBRA AND AN OKAPI\n")
    out = prepare_lang(tmp_path / "lexicon.txt", tmp_path / "lang", vocabulary=tmp_path / "text.txt")
    lang = load_lang(out)
    assert set(lang.words[1:-3]) == {"<UNK>", "THE", "CAT", "A", "ZEBRA", "AND", "AN"}
    assert lang.count_oov(["OKAPI", "CAT"]) == 1
    # a second call with the same inputs rebuilds the same L (skipping is asr/step.py's decision)
    first = (out / "L.fst").read_bytes()
    prepare_lang(tmp_path / "lexicon.txt", tmp_path / "lang", vocabulary=tmp_path / "text.txt")
    assert (out / "L.fst").read_bytes() == first
    # a changed config gives another L
    prepare_lang(tmp_path / "lexicon.txt", tmp_path / "lang", LangConfig(sil_prob=0.2),
                 vocabulary=tmp_path / "text.txt")
    assert (out / "L.fst").read_bytes() != first


def test_bad_lexicon(tmp_path):
    (tmp_path / "lex.txt").write_text("CAT K AE T\nDOG D QQ G\n")
    with pytest.raises(LangError, match="DOG.*QQ"):
        prepare_lang(tmp_path / "lex.txt", tmp_path / "lang")
    (tmp_path / "lex2.txt").write_text("CAT\n")
    with pytest.raises(LangError, match="no pronunciation"):
        prepare_lang(tmp_path / "lex2.txt", tmp_path / "lang")
    with pytest.raises(LangError, match="does not exist"):
        prepare_lang(tmp_path / "nope.txt", tmp_path / "lang")


def test_cli(tmp_path):
    from asr.cli import main

    (tmp_path / "lexicon.txt").write_text(LEXICON)
    rc = main(["prepare-lang", "--lexicon", str(tmp_path / "lexicon.txt"), "--out-dir", str(tmp_path / "lang"),
               "--set", "sil_prob=0.3"])
    assert rc == 0
    assert "sil_prob: 0.3" in (tmp_path / "lang" / "config.yaml").read_text()
