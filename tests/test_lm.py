"""Language model: Kneser-Ney training, overlap check, perplexity / OOV figures, G.fst."""

from __future__ import annotations

import gzip
import json
import logging
import math

import kaldi_hmm_gmm  # noqa: F401  (before kaldifst)
import kaldifst
import pytest

from asr.graph import GraphError
from asr.lang import prepare_lang
from asr.lm import LmConfig, LmError, check_overlap, make_g, perplexity, read_arpa, train_lm
from asr.manifest import Utterance, write_manifest

LEXICON = """THE DH AH
A AH
CAT K AE T
SAT S AE T
ON AA N
MAT M AE T
DOG D AO G
RAN R AE N
<UNK> SPN
"""

LM_TEXT = [
    "THE CAT SAT ON THE MAT", "A DOG RAN", "THE DOG SAT ON A MAT", "A CAT SAT", "THE DOG RAN ON THE MAT",
    "THE CAT RAN", "A DOG SAT ON THE CAT", "THE CAT SAT", "A DOG RAN ON THE MAT", "THE ZEBRA RAN",
] * 2


def _manifest(path, texts):
    utts = [Utterance(id=f"1-1-{i:04d}", speaker="1", chapter="1", audio="/nonexistent.flac",
                      num_samples=16000, sample_rate=16000, text=t) for i, t in enumerate(texts)]
    write_manifest(path, utts)
    return path


@pytest.fixture(scope="module")
def lang_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lang")
    (d / "lexicon.txt").write_text(LEXICON)
    return prepare_lang(d / "lexicon.txt", d / "lang")


def test_train_lm_outputs_and_ppl(tmp_path, lang_dir):
    (tmp_path / "lm.txt").write_text("\n".join(LM_TEXT) + "\n")
    dev = _manifest(tmp_path / "dev.jsonl", ["THE DOG SAT ON THE CAT", "A CAT RAN"])
    test = _manifest(tmp_path / "test.jsonl", ["THE CAT SAT ON A ZEBRA", "THE HORSE RAN"])
    out = train_lm(tmp_path / "lm.txt", lang_dir, tmp_path / "lm", LmConfig(), {"dev": dev, "test": test})
    for name in ("lm.arpa", "G.fst", "ppl.json", "info.json", "config.yaml", ".done"):
        assert (out / name).is_file(), name
    ppl = json.loads((out / "ppl.json").read_text())
    # ZEBRA is in the LM text but not the lexicon; HORSE is in neither.
    assert ppl["dev"]["oov"] == 0 and ppl["dev"]["words"] == 9 and ppl["dev"]["sentences"] == 2
    assert ppl["test"]["oov"] == 1 and ppl["test"]["oov_lexicon"] == 2
    assert ppl["test"]["oov_rate"] == pytest.approx(100 / 9)
    assert 1.0 < ppl["dev"]["ppl"] < 50
    # cross-check the perplexity against kaldingram's own scorer (no OOVs in dev)
    from kaldingram.ppl import compute_ppl
    from kaldingram.prune import ArpaParser

    ref = compute_ppl(ArpaParser().loadf(str(out / "lm.arpa"), encoding="latin-1")[0],
                      ["THE DOG SAT ON THE CAT", "A CAT RAN"])
    assert ppl["dev"]["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert ppl["dev"]["logprob"] == pytest.approx(ref["logprob"], rel=1e-5)
    info = json.loads((out / "info.json").read_text())
    assert info["text_words_not_in_lexicon"] == 1  # ZEBRA
    # G uses the lang's words.txt and has no ZEBRA (its n-grams were dropped)
    words = dict(line.split() for line in (lang_dir / "words.txt").read_text().splitlines())
    g = kaldifst.StdVectorFst.read(str(out / "G.fst"))
    olabels = {int(c.split()[3]) for c in g.to_str().splitlines() if len(c.split()) >= 4}
    assert int(words["CAT"]) in olabels and "ZEBRA" not in words
    ilabels = {int(c.split()[2]) for c in g.to_str().splitlines() if len(c.split()) >= 4}
    assert int(words["#0"]) in ilabels  # backoff arcs carry #0
    # a second call writes the same G (skipping is asr/step.py's decision)
    first = (out / "G.fst").read_bytes()
    train_lm(tmp_path / "lm.txt", lang_dir, tmp_path / "lm", LmConfig(), {"dev": dev, "test": test})
    assert (out / "G.fst").read_bytes() == first


def test_overlap_raises_with_sentence(tmp_path, lang_dir, caplog):
    (tmp_path / "lm.txt").write_text("\n".join(LM_TEXT) + "\n")
    dev = _manifest(tmp_path / "dev.jsonl", ["A  DOG RAN", "THE DOG SAT ON THE CAT"])
    with pytest.raises(LmError, match="A DOG RAN"):
        train_lm(tmp_path / "lm.txt", lang_dir, tmp_path / "lm", LmConfig(), {"dev": dev})
    assert not (tmp_path / "lm" / ".done").exists()
    with caplog.at_level(logging.WARNING):
        found = check_overlap(LM_TEXT, {"dev": ["A DOG RAN", "NOPE"]}, allow=True)
    assert found == {"dev": ["A DOG RAN"]} and "A DOG RAN" in caplog.text


def test_given_arpa_gz(tmp_path, lang_dir):
    arpa = """\\data\\
ngram 1=5
ngram 2=2

\\1-grams:
-0.6 </s>
-99 <s> -0.3
-0.7 THE -0.2
-0.8 CAT -0.1
-1.0 DOG -0.1

\\2-grams:
-0.2 <s> THE
-0.3 THE CAT

\\end\\
"""
    with gzip.open(tmp_path / "tg.arpa.gz", "wt") as f:
        f.write(arpa)
    dev = _manifest(tmp_path / "dev.jsonl", ["THE CAT", "DOG MAT"])
    out = train_lm(None, lang_dir, tmp_path / "lm", LmConfig(), {"dev": dev}, arpa=tmp_path / "tg.arpa.gz")
    assert (out / "lm.arpa").read_text() == arpa
    ppl = json.loads((out / "ppl.json").read_text())["dev"]
    # THE CAT: -0.2 + -0.3 + p(</s>|CAT) = bow(CAT) + p(</s>) = -0.1 - 0.6
    # DOG (MAT is OOV): p(DOG|<s>) = bow(<s>) + p(DOG) = -0.3 - 1.0; p(</s>|DOG MAT) = -0.6
    expect = (-0.2 - 0.3 - 0.7) + (-1.3 - 0.6)
    assert ppl["logprob"] == pytest.approx(expect)
    assert ppl["oov"] == 1
    assert ppl["ppl"] == pytest.approx(10 ** (-expect / (3 + 2)))
    lm = read_arpa(out / "lm.arpa")
    assert lm.order == 2 and lm.log10_p("DOG", ("THE",)) == pytest.approx(-0.2 - 1.0)
    r = perplexity(lm, ["THE CAT"])
    assert r["ppl1"] == pytest.approx(10 ** (1.2 / 2)) and math.isfinite(r["ppl"])


def test_malformed_arpa_is_a_clear_error(tmp_path, lang_dir):
    # kaldilm aborts the process on this; make_g must survive it and raise
    (tmp_path / "bad.arpa").write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0 THE -0.5 extra junk\n\\end\\\n")
    with pytest.raises(GraphError, match="arpa2fst"):
        make_g(tmp_path / "bad.arpa", lang_dir, tmp_path / "lm")


def test_config_validation():
    with pytest.raises(ValueError):
        LmConfig(order=0)


# ------------------------------------------------------------------------------------------
# LM from a user text plus the training transcripts (real corpora without an LM text)


def test_lm_from_transcripts_refuses_dev_sentence_in_text(tmp_path, lang_dir):
    train = _manifest(tmp_path / "train.jsonl", LM_TEXT[:9])
    dev = _manifest(tmp_path / "dev.jsonl", ["THE DOG SAT ON THE CAT", "A CAT RAN ON THE MAT"])
    (tmp_path / "text.txt").write_text("THE CAT SAT\nA CAT RAN ON THE MAT\n")   # holds a dev sentence
    with pytest.raises(LmError, match="A CAT RAN ON THE MAT"):
        train_lm(tmp_path / "text.txt", lang_dir, tmp_path / "lm", LmConfig(), {"dev": dev},
                 transcripts=[train])
    assert not (tmp_path / "lm" / ".done").exists()


def test_lm_from_transcripts_leaves_out_eval_sentences(tmp_path, lang_dir):
    # "A DOG RAN" is read in a training chapter and in a test chapter: it must not reach the LM text.
    train = _manifest(tmp_path / "train.jsonl", LM_TEXT[:9])
    test = _manifest(tmp_path / "test.jsonl", ["A DOG RAN", "THE CAT SAT ON A MAT"])
    out = train_lm(None, lang_dir, tmp_path / "lm", LmConfig(), {"test": test}, transcripts=[train])
    lines = (out / "lm_train.txt").read_text().splitlines()
    assert "A DOG RAN" not in lines and "THE CAT SAT ON THE MAT" in lines
    assert len(lines) == 8
    info = json.loads((out / "info.json").read_text())
    assert info["transcripts_left_out_as_eval"] == 1 and info["transcript_sentences"] == 8
    assert (out / "G.fst").is_file()


def test_lm_needs_some_source(tmp_path, lang_dir):
    with pytest.raises(LmError, match="needs the LM text"):
        train_lm(None, lang_dir, tmp_path / "lm", LmConfig(), {})
