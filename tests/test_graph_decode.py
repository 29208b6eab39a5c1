"""HCLG and the decoder: decoding the one-hot pdfs of a reference alignment must give the words.

The reference alignment is made without a GMM: words -> phones (with optional silence) -> the HMM
states of each phone (a few frames each) -> pdf ids through the lang's context dependency.
"""

from __future__ import annotations

import json
import logging
import shutil

import kaldi_hmm_gmm  # noqa: F401  (before kaldifst)
import numpy as np
import pytest

from asr.decode import DecodeConfig, DecodeError, Decoder, decode_many, hybrid_loglikes, tune_acwt
from asr.graph import GraphError, make_graph
from asr.lang import load_lang, prepare_lang
from asr.lm import LmConfig, train_lm
from asr.scoring import compute_wer, score_decode

LEXICON = """THE DH AH
A AH
CAT K AE T
CATS K AE T S
SAT S AE T
ON AA N
MAT M AE T
DOG D AO G
SEE S IY
SEA S IY
RAN R AE N
BIG B IH G
<UNK> SPN
"""

LM_TEXT = [
    "THE CAT SAT ON THE MAT", "A DOG RAN", "THE DOG SAT ON A MAT", "THE CATS RAN", "A CAT SAT",
    "THE DOG RAN ON THE MAT", "SEE THE SEA", "THE CAT RAN", "A DOG SAT ON THE CAT", "A BIG DOG RAN",
    "THE BIG CAT SAT ON A BIG MAT",
] * 3

# In lexicon and LM; several word orders never seen in the LM text.
TEST_SENTENCES = [
    "THE CAT SAT ON THE MAT", "A DOG RAN", "THE CATS SAT ON A DOG", "DOG CAT MAT ON", "SEE THE SEA",
    "A BIG CAT RAN ON THE BIG MAT", "CATS", "THE SEA SAT ON A BIG DOG",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("graph")
    (d / "lexicon.txt").write_text(LEXICON)
    prepare_lang(d / "lexicon.txt", d / "lang")
    (d / "lm.txt").write_text("\n".join(LM_TEXT) + "\n")
    train_lm(d / "lm.txt", d / "lang", d / "lm", LmConfig())
    make_graph(d / "lang", d / "lm", d / "graph")
    lang = load_lang(d / "lang")
    lex: dict[str, list[str]] = {}
    for line in (d / "lang" / "lexicon.txt").read_text().splitlines():
        w, *p = line.split()
        lex.setdefault(w, p)
    return d, lang, lex


def _alignment(lang, lex, words, rng, sil_between=0.3, extra_prons=None):
    """pdf id per frame for ``words`` with leading/trailing silence and optional silence between."""
    prons = dict(lex, **(extra_prons or {}))
    ctx, topo = lang.ctx_dep(), lang.topology()
    phones = ["SIL"]
    for i, w in enumerate(words):
        phones += prons[w]
        if i < len(words) - 1 and rng.random() < sil_between:
            phones.append("SIL")
    phones.append("SIL")
    pdfs = []
    for p in phones:
        pid = lang.phone2id[p]
        for c in range(topo.num_pdf_classes(pid)):
            ok, pdf = ctx.compute([pid], c)
            assert ok
            pdfs += [pdf] * int(rng.integers(1, 4))
    return np.array(pdfs)


def _onehot(pdfs, num_pdfs, off=-20.0):
    m = np.full((len(pdfs), num_pdfs), off, dtype=np.float32)
    m[np.arange(len(pdfs)), pdfs] = 0.0
    return m


def test_graph_outputs(setup):
    d, lang, _ = setup
    g = d / "graph"
    for name in ("HCLG.fst", "words.txt", "info.json", "config.yaml", ".done"):
        assert (g / name).is_file(), name
    info = json.loads((g / "info.json").read_text())
    assert info["HCLG"]["states"] > 0 and info["HCLG"]["arcs"] > info["HCLG"]["states"]
    assert info["num_transition_ids"] == lang.num_transition_ids
    assert info["disambig_arcs_relabelled"] > 0  # homophones SEE/SEA and prefix CAT/CATS
    assert (g / "words.txt").read_text() == (d / "lang" / "words.txt").read_text()
    # a rebuild with the same inputs gives the same graph (skipping is asr/step.py's decision)
    first = (g / "HCLG.fst").read_bytes()
    make_graph(d / "lang", d / "lm", g)
    assert (g / "HCLG.fst").read_bytes() == first


def test_onehot_reference_alignment_gives_wer_zero(setup):
    d, lang, lex = setup
    rng = np.random.default_rng(0)
    items, refs = [], {}
    for i, s in enumerate(TEST_SENTENCES):
        refs[f"u{i}"] = s
        items.append((f"u{i}", _onehot(_alignment(lang, lex, s.split(), rng), lang.num_pdfs)))
    res = decode_many(d / "graph", d / "lang", items, DecodeConfig(acwt=1.0), nj=1)
    assert list(res) == [u for u, _ in items]
    assert all(r.reached_final for r in res.values())
    wer = compute_wer(refs, {u: r.text for u, r in res.items()})
    assert wer["wer"] == 0.0, {u: r.text for u, r in res.items()}
    # the same through the process pool
    res2 = decode_many(d / "graph", d / "lang", lambda u: dict(items)[u], DecodeConfig(acwt=1.0), nj=2,
                       utt_ids=[u for u, _ in items])
    assert {u: r.words for u, r in res2.items()} == {u: r.words for u, r in res.items()}


def test_peaked_hybrid_loglikes_and_lattice_decoder(setup):
    """Noisy, peaked posteriors turned into hybrid scores still decode to the reference."""
    d, lang, lex = setup
    rng = np.random.default_rng(1)
    prior = rng.dirichlet(np.ones(lang.num_pdfs) * 5)
    refs, items = {}, []
    for i, s in enumerate(TEST_SENTENCES[:4]):
        pdfs = _alignment(lang, lex, s.split(), rng)
        logits = rng.normal(0, 1, (len(pdfs), lang.num_pdfs))
        logits[np.arange(len(pdfs)), pdfs] += 8.0
        log_post = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        items.append((f"p{i}", hybrid_loglikes(log_post, np.log(prior))))
        refs[f"p{i}"] = s
    for lattice in (False, True):
        res = decode_many(d / "graph", d / "lang", items, DecodeConfig(acwt=0.5, lattice=lattice))
        assert compute_wer(refs, {u: r.text for u, r in res.items()})["wer"] == 0.0, lattice


def test_hybrid_loglikes_math():
    lp = np.log(np.array([[0.5, 0.25, 0.25]]))
    pr = np.log(np.array([0.25, 0.5, 0.25]))
    out = hybrid_loglikes(lp, pr, acwt=0.5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.5 * np.log(2), 0.5 * np.log(0.5), 0.0]], rtol=1e-6)
    with pytest.raises(DecodeError):
        hybrid_loglikes(lp, pr[:2])
    with pytest.raises(DecodeError):
        hybrid_loglikes(lp, np.array([-np.inf, 0.5, 0.5]))


def test_no_final_state_gives_partial_path(setup, caplog, tmp_path):
    d, lang, lex = setup
    rng = np.random.default_rng(2)
    ref = "THE BIG CAT SAT ON THE MAT".split()
    pdfs = _alignment(lang, lex, ref, rng, sil_between=0.0)
    # cut inside the first state of the last phone of SAT: no final state can be reached
    ctx = lang.ctx_dep()
    t_pdf = ctx.compute([lang.phone2id["T"]], 0)[1]
    s_pdf = ctx.compute([lang.phone2id["S"]], 0)[1]
    start_sat = int(np.flatnonzero(pdfs == s_pdf)[0])
    cut = start_sat + int(np.flatnonzero(pdfs[start_sat:] == t_pdf)[0]) + 1
    # min_active=1: let the beam prune the (costly) paths that would force a final state
    dec = Decoder(d / "graph", d / "lang", DecodeConfig(acwt=1.0, min_active=1))
    with caplog.at_level(logging.WARNING, logger="asr.decode"):
        r = dec.decode(_onehot(pdfs[:cut], lang.num_pdfs), utt="cut1")
    assert not r.reached_final
    assert "cut1" in caplog.text and "no final state" in caplog.text
    assert list(r.words[:3]) == ref[:3] and len(r.words) <= 4 and np.isfinite(r.cost)
    # two frames: nothing fits (every phone has >= 3 states), empty partial hypothesis
    r2 = dec.decode(_onehot(pdfs[:2], lang.num_pdfs), utt="cut2")
    assert not r2.reached_final and r2.words == ()
    # allow_partial=False: empty hypothesis instead of a partial one
    r3 = Decoder(d / "graph", d / "lang", DecodeConfig(acwt=1.0, min_active=1, allow_partial=False)).decode(
        _onehot(pdfs[:cut], lang.num_pdfs), utt="cut3")
    assert r3.words == () and not r3.reached_final
    # the results folder records it
    summary = score_decode(tmp_path / "dec", {"cut1": " ".join(ref)}, {"cut1": r.text}, partial=["cut1"])
    assert summary["partial"] == 1 and (tmp_path / "dec" / "partial.txt").read_text() == "cut1\n"
    assert summary["del"] >= 3


def test_word_missing_from_lexicon(setup):
    """A reference word outside the lexicon cannot be decoded; scoring counts it as an error."""
    d, lang, lex = setup
    rng = np.random.default_rng(3)
    pdfs = _alignment(lang, lex, ["THE", "CAT", "ZEBRA"], rng, sil_between=1.0,
                      extra_prons={"ZEBRA": ["Z", "IY", "B", "R", "AH"]})
    r = Decoder(d / "graph", d / "lang", DecodeConfig(acwt=1.0)).decode(_onehot(pdfs, lang.num_pdfs))
    assert "ZEBRA" not in lang.word2id and "ZEBRA" not in r.words
    assert list(r.words[:2]) == ["THE", "CAT"]
    wer = compute_wer({"u": "THE CAT ZEBRA"}, {"u": r.text})
    assert wer["errors"] >= 1 and wer["per_utt"]["u"]["C"] == 2


def test_tune_acwt_writes_choice(setup, tmp_path):
    d, lang, lex = setup
    rng = np.random.default_rng(4)
    refs, items = {}, []
    for i, s in enumerate(TEST_SENTENCES[:3]):
        pdfs = _alignment(lang, lex, s.split(), rng)
        # weak acoustics: a small acwt lets the LM override them, a large one does not
        items.append((f"t{i}", _onehot(pdfs, lang.num_pdfs, off=-1.0)))
        refs[f"t{i}"] = s
    res = tune_acwt(d / "graph", d / "lang", items, refs, tmp_path / "tune.json",
                    acwts=(0.01, 1.0, 3.0), word_ins_penalties=(0.0, 30.0), cfg=DecodeConfig(beam=20.0))
    saved = json.loads((tmp_path / "tune.json").read_text())
    best_results = res.pop("best_results")
    assert saved == json.loads(json.dumps(res))
    assert {u: r.text for u, r in best_results.items()} == refs   # the chosen point decodes correctly
    assert len(saved["grid"]) == 6
    best = min(saved["grid"], key=lambda r: (r["wer"], r["acwt"], r["word_ins_penalty"]))
    assert (saved["acwt"], saved["word_ins_penalty"]) == (best["acwt"], best["word_ins_penalty"])
    by_acwt = {r["acwt"]: r["wer"] for r in saved["grid"] if r["word_ins_penalty"] == 0.0}
    assert by_acwt[3.0] == 0.0 and by_acwt[0.01] > by_acwt[3.0]
    assert (saved["acwt"], saved["word_ins_penalty"], saved["wer"]) == (3.0, 0.0, 0.0)
    assert saved["lm_weight"] == pytest.approx(1.0 / 3.0)
    # a large word insertion penalty deletes words
    penalised = {r["acwt"]: r for r in saved["grid"] if r["word_ins_penalty"] == 30.0}
    assert penalised[1.0]["del"] > 0 and penalised[1.0]["wer"] > by_acwt[1.0]


def test_bad_input_errors(setup):
    d, lang, _ = setup
    dec = Decoder(d / "graph", d / "lang", DecodeConfig())
    with pytest.raises(DecodeError, match="u9"):
        dec.decode(np.zeros((10, lang.num_pdfs + 1), np.float32), utt="u9")
    bad = np.zeros((10, lang.num_pdfs), np.float32)
    bad[3, 2] = np.nan
    with pytest.raises(DecodeError, match="NaN"):
        dec.decode(bad, utt="u8")
    with pytest.raises(DecodeError, match="not complete"):
        Decoder(d / "nograph", d / "lang")
    r = dec.decode(np.zeros((0, lang.num_pdfs), np.float32))
    assert r.words == () and not r.reached_final


def test_graph_build_crash_is_a_clear_error(setup, tmp_path):
    d, _, _ = setup
    shutil.copytree(d / "lang", tmp_path / "lang")
    (tmp_path / "lang" / "L_disambig.fst").write_bytes(b"not an fst")
    with pytest.raises(GraphError, match="child process"):
        make_graph(tmp_path / "lang", d / "lm", tmp_path / "graph")
    assert not (tmp_path / "graph" / ".done").exists()
    assert not (tmp_path / "graph" / "HCLG.fst").exists()


def test_graph_with_trained_transition_probs(setup, tmp_path):
    d, lang, lex = setup
    tm = lang.transition_model()
    lp = np.array([0.0] + [np.log(0.5) for t in range(1, tm.num_transition_ids + 1)])
    np.save(tmp_path / "tlp.npy", lp)
    g = make_graph(d / "lang", d / "lm", tmp_path / "graph", transition_log_probs=tmp_path / "tlp.npy")
    info = json.loads((g / "info.json").read_text())
    assert info["trained_transitions"] is True
    assert (g / "HCLG.fst").read_bytes() != (d / "graph" / "HCLG.fst").read_bytes()
    rng = np.random.default_rng(5)
    s = "THE BIG CAT SAT ON THE MAT"
    r = Decoder(g, d / "lang", DecodeConfig(acwt=1.0)).decode(_onehot(_alignment(lang, lex, s.split(), rng),
                                                                       lang.num_pdfs))
    assert r.text == s and r.reached_final
    np.save(tmp_path / "bad.npy", lp[:-1])
    with pytest.raises(GraphError, match="transition ids"):
        make_graph(d / "lang", d / "lm", tmp_path / "graph2", transition_log_probs=tmp_path / "bad.npy")


def test_tune_acwt_widens_the_grid_when_the_best_is_at_an_edge(setup, tmp_path):
    """Weak acoustics need a large acwt (WER falls from 80% at 0.03 to 0% at 3.0 here): a grid of
    (0.1, 0.3) has its best at the upper edge, so points beyond it (x3 each time) are tried."""
    d, lang, lex = setup
    rng = np.random.default_rng(4)
    refs, items = {}, []
    for i, s in enumerate(TEST_SENTENCES[:3]):
        items.append((f"t{i}", _onehot(_alignment(lang, lex, s.split(), rng), lang.num_pdfs, off=-1.0)))
        refs[f"t{i}"] = s
    res = tune_acwt(d / "graph", d / "lang", items, refs, None, acwts=(0.1, 0.3),
                    cfg=DecodeConfig(beam=20.0), widen=True, max_widen=4)
    tried = [r["acwt"] for r in res["grid"]]
    assert tried[:2] == [0.1, 0.3] and len(tried) > 2
    assert tried[2] == pytest.approx(0.9)                        # the grid's own ratio, past the edge
    assert res["wer"] < min(r["wer"] for r in res["grid"][:2])   # widening found a better point
    narrow = tune_acwt(d / "graph", d / "lang", items, refs, None, acwts=(0.1, 0.3), cfg=DecodeConfig(beam=20.0))
    assert len(narrow["grid"]) == 2                               # without widen, the grid is the grid
