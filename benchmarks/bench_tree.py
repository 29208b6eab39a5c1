"""Tree-building time and triphone alignment speed (frames per second per core).

Accumulates the tree statistics of a monophone alignment, builds the tree (``--num-leaves``), then
aligns a feature directory with a triphone model: ``--tri-dir`` if given, else one trained here
with a short schedule (its per-pass times are printed). Speeds are given per wall second and per
CPU second of the alignment workers (the latter does not depend on what else runs on the machine).

Example (the mini corpus; exp/mini as built by recipes/mini/run.sh --stop-stage 4)::

    python benchmarks/bench_tree.py --exp exp/mini --train-set train-clean --align-set dev-clean \\
        --num-leaves 300 --tri-dir exp/mini/gmm_tri --nj 1
"""

from __future__ import annotations

import argparse
import csv
import resource
import sys
import tempfile
import time
from pathlib import Path


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--exp", type=Path, required=True, help="experiment dir with data/ feats/ lang/ gmm_mono/ ali/")
    p.add_argument("--train-set", default="train-clean")
    p.add_argument("--align-set", default="dev-clean", help="set aligned with the triphone model")
    p.add_argument("--mono-ali", default=None,
                   help="folder of the monophone alignment under --exp (default: ali_mono, the recipes' "
                        "folder with tied-state labels; ali when there is none)")
    p.add_argument("--num-leaves", type=int, default=300)
    p.add_argument("--tri-dir", type=Path, default=None, help="trained triphone GMM; trains a short one when absent")
    p.add_argument("--num-iters", type=int, default=4, help="passes when training here")
    p.add_argument("--nj", type=int, default=1)
    args = p.parse_args()

    import kaldi_hmm_gmm  # noqa: F401  (before kaldifst)

    from asr.features import FeatureStore
    from asr.align import align
    from asr.labels import LabelStore
    from asr.lang import load_lang
    from asr.tree import TreeConfig, accumulate_tree_stats, build_tree, make_tree
    from asr.tri import TriConfig, train_tri

    exp = args.exp
    lang_dir, mono = exp / "lang", exp / "gmm_mono"
    mono_ali = args.mono_ali or ("ali_mono" if (exp / "ali_mono").is_dir() else "ali")
    ali = exp / mono_ali / args.train_set
    feats = exp / "feats" / args.train_set
    lang = load_lang(lang_dir)
    topo = lang.topology()

    c0, t0 = time.process_time(), time.time()
    st, info = accumulate_tree_stats(ali, feats, lang_dir, mono)
    print(f"tree statistics: {info['num_frames']} frames of {info['num_utts']} utts -> {info['num_contexts']} "
          f"contexts in {time.time() - t0:.2f}s wall, {time.process_time() - c0:.2f}s CPU")
    c0, t0 = time.process_time(), time.time()
    tree, binfo = build_tree(st, lang.real_phone_ids, {q: topo.num_pdf_classes(q) for q in lang.real_phone_ids},
                             TreeConfig(num_leaves=args.num_leaves))
    print(f"build tree: {binfo['num_leaves_split']} leaves split, {binfo['num_leaves']} after merging, "
          f"{binfo['num_questions']['phone']} phone questions, in {time.time() - t0:.2f}s wall, "
          f"{time.process_time() - c0:.2f}s CPU")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tri = args.tri_dir
        if tri is None:
            make_tree(ali, feats, lang_dir, mono, tmp / "tree", TreeConfig(num_leaves=args.num_leaves))
            cfg = TriConfig(num_iters=args.num_iters, max_iter_inc=max(1, args.num_iters - 1),
                            total_gauss=6 * binfo["num_leaves"], realign_iters=tuple(range(1, args.num_iters)))
            t0 = time.time()
            train_tri(tmp / "tree", mono, feats, exp / "data" / args.train_set / "manifest.jsonl", lang_dir,
                      tmp / "tri", cfg, nj=args.nj, ali_dir=tmp / "ali_tri")
            print(f"train_tri ({args.num_iters} passes + training-set alignment): {time.time() - t0:.1f}s")
            for row in csv.DictReader(open(tmp / "tri" / "log" / "train.csv")):
                fps = int(row["frames"]) / max(float(row["seconds"]), 1e-9) / args.nj
                print(f"  pass {row['pass']:>2} {row['mode']:<8} {float(row['seconds']):6.2f}s "
                      f"avg loglike {float(row['avg_loglike']):8.3f}  {fps:9.0f} frames/s/core (wall)")
            tri = tmp / "tri"
        s = args.align_set
        store = FeatureStore(exp / "feats" / s)
        cpu0, t0 = _children_cpu(), time.time()
        out = align(tri, lang_dir, exp / "feats" / s, exp / "data" / s / "manifest.jsonl", tmp / "ali_bench",
                    nj=args.nj)
        sec, cpu = time.time() - t0, _children_cpu() - cpu0
        ls = LabelStore(out)
        n = ls.num_labelled
        print(f"triphone align {s}: {len(store.ids)} utts, {n} frames, {ls.num_pdfs} pdfs, nj={args.nj}: "
              f"{sec:.2f}s wall -> {n / sec / args.nj:.0f} frames/s/core; workers {cpu:.2f}s CPU -> "
              f"{n / max(cpu, 1e-9):.0f} frames per CPU second; {ls.info['num_failed']} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
