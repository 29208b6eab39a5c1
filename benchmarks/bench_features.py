"""Feature extraction speed: times real time, overall and per core, for make_features at several --nj.

Reads FLACs from a LibriSpeech-layout --corpus-dir (until --seconds of audio are collected), or
writes generated speech-like audio to a temporary directory. Each run starts from an empty output
directory, so the wall time covers decoding, fbank, shard writing, index and CMVN; the fastest of
--repeat runs is reported because the machine is shared.

Example::

    python benchmarks/bench_features.py --seconds 60 --nj 1 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from asr.features import FeatureConfig, compute_fbank, make_features
from asr.manifest import Utterance, write_manifest


def _generated(root: Path, seconds: float, sr: int = 16000) -> list[Utterance]:
    rng = np.random.default_rng(0)
    utts, total, k = [], 0.0, 0
    while total < seconds:
        dur = min(float(rng.uniform(4, 14)), seconds - total + 0.5)
        t = np.arange(int(dur * sr)) / sr
        f0 = rng.uniform(90, 250)
        x = sum(rng.uniform(0.02, 0.1) * np.sin(2 * np.pi * f0 * h * t) for h in range(1, 8))
        x = x * (1 + np.sin(2 * np.pi * rng.uniform(2, 5) * t)) / 2 + 0.01 * rng.standard_normal(t.size)
        spk = f"{100 + k % 4}"
        uid = f"{spk}-1-{k:04d}"
        path = root / f"{uid}.flac"
        sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")
        utts.append(Utterance(uid, spk, "1", str(path), t.size, sr, "X"))
        total += dur
        k += 1
    return utts


def _from_corpus(corpus: Path, seconds: float) -> list[Utterance]:
    utts, total = [], 0.0
    for path in sorted(corpus.rglob("*.flac")):
        info = sf.info(str(path))
        uid = path.stem
        utts.append(Utterance(uid, uid.split("-")[0], "1", str(path.resolve()), info.frames, info.samplerate, "X"))
        total += info.frames / info.samplerate
        if total >= seconds:
            break
    if not utts:
        raise SystemExit(f"no .flac files under {corpus}")
    return utts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of audio to process")
    p.add_argument("--corpus-dir", type=Path, default=None, help="LibriSpeech-layout dir of FLACs")
    p.add_argument("--nj", type=int, nargs="+", default=[1, 2])
    p.add_argument("--num-mel-bins", type=int, default=40)
    p.add_argument("--repeat", type=int, default=3, help="runs per nj; the fastest is reported (shared machine)")
    args = p.parse_args()

    cfg = FeatureConfig(num_mel_bins=args.num_mel_bins)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        audio_dir = tmp / "audio"
        audio_dir.mkdir()
        utts = _from_corpus(args.corpus_dir, args.seconds) if args.corpus_dir else _generated(audio_dir, args.seconds)
        audio_s = sum(u.duration for u in utts)
        manifest = tmp / "manifest.jsonl"
        write_manifest(manifest, utts)
        print(f"{len(utts)} utterances, {audio_s:.1f} s of audio "
              f"({'corpus ' + str(args.corpus_dir) if args.corpus_dir else 'generated'}), {cfg.num_mel_bins} bins")
        compute_fbank(np.zeros(16000, np.float32), 16000, cfg)  # import torch/torchaudio outside the timing
        for nj in args.nj:
            walls = []
            for r in range(args.repeat):
                start = time.perf_counter()
                make_features(manifest, tmp / f"feats_nj{nj}_{r}", cfg, nj=nj)
                walls.append(time.perf_counter() - start)
            wall = min(walls)
            print(f"nj={nj}: wall {wall:.2f} s, {audio_s / wall:.0f}x real time total, "
                  f"{audio_s / wall / nj:.0f}x real time per core")


if __name__ == "__main__":
    main()
