"""The triphone tree (asr.tree), its Kaldi serialisation, the CD graph and the triphone GMM (asr.tri)."""

from __future__ import annotations

import itertools
import json
import math

import kaldi_hmm_gmm as khg  # noqa: I001  (before kaldifst)
import numpy as np
import pytest
from conftest import require_tool

from asr.decode import DecodeConfig, Decoder, decode_many
from asr.gmm_model import GmmModel
from asr.graph import make_graph
from asr.lang import load_lang, prepare_lang
from asr.lm import LmConfig, train_lm
from asr.scoring import compute_wer
from asr.tree import (PDF_CLASS_KEY, Leaf, Split, Tree, TreeConfig, TreeError, TreeStats, _best_split, _Grow,
                      build_tree, context_dependency_from_bytes, context_keys, gauss_objf, pdf_class_questions,
                      phone_questions, split_gain)

VAR_FLOOR = 0.01


def _brute_loglike(x: np.ndarray) -> float:
    """Sum of log N(x_t; mu, diag var) with the ML mean and variance of ``x`` itself."""
    mu, var = x.mean(0), np.maximum(x.var(0), VAR_FLOOR)
    return float(np.sum(-0.5 * (np.log(2 * np.pi * var) + (x - mu) ** 2 / var)))


def _stats(x: np.ndarray) -> np.ndarray:
    return np.concatenate([[len(x)], x.sum(0), (x * x).sum(0)])


def test_gauss_objf_matches_kaldi_and_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (50, 4))
    s = _stats(x)
    assert gauss_objf(s, VAR_FLOOR) == pytest.approx(_brute_loglike(x), rel=1e-9)
    g = khg.GaussClusterable(s[1:5].reshape(-1, 1), s[5:].reshape(-1, 1), VAR_FLOOR, float(s[0]))
    assert gauss_objf(s, VAR_FLOOR) == pytest.approx(g.objf(), rel=1e-6)
    # the variance floor applies as in Kaldi: one constant dimension
    x[:, 2] = 3.0
    s = _stats(x)
    g = khg.GaussClusterable(s[1:5].reshape(-1, 1), s[5:].reshape(-1, 1), VAR_FLOOR, float(s[0]))
    assert gauss_objf(s, VAR_FLOOR) == pytest.approx(g.objf(), rel=1e-6)
    assert gauss_objf(np.zeros(9), VAR_FLOOR) == 0.0


def _tiny_stats(rng, phones=(1, 2, 3, 4), classes=3, dim=3, frames=40):
    """Frames of every (left, central, right, class) of a few phones; the left phone shifts the mean
    (left in {1, 2} versus {3, 4}), so the best context question is known."""
    keys, feats = [], []
    for l, c, r in itertools.product((0,) + phones, phones, (0,) + phones):
        for k in range(classes):
            n = int(rng.integers(frames // 2, frames))
            mu = np.full(dim, 3.0 * c + k) + (2.5 if l in (1, 2) else 0.0)
            keys.append(np.tile([l, c, r, k], (n, 1)))
            feats.append(rng.normal(mu, 1.0, (n, dim)))
    return np.concatenate(keys), np.concatenate(feats)


def test_split_gain_against_brute_force():
    rng = np.random.default_rng(1)
    keys, feats = _tiny_stats(rng)
    st = TreeStats.from_frames(keys, feats)
    # statistics are the per-context sums of the frames
    row = int(np.nonzero((st.keys == [2, 3, 1, 1]).all(1))[0][0])
    m = (keys == [2, 3, 1, 1]).all(1)
    np.testing.assert_allclose(st.stats[row], _stats(feats[m]))
    # gain of one split = brute-force log-likelihoods of the two halves minus the whole
    c = keys[:, 1] == 3
    yes = c & np.isin(keys[:, 0], [1, 2])
    no = c & ~yes
    brute = _brute_loglike(feats[yes]) + _brute_loglike(feats[no]) - _brute_loglike(feats[c])
    assert split_gain(_stats(feats[yes]), _stats(feats[no]), VAR_FLOOR) == pytest.approx(brute, rel=1e-8)
    # the best split of a root is the brute-force best over every key and question
    questions = [frozenset(q) for q in ([1], [2], [3], [4], [1, 2], [3, 4], [1, 3])]
    mat = np.zeros((len(questions), 5))
    for i, q in enumerate(questions):
        mat[i, sorted(q)] = 1
    cq = pdf_class_questions(3)
    cmat = np.zeros((len(cq), 3))
    for i, q in enumerate(cq):
        cmat[i, sorted(q)] = 1
    qs = {0: (questions, mat), 2: (questions, mat), PDF_CLASS_KEY: (cq, cmat)}
    idx = np.nonzero(st.keys[:, 1] == 3)[0]
    leaf = _Grow(idx, st.stats[idx].sum(0))
    _best_split(leaf, st, qs, TreeConfig(min_leaf_count=0))
    best = None
    for key, col, qlist in ((0, 0, questions), (2, 2, questions), (PDF_CLASS_KEY, 3, cq)):
        for q in qlist:
            y = c & np.isin(keys[:, col], sorted(q))
            if y.sum() == 0 or (c & ~y).sum() == 0:
                continue
            g = _brute_loglike(feats[y]) + _brute_loglike(feats[c & ~y]) - _brute_loglike(feats[c])
            if best is None or g > best[0]:
                best = (g, key, q)
    assert leaf.best[1:] == best[1:]
    assert leaf.best[0] == pytest.approx(best[0], rel=1e-8)
    assert best[1:] == (0, frozenset({1, 2}))   # the left phone separates most (means differ by 2.5)


def test_phone_questions_find_the_structure():
    rng = np.random.default_rng(2)
    # two groups of phones with distinct means: the first split separates them
    stats = {p: _stats(rng.normal(0.0 if p < 4 else 5.0, 1.0, (200, 3))) for p in range(1, 7)}
    qs = phone_questions(stats, VAR_FLOOR)
    assert frozenset({1, 2, 3}) in qs and frozenset({4, 5, 6}) in qs
    assert all(frozenset({p}) in qs for p in range(1, 7))
    assert frozenset(range(1, 7)) not in qs
    assert pdf_class_questions(3) == [frozenset({0}), frozenset({0, 1})]


def _build(rng, num_leaves=12):
    keys, feats = _tiny_stats(rng)
    st = TreeStats.from_frames(keys, feats)
    tree, info = build_tree(st, [1, 2, 3, 4, 5], {p: 3 for p in range(1, 6)},
                            TreeConfig(num_leaves=num_leaves, split_thresh=0.0))
    return st, tree, info


def test_build_tree_leaves_and_merging():
    st, tree, info = _build(np.random.default_rng(3))
    assert info["num_leaves_split"] == 12
    assert info["num_leaves"] == tree.num_pdfs == len(set(tree.leaves())) <= 12
    assert sorted(set(tree.leaves())) == list(range(tree.num_pdfs))
    assert isinstance(tree.roots[5], Leaf)     # phone 5 has no statistics: one leaf
    for p in (1, 2, 3, 4):
        assert isinstance(tree.roots[p], Split)
    # no merging: every grown leaf keeps its pdf
    tree0, info0 = build_tree(st, [1, 2, 3, 4, 5], {p: 3 for p in range(1, 6)},
                                 TreeConfig(num_leaves=12, split_thresh=0.0, merge_thresh=0.0))
    assert info0["num_merged"] == 0 and tree0.num_pdfs == 12
    # leaves of different roots are never merged: every pdf belongs to one central phone
    owner = {}
    for (l, c, r, k) in st.keys.tolist():
        assert owner.setdefault(tree.compute(l, c, r, k), c) == c


def test_serialisation_round_trip_and_kaldi_compute():
    st, tree, _ = _build(np.random.default_rng(4), num_leaves=20)
    data = tree.to_bytes()
    assert Tree.from_bytes(data) == tree
    assert Tree.from_bytes(b"\x00B" + data) == tree
    cd = context_dependency_from_bytes(data)
    assert (cd.context_width, cd.central_position, cd.num_pdfs) == (3, 1, tree.num_pdfs)
    assert bytes(b & 0xFF for b in cd.__getstate__()[0]) == data
    # compute() agrees with the Python tree on every context seen in training
    for l, c, r, k in st.keys.tolist():
        ok, pdf = cd.compute([l, c, r], k)
        assert ok and pdf == tree.compute(l, c, r, k)
    # a context never seen in training (phone 5 everywhere, a left phone beyond every question)
    for l, c, r in ((5, 1, 5), (5, 5, 5), (0, 5, 0), (3, 2, 5)):
        for k in range(3):
            ok, pdf = cd.compute([l, c, r], k)
            assert ok and 0 <= pdf < tree.num_pdfs and pdf == tree.compute(l, c, r, k)
    # a corrupted file is a clear error
    with pytest.raises(TreeError, match="expected"):
        Tree.from_bytes(data.replace(b"ToPdf", b"ToPdX"))


def test_tree_file_is_kaldis_own_format(tmp_path):
    _, tree, _ = _build(np.random.default_rng(5))
    cd = tree.to_context_dependency()
    cd.write(True, str(tmp_path / "kaldi.tree"))
    assert (tmp_path / "kaldi.tree").read_bytes() == b"\x00B" + tree.to_bytes()
    tm = khg.TransitionModel(cd, _topology([1, 2, 3, 4, 5]))
    assert tm.num_pdfs == tree.num_pdfs


def _topology(phones):
    topo = khg.HmmTopology()
    states = "".join(f"<State> {i} <PdfClass> {i} <Transition> {i} 0.75 <Transition> {i + 1} 0.25 </State>\n"
                     for i in range(3))
    topo.read(f"<Topology>\n<TopologyEntry>\n<ForPhones>\n{' '.join(map(str, phones))}\n</ForPhones>\n"
              f"{states}<State> 3 </State>\n</TopologyEntry>\n</Topology>\n")
    return topo


def test_context_keys_edges_and_repeats():
    # phones 7 7 | 7 (a second instance: class 0 again) | 9 ; phone 0 beyond both edges
    phones = np.array([7, 7, 7, 7, 7, 9, 9, 9])
    classes = np.array([0, 1, 2, 0, 2, 0, 1, 2])
    k = context_keys(phones, classes)
    assert k[:, 0].tolist() == [0, 0, 0, 7, 7, 7, 7, 7]
    assert k[:, 2].tolist() == [7, 7, 7, 9, 9, 0, 0, 0]
    assert k[:, 3].tolist() == classes.tolist()


# ---------------------------------------------------------------------------------------------
# The context-dependent graph decodes the one-hot pdfs of a reference alignment

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
LM_TEXT = ["THE CAT SAT ON THE MAT", "A DOG RAN", "THE DOG SAT ON A MAT", "THE CATS RAN", "A CAT SAT",
           "SEE THE SEA", "A BIG DOG RAN", "THE BIG CAT SAT ON A BIG MAT"] * 3
TEST_SENTENCES = ["THE CAT SAT ON THE MAT", "A DOG RAN", "THE CATS SAT ON A DOG", "DOG CAT MAT ON",
                  "SEE THE SEA", "A BIG CAT RAN ON THE BIG MAT"]


def _phone_seq(lang, lex, words, rng):
    seq = ["SIL"]
    for i, w in enumerate(words):
        seq += lex[w]
        if i < len(words) - 1 and rng.random() < 0.3:
            seq.append("SIL")
    return [lang.phone2id[p] for p in seq + ["SIL"]]


def _frames(lang, seq, rng):
    """(left, central, right, class) per frame: a few frames per HMM state, phone 0 at the edges."""
    topo = lang.topology()
    rows = []
    for i, c in enumerate(seq):
        l = seq[i - 1] if i > 0 else 0
        r = seq[i + 1] if i + 1 < len(seq) else 0
        for k in range(topo.num_pdf_classes(c)):
            rows += [(l, c, r, k)] * int(rng.integers(1, 4))
    return np.array(rows)


@pytest.fixture(scope="module")
def cd_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cdgraph")
    (d / "lexicon.txt").write_text(LEXICON)
    prepare_lang(d / "lexicon.txt", d / "lang")
    (d / "lm.txt").write_text("\n".join(LM_TEXT) + "\n")
    train_lm(d / "lm.txt", d / "lang", d / "lm", LmConfig())
    lang = load_lang(d / "lang")
    lex = {}
    for line in (d / "lang" / "lexicon.txt").read_text().splitlines():
        w, *p = line.split()
        lex.setdefault(w, p)
    # tree statistics from synthetic frames whose means depend on the left and right phone
    rng = np.random.default_rng(0)
    keys = np.concatenate([_frames(lang, _phone_seq(lang, lex, s.split(), rng), rng) for s in LM_TEXT * 4])
    feats = rng.normal(0, 1, (len(keys), 3)) + keys[:, [0, 1, 2]] * [0.5, 2.0, 0.5] + keys[:, [3]]
    st = TreeStats.from_frames(keys, feats)
    tree, _ = build_tree(st, lang.real_phone_ids, {p: lang.topology().num_pdf_classes(p) for p in lang.real_phone_ids},
                         TreeConfig(num_leaves=150, split_thresh=0.0, min_leaf_count=5))
    cd = tree.to_context_dependency()
    tm = khg.TransitionModel(cd, lang.topology())
    n = tree.num_pdfs
    model = GmmModel(np.ones(n), np.zeros((n, 3)), np.ones((n, 3)), np.arange(n + 1), np.array(tm.log_probs),
                     (d / "lang" / "topo").read_text(), lang.real_phone_ids, {}, tree=tree.to_bytes())
    (d / "tri").mkdir()
    model.save(d / "tri" / "final.mdl")
    make_graph(d / "lang", d / "lm", d / "graph", transition_log_probs=d / "tri")
    return d, lang, lex, tree


def test_cd_graph_decodes_reference_alignment(cd_setup):
    d, lang, lex, tree = cd_setup
    info = json.loads((d / "graph" / "info.json").read_text())
    assert info["context_width"] == 3 and info["num_pdfs"] == tree.num_pdfs > lang.num_pdfs
    rng = np.random.default_rng(1)
    items, refs = [], {}
    for i, s in enumerate(TEST_SENTENCES):
        frames = _frames(lang, _phone_seq(lang, lex, s.split(), rng), rng)
        pdfs = np.array([tree.compute(*f) for f in frames.tolist()])
        m = np.full((len(pdfs), tree.num_pdfs), -20.0, np.float32)
        m[np.arange(len(pdfs)), pdfs] = 0.0
        items.append((f"u{i}", m))
        refs[f"u{i}"] = s
    res = decode_many(d / "graph", d / "lang", items, DecodeConfig(acwt=1.0), nj=1)
    assert all(r.reached_final for r in res.values())
    assert compute_wer(refs, {u: r.text for u, r in res.items()})["wer"] == 0.0, {u: r.text for u, r in res.items()}
    # a monophone-shaped score matrix is refused by the CD graph's decoder
    with pytest.raises(ValueError, match="pdfs"):
        Decoder(d / "graph", d / "lang").decode(np.zeros((5, lang.num_pdfs), np.float32))
    lat = decode_many(d / "graph", d / "lang", items[:2], DecodeConfig(acwt=1.0, lattice=True), nj=1)
    assert {u: r.text for u, r in lat.items()} == {u: refs[u] for u, _ in items[:2]}


# ---------------------------------------------------------------------------------------------
# The triphone GMM on the tiny espeak corpus of test_gmm


@pytest.fixture(scope="module")
def tiny_tri(tmp_path_factory):
    require_tool("espeak-ng")
    from test_gmm import TINY_CFG, make_tiny_corpus

    from asr.gmm import train_mono
    from asr.tree import make_tree
    from asr.tri import TriConfig, train_tri

    root = tmp_path_factory.mktemp("tri")
    c = make_tiny_corpus(root / "corpus")
    train_mono(c["feats"], c["manifest"], c["lang"], root / "mono", TINY_CFG, nj=1, ali_dir=root / "ali")
    make_tree(root / "ali", c["feats"], c["lang"], root / "mono", root / "tree", TreeConfig(num_leaves=80))
    cfg = TriConfig(num_iters=4, max_iter_inc=2, total_gauss=200, realign_iters=(2,))
    train_tri(root / "tree", root / "mono", c["feats"], c["manifest"], c["lang"], root / "tri", cfg, nj=1,
              ali_dir=root / "ali_tri")
    return root, c


def test_triphone_gmm_trains_and_aligns(tiny_tri):
    import csv

    from asr.features import FeatureStore
    from asr.labels import LabelStore

    root, c = tiny_tri
    info = json.loads((root / "tree" / "info.json").read_text())
    model = GmmModel.load(root / "tri" / "final.mdl")
    # a tiny corpus: fewer tied states than monophone pdfs (unseen phones keep one leaf each)
    assert model.tree is not None and model.num_pdfs == info["num_leaves"] <= info["num_leaves_split"] <= 80
    rows = list(csv.DictReader(open(root / "tri" / "log" / "train.csv")))
    assert rows[0]["mode"] == "realign" and float(rows[-1]["avg_loglike"]) > float(rows[0]["avg_loglike"])
    lab = LabelStore(root / "ali_tri")
    assert lab.num_pdfs == model.num_pdfs and lab.priors is not None and lab.priors.shape == (model.num_pdfs,)
    mono = LabelStore(root / "ali")
    store = FeatureStore(c["feats"])
    assert set(lab.failed) == set(mono.failed)
    # the tied states refine the monophone states: every triphone pdf has one central phone
    tm = model.transition_model()
    from asr.gmm_model import transition_tables

    _, pdf2phone = transition_tables(tm)
    lang = load_lang(c["lang"])
    from asr.tree import mono_pdf_maps

    mono_phone, _ = mono_pdf_maps(lang)
    both = (lab.labels >= 0) & (mono.labels >= 0)
    agree = np.mean(pdf2phone[lab.labels[both]] == mono_phone[mono.labels[both]])
    assert agree > 0.7 and lab.labels.size == store.num_frames_total
    assert math.isfinite(float(lab.info["avg_loglike"]))
