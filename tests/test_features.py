"""Tests for asr.features: fbank values against kaldi-native-fbank, shards, index, CMVN, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.audio import read_audio
from asr.features import FeatureConfig, FeatureError, FeatureStore, compute_fbank, make_features
from asr.manifest import Utterance, write_manifest

torch.set_num_threads(1)

# torchaudio's Kaldi fbank and kaldi-native-fbank differ only by FFT / float rounding: measured
# max |diff| about 2e-4 (80 bins) on log energies of 16-bit-scaled speech-like audio. Stated bound:
KNF_ATOL = 1e-3


def _signal(seconds: float, seed: int, sr: int = 16000) -> np.ndarray:
    """Speech-like test audio: a few modulated harmonics plus noise, with a stretch of digital silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = rng.uniform(90, 250)
    x = sum(rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 6)) for h in range(1, 6))
    x = x * (1.2 + np.sin(2 * np.pi * rng.uniform(2, 5) * t)) / 2.2 + 0.01 * rng.standard_normal(t.size)
    x[int(0.1 * sr):int(0.15 * sr)] = 0.0
    return x.astype(np.float32)


def _knf_fbank(x: np.ndarray, sr: int, num_bins: int) -> np.ndarray:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = sr
    opts.mel_opts.num_bins = num_bins
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(sr, (x.astype(np.float64) * 32768).tolist())
    fb.input_finished()
    return np.stack([np.asarray(fb.get_frame(i)) for i in range(fb.num_frames_ready)])


@pytest.mark.parametrize("num_bins", [40, 80])
def test_fbank_matches_kaldi_native_fbank(num_bins):
    x = _signal(1.3, seed=num_bins)
    cfg = FeatureConfig(num_mel_bins=num_bins)
    ours = compute_fbank(x, 16000, cfg)
    ref = _knf_fbank(x, 16000, num_bins)
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape == (1 + (x.size - 400) // 160, num_bins)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=KNF_ATOL)


def test_fbank_deterministic_and_dither_seeded():
    x = _signal(0.6, seed=1)
    plain = FeatureConfig()
    torch.manual_seed(123)
    a = compute_fbank(x, 16000, plain, utt_id="u1")
    torch.manual_seed(456)
    np.testing.assert_array_equal(a, compute_fbank(x, 16000, plain, utt_id="u1"))

    dith = FeatureConfig(dither=1.0, seed=7)
    d1 = compute_fbank(x, 16000, dith, utt_id="u1")
    np.testing.assert_array_equal(d1, compute_fbank(x, 16000, dith, utt_id="u1"))
    assert not np.array_equal(d1, compute_fbank(x, 16000, dith, utt_id="u2"))
    assert not np.array_equal(d1, compute_fbank(x, 16000, FeatureConfig(dither=1.0, seed=8), utt_id="u1"))
    assert not np.array_equal(d1, a)
    # Dither lifts digital silence off the log floor (log of float epsilon, about -15.9).
    silent = slice(12, 13)  # frame 12 lies inside the zeroed 0.10-0.15 s stretch
    assert a[silent].max() < -15.0 < d1[silent].min()


def test_fbank_rejects_bad_samples():
    cfg = FeatureConfig()
    with pytest.raises(FeatureError, match="sample rate 8000"):
        compute_fbank(_signal(0.5, 0, sr=8000), 8000, cfg)
    with pytest.raises(FeatureError, match="too short: 300 samples"):
        compute_fbank(np.zeros(300, np.float32), 16000, cfg)
    with pytest.raises(ValueError, match="num_mel_bins"):
        FeatureConfig(num_mel_bins=0)


# --------------------------------------------------------------------------------------------
# A tiny corpus: 3 speakers, 8 utterances, written as FLAC with a manifest.

SPEAKERS = {"103": 3, "1034": 2, "211": 3}


def _make_corpus(root: Path) -> Path:
    utts = []
    k = 0
    for spk, n in SPEAKERS.items():
        for j in range(n):
            uid = f"{spk}-1-{j:04d}"
            x = _signal(0.4 + 0.1 * k, seed=k) * (0.5 + int(spk) % 7 / 7)  # a loudness per speaker
            path = root / "audio" / f"{uid}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, x, 16000, subtype="PCM_16")
            utts.append(Utterance(id=uid, speaker=spk, chapter="1", audio=str(path),
                                  num_samples=x.size, sample_rate=16000, text="A B"))
            k += 1
    manifest = root / "data" / "manifest.jsonl"
    write_manifest(manifest, utts)
    return manifest


def _ids(manifest: Path) -> list[str]:
    return [json.loads(line)["id"] for line in manifest.read_text().splitlines()]


def _audio(manifest: Path, uid: str) -> Path:
    for line in manifest.read_text().splitlines():
        d = json.loads(line)
        if d["id"] == uid:
            return Path(d["audio"])
    raise KeyError(uid)


CFG = FeatureConfig(utts_per_shard=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def feats(corpus, tmp_path_factory):
    return make_features(corpus, tmp_path_factory.mktemp("f") / "feats", CFG, nj=1)


def test_layout_and_index(corpus, feats):
    ids = sorted(_ids(corpus))
    shards = sorted(p.name for p in feats.glob("shard-*.npy"))
    assert shards == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    rows = [json.loads(line) for line in (feats / "index.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ids
    assert [r["shard"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2]
    offset = 0
    for r in rows:
        data = np.load(feats / f"shard-{r['shard']:05d}.npy")
        assert data.dtype == np.float16 and data.shape[1] == 40
        raw = compute_fbank(read_audio(_audio(corpus, r["id"])), 16000, CFG)
        assert r["num_frames"] == raw.shape[0] and r["offset"] == offset
        np.testing.assert_array_equal(data[r["start"]:r["start"] + r["num_frames"]], raw.astype(np.float16))
        assert r["speaker"] == r["id"].split("-")[0]
        offset += r["num_frames"]
    assert (feats / ".done").is_file() and (feats / "config.yaml").is_file()
    assert "utts_per_shard: 3" in (feats / "config.yaml").read_text()
    assert not (feats / "bad_utts.txt").exists()


def test_store_reads_what_was_written(corpus, feats):
    store = FeatureStore(feats)
    assert store.ids == sorted(_ids(corpus)) and store.dim == 40
    assert store.speakers == [i.split("-")[0] for i in store.ids]
    assert store.offsets.dtype == np.int64 and store.lengths.dtype == np.int64
    assert store.num_frames_total == int(store.lengths.sum()) == int(store.offsets[-1] + store.lengths[-1])
    uid = store.ids[4]
    raw = compute_fbank(read_audio(_audio(corpus, uid)), 16000, CFG)
    got = store.utt(uid)
    assert got.dtype == np.float32
    # float16 storage: relative rounding 2^-11 of values up to ~30 (log energies).
    np.testing.assert_allclose(got, raw, rtol=2 ** -10, atol=1e-3)
    every = store.load_all(cmvn="none")
    assert every.shape == (store.num_frames_total, 40) and every.dtype == np.float32
    for k, u in enumerate(store.ids):
        np.testing.assert_array_equal(every[store.offsets[k]:store.offsets[k] + store.lengths[k]], store.utt(u))
    with pytest.raises(KeyError, match="not-an-utt"):
        store.utt("not-an-utt")


def test_cmvn_statistics_and_normalisation(feats):
    store = FeatureStore(feats)
    raw = store.load_all(cmvn="none").astype(np.float64)
    spk_of_frame = np.repeat(np.array(store.speakers), store.lengths)
    with np.load(feats / "cmvn.npz") as z:
        assert list(z["speakers"]) == sorted(SPEAKERS)
        assert all(z[k].dtype == np.float64 for k in z.files if k != "speakers")
        for s_i, spk in enumerate(z["speakers"]):
            x = raw[spk_of_frame == spk]
            assert z["spk_count"][s_i] == x.shape[0]
            np.testing.assert_allclose(z["spk_sum"][s_i], x.sum(0), rtol=1e-12)
            np.testing.assert_allclose(z["spk_sumsq"][s_i], (x ** 2).sum(0), rtol=1e-12)
        assert z["global_count"] == raw.shape[0]
        np.testing.assert_allclose(z["global_sum"], raw.sum(0), rtol=1e-12)

    by_spk = store.load_all(cmvn="speaker")
    for spk in SPEAKERS:
        x = by_spk[spk_of_frame == spk].astype(np.float64)
        np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-4)
        np.testing.assert_allclose(x.std(0), 1.0, atol=1e-3)
    glob = store.load_all(cmvn="global").astype(np.float64)
    np.testing.assert_allclose(glob.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(glob.std(0), 1.0, atol=1e-3)
    # Speakers differ in loudness, so the two normalisations must differ.
    assert np.abs(by_spk - glob).max() > 0.1
    # Per-utterance access agrees with the bulk load.
    k = 5
    u = store.ids[k]
    sl = slice(store.offsets[k], store.offsets[k] + store.lengths[k])
    np.testing.assert_allclose(store.utt_normalised(u, "speaker"), by_spk[sl], atol=1e-5)
    np.testing.assert_allclose(store.utt_normalised(u, "global"), glob[sl], atol=1e-5)
    np.testing.assert_array_equal(store.apply_cmvn(store.utt(u), store.speakers[k], "none"), store.utt(u))
    with pytest.raises(ValueError, match="CMVN mode"):
        store.load_all(cmvn="utterance")


def test_parallel_matches_serial(corpus, feats, tmp_path):
    par = make_features(corpus, tmp_path / "par", CFG, nj=2)
    for name in ["index.jsonl", "shard-00000.npy", "shard-00001.npy", "shard-00002.npy", "cmvn.npz"]:
        assert (par / name).read_bytes() == (feats / name).read_bytes(), name


def test_rerun_gives_the_same_files_and_config_change_recomputes(corpus, tmp_path):
    # Whether to skip is asr/step.py's decision; a rerun of the command itself rebuilds the same bytes.
    out = make_features(corpus, tmp_path / "f", CFG)
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    make_features(corpus, out, CFG)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first
    make_features(corpus, out, FeatureConfig(utts_per_shard=3, num_mel_bins=80))
    store = FeatureStore(out)
    assert store.dim == 80 and store.utt(store.ids[0]).shape[1] == 80


def test_killed_run_resumes_finished_shards(corpus, tmp_path):
    out = make_features(corpus, tmp_path / "f", CFG)
    reference = {p.name: p.read_bytes() for p in out.glob("shard-*.npy")}
    # A run killed while computing shard 1: its files and the final outputs never appeared.
    for name in ["shard-00001.npy", "shard-00001.json", "index.jsonl", "cmvn.npz", ".done"]:
        (out / name).unlink()
    (out / ".shard-00001.npy.abc.tmp").write_bytes(b"partial")
    kept = {n: (out / n).stat().st_mtime_ns for n in ["shard-00000.npy", "shard-00002.npy"]}
    make_features(corpus, out, CFG)
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # finished shards not rewritten
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.npy")} == reference
    assert not list(out.glob(".*.tmp"))
    assert len(FeatureStore(out)) == 8


def _corrupt(path: Path, problem: str) -> None:
    if problem == "empty":
        path.write_bytes(b"")
    elif problem == "garbage":
        path.write_bytes(b"this is not audio at all" * 50)
    elif problem == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif problem == "rate":
        x, _ = sf.read(path, dtype="float32")
        sf.write(path, x, 8000, format="FLAC")
    else:
        raise ValueError(problem)


PROBLEMS = {"empty": "zero-length", "garbage": "unreadable", "truncated": "truncated", "rate": "sample rate 8000"}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_bad_audio_stops_with_file_and_problem(tmp_path, problem):
    manifest = _make_corpus(tmp_path)
    uid = sorted(_ids(manifest))[7]  # in the last shard, so earlier shards finish first
    _corrupt(_audio(manifest, uid), problem)
    out = tmp_path / "feats"
    with pytest.raises(FeatureError) as err:
        make_features(manifest, out, CFG)
    assert uid in str(err.value) and str(_audio(manifest, uid)) in str(err.value)
    assert PROBLEMS[problem] in str(err.value)
    assert not (out / ".done").exists() and (out / "shard-00000.json").is_file()
    with pytest.raises(FeatureError, match="incomplete"):
        FeatureStore(out)


def test_skip_bad_lists_and_leaves_out(tmp_path):
    manifest = _make_corpus(tmp_path)
    ids = sorted(_ids(manifest))
    # Shard 1 (ids 3-5) loses every utterance: an empty shard in the middle must still read back.
    bad = {ids[0]: "empty", ids[3]: "garbage", ids[4]: "truncated", ids[5]: "rate"}
    for uid, problem in bad.items():
        _corrupt(_audio(manifest, uid), problem)
    out = make_features(manifest, tmp_path / "feats", CFG, nj=2, skip_bad=True)
    lines = (out / "bad_utts.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(bad)
    for line in lines:
        uid, msg = line.split("\t")
        assert PROBLEMS[bad[uid]] in msg and str(_audio(manifest, uid)) in msg
    store = FeatureStore(out)
    assert store.ids == [i for i in ids if i not in bad]
    assert store.num_frames_total == int(store.lengths.sum())
    np.testing.assert_allclose(store.utt(ids[1]), compute_fbank(read_audio(_audio(manifest, ids[1])), 16000, CFG),
                               rtol=2 ** -10, atol=1e-3)
    # The same directory without --skip-bad must not silently accept the gaps.
    with pytest.raises(FeatureError, match=ids[0]):
        make_features(manifest, out, CFG)
    assert not (out / ".done").exists(), "a failed rerun leaves no completion marker"
    with pytest.raises(FeatureError, match=ids[0]):
        make_features(manifest, out, CFG)


def test_store_validation_names_dir(feats, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(feats, broken)
    (broken / "shard-00001.npy").unlink()
    with pytest.raises(FeatureError, match=r"broken.*shard-00001.npy is missing"):
        FeatureStore(broken)

    shutil.rmtree(broken)
    shutil.copytree(feats, broken)
    rows = [json.loads(line) for line in (broken / "index.jsonl").read_text().splitlines()]
    rows[1]["num_frames"] += 1
    (broken / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FeatureError, match="broken"):
        FeatureStore(broken)

    with pytest.raises(FeatureError, match="does not exist"):
        FeatureStore(tmp_path / "nowhere")


def test_cli(corpus, tmp_path):
    from asr.cli import main

    conf = tmp_path / "fbank.yaml"
    conf.write_text("num_mel_bins: 80\nutts_per_shard: 4\n")
    out = tmp_path / "cli"
    rc = main(["make-feats", "--manifest", str(corpus), "--out-dir", str(out), "--config", str(conf),
               "--set", "utts_per_shard=5", "--nj", "1"])
    assert rc == 0
    store = FeatureStore(out)
    assert store.dim == 80 and len(list(out.glob("shard-*.npy"))) == 2  # 8 utterances, 5 per shard
    rc = main(["make-feats", "--manifest", str(corpus), "--out-dir", str(out), "--set", "num_mels=80"])
    assert rc == 2                                   # a config error, reported without a traceback
    with pytest.raises(KeyError, match="num_mels"):
        main(["-v", "make-feats", "--manifest", str(corpus), "--out-dir", str(out), "--set", "num_mels=80"])
