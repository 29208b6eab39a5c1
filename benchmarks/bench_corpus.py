"""Throughput of the synthetic corpus builder: utterances/s and seconds of audio per wall second.

Builds a corpus of ``--num-utts`` utterances in a temporary folder (deleted afterwards) and prints
the figures in total and per process. Run it alone on the machine, under ``nice``::

    nice -n 10 .venv/bin/python benchmarks/bench_corpus.py --num-utts 200 --nj 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from data_prep.mini_corpus import MiniCorpusConfig, build_mini_corpus, plan_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-utts", type=int, default=200)
    ap.add_argument("--nj", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    cfg = MiniCorpusConfig(seed=args.seed, num_utts=args.num_utts)
    t0 = time.perf_counter()
    plan_corpus(cfg)
    t_plan = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        root = Path(tmp) / "corpus"
        t0 = time.perf_counter()
        build_mini_corpus(root, cfg, nj=args.nj)
        wall = time.perf_counter() - t0
        info = json.loads((root / "corpus_info.json").read_text())
    audio_s = sum(s["hours"] for s in info["subsets"].values()) * 3600
    cpu = os.cpu_count() or 1
    print(f"utterances: {args.num_utts}  processes: {args.nj}  cpus: {cpu}  load before: {os.getloadavg()[0]:.2f}")
    print(f"planning (text, lexicon): {t_plan:.2f} s")
    print(f"wall time: {wall:.1f} s   audio: {audio_s / 3600:.3f} h")
    print(f"utterances/s: {args.num_utts / wall:.2f}  ({args.num_utts / wall / args.nj:.2f} per process)")
    print(f"audio s per wall s: {audio_s / wall:.1f}  ({audio_s / wall / args.nj:.1f} per process)")
    print(f"projected wall time for 2000 utterances: {wall * 2000 / args.num_utts:.0f} s")


if __name__ == "__main__":
    main()
