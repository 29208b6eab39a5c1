"""Alignment speed of the monophone GMM-HMM: frames per second per core, and pass times.

Runs one alignment of a feature directory with a trained model (``--model-dir``) or, without one,
trains a short monophone system first (its per-pass times are printed too). Without ``--feats-dir``
it builds the tiny espeak-ng corpus of tests/test_gmm.py in a temporary directory.

Examples::

    python benchmarks/bench_align.py                       # tiny generated corpus
    python benchmarks/bench_align.py --feats-dir exp/mini/feats/train-clean \\
        --manifest exp/mini/data/train-clean/manifest.jsonl --lang-dir exp/mini/lang \\
        --model-dir exp/mini/gmm_mono --nj 2
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--feats-dir", type=Path)
    p.add_argument("--manifest", type=Path)
    p.add_argument("--lang-dir", type=Path)
    p.add_argument("--model-dir", type=Path, help="trained model; trains a short one when absent")
    p.add_argument("--nj", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=6, help="passes when training here")
    args = p.parse_args()

    import kaldi_hmm_gmm  # noqa: F401  (before kaldifst)

    from asr.features import FeatureStore
    from asr.align import align
    from asr.gmm import train_mono
    from asr.gmm_model import GmmConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.feats_dir is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from test_gmm import make_tiny_corpus

            t0 = time.time()
            c = make_tiny_corpus(tmp / "corpus")
            print(f"built tiny corpus in {time.time() - t0:.1f}s")
            args.feats_dir, args.manifest, args.lang_dir = c["feats"], c["manifest"], c["lang"]
        if args.manifest is None or args.lang_dir is None:
            p.error("--manifest and --lang-dir are needed with --feats-dir")
        store = FeatureStore(args.feats_dir)
        if args.model_dir is None:
            cfg = GmmConfig(num_iters=args.num_iters, realign_iters=tuple(range(1, args.num_iters)),
                            max_iter_inc=max(1, args.num_iters - 2))
            t0 = time.time()
            train_mono(args.feats_dir, args.manifest, args.lang_dir, tmp / "mono", cfg, nj=args.nj,
                       ali_dir=tmp / "ali_train")
            print(f"train_mono ({args.num_iters} passes + training-set alignment): {time.time() - t0:.1f}s")
            for row in csv.DictReader(open(tmp / "mono" / "log" / "train.csv")):
                fps = int(row["frames"]) / max(float(row["seconds"]), 1e-9) / args.nj
                print(f"  pass {row['pass']:>2} {row['mode']:<8} {float(row['seconds']):6.2f}s "
                      f"avg loglike {float(row['avg_loglike']):8.3f}  {fps:9.0f} frames/s/core")
            args.model_dir = tmp / "mono"
        t0 = time.time()
        out = align(args.model_dir, args.lang_dir, args.feats_dir, args.manifest, tmp / "ali_bench", nj=args.nj)
        sec = time.time() - t0
        n = store.num_frames_total
        from asr.labels import LabelStore

        ls = LabelStore(out)
        print(f"align: {len(store.ids)} utts, {n} frames in {sec:.2f}s with nj={args.nj} "
              f"(incl. worker start-up): {n / sec / args.nj:.0f} frames/s/core; "
              f"{ls.info['num_failed']} failed, silence share {ls.info['silence_share']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
