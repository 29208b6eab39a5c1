"""Triphone GMM-HMM on the tied states of a decision tree (Kaldi's ``steps/train_deltas.sh``, tri1).

The tree comes from ``asr build-tree`` (``asr.tree``) and the features and alignment settings from
the monophone GMM it was grown on. As Kaldi's ``gmm-init-model``, every leaf starts as the single
Gaussian of the tree statistics that reach it (a phone never seen in training: the global
Gaussian), and the transition model is the topology's, on the new tree. The estimation passes are
those of the monophone system (``asr.gmm.estimate``: the same numpy GMM code and worker pool):
pass 0 realigns with the initial model (it already is the ML estimate on the monophone alignment,
which is what Kaldi's ``convert-ali`` + first accumulation give), later passes realign on
``realign_iters`` and split Gaussians linearly up to ``total_gauss``. The final model aligns the
whole training set; its labels are tied-state pdf ids in the ``asr.labels`` format, priors
counted from them.

Example::

    asr train-tri --tree-dir exp/mini/tree --mono-dir exp/mini/gmm_mono \\
        --feats-dir exp/mini/feats/train-clean --manifest exp/mini/data/train-clean/manifest.jsonl \\
        --lang-dir exp/mini/lang --out-dir exp/mini/gmm_tri --ali-dir exp/mini/ali_tri/train-clean --nj 2
    asr align --model-dir exp/mini/gmm_tri ...       # every other set, as for the monophone model
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import kaldi_hmm_gmm as khg  # noqa: I001  (must be imported before kaldifst)

from asr.config import add_config_args, config_from_args, config_to_dict, write_config
from asr.align import _add_required_paths, _Runner, align
from asr.cepstra import GmmFeatureSource
from asr.gmm import estimate, training_subset
from asr.gmm_model import GmmError, GmmModel, _model_config, _model_path
from asr.io import is_done, mark_done
from asr.lang import load_lang
from asr.tree import Tree, TreeStats, context_dependency_from_bytes

__all__ = ["TriConfig", "init_from_tree", "train_tri", "add_cli"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TriConfig:
    """Triphone schedule (Kaldi train_deltas.sh: 35 passes, realign at 10/20/30, Gaussians grow
    up to pass 25), scaled to a CPU budget. Features, beams and splitting settings come from the
    monophone model."""

    num_iters: int = 20
    max_iter_inc: int = 14
    total_gauss: int = 2000
    realign_iters: tuple[int, ...] = (4, 8, 12, 16)
    subset_utts: int = 0              # train on the N shortest utterances (0 = all)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_iters < 1 or self.max_iter_inc < 0 or self.total_gauss < 1:
            raise ValueError("TriConfig: num_iters >= 1, max_iter_inc >= 0 and total_gauss >= 1 required")


def init_from_tree(tree: Tree, tree_bytes: bytes, stats: TreeStats, mono: GmmModel,
                   min_variance: float) -> GmmModel:
    """One Gaussian per leaf from the statistics of the contexts it covers (Kaldi gmm-init-model)."""
    cd = context_dependency_from_bytes(tree_bytes)
    tmodel = khg.TransitionModel(cd, mono.topology())      # the topology's probabilities, on the new tree
    num_pdfs = int(cd.num_pdfs)
    if stats.dim != mono.dim:
        raise GmmError(f"tree statistics have dim {stats.dim}, the monophone model {mono.dim}")
    leaf = np.array([tree.compute(*row) for row in stats.keys.tolist()], np.int64)
    acc = np.zeros((num_pdfs, stats.stats.shape[1]))
    np.add.at(acc, leaf, stats.stats)
    tot = stats.stats.sum(0)
    d = mono.dim
    means = np.empty((num_pdfs, d))
    variances = np.empty((num_pdfs, d))
    for p in range(num_pdfs):
        s = acc[p] if acc[p, 0] > 0 else tot
        mu = s[1:1 + d] / s[0]
        means[p] = mu
        variances[p] = np.maximum(s[1 + d:] / s[0] - mu * mu, min_variance)
    return GmmModel(np.ones(num_pdfs), means, variances, np.arange(num_pdfs + 1), np.array(tmodel.log_probs),
                    mono.topo, mono.phones, {}, tree=tree_bytes)


def train_tri(tree_dir: str | os.PathLike, mono_dir: str | os.PathLike, feats_dir: str | os.PathLike,
              manifest_path: str | os.PathLike, lang_dir: str | os.PathLike, out_dir: str | os.PathLike,
              cfg: TriConfig = TriConfig(), nj: int = 1, ali_dir: str | os.PathLike | None = None) -> Path:
    """Train the triphone GMM and align the training set (``ali_dir``, default ``out_dir/ali_train``,
    with priors)."""
    tree_dir, feats_dir, lang_dir, out_dir = Path(tree_dir), Path(feats_dir), Path(lang_dir), Path(out_dir)
    manifest_path = Path(manifest_path)
    ali_dir = Path(ali_dir) if ali_dir is not None else out_dir / "ali_train"
    if nj < 1:
        raise ValueError(f"nj must be >= 1, got {nj}")
    if not is_done(tree_dir):
        raise GmmError(f"tree directory {tree_dir} is not complete (run build-tree)")
    mono = GmmModel.load(_model_path(mono_dir))
    gcfg = dataclasses.replace(_model_config(mono), num_iters=cfg.num_iters, max_iter_inc=cfg.max_iter_inc,
                               total_gauss=cfg.total_gauss, realign_iters=tuple(cfg.realign_iters),
                               subset_utts=cfg.subset_utts, seed=cfg.seed)
    (out_dir / ".done").unlink(missing_ok=True)
    (out_dir / "log").mkdir(parents=True, exist_ok=True)
    write_config(cfg, out_dir)

    lang = load_lang(lang_dir)
    tree_bytes = (tree_dir / "tree").read_bytes()
    tree = Tree.from_bytes(tree_bytes)
    t0 = time.time()
    model = init_from_tree(tree, tree_bytes, TreeStats.load(tree_dir / "treeacc.npz"), mono, gcfg.min_variance)
    model = model.replace(config=config_to_dict(gcfg))
    tm = model.transition_model()
    source = GmmFeatureSource(feats_dir, gcfg)
    texts, subset = training_subset(manifest_path, feats_dir, source, lang, cfg.subset_utts)
    log.info("triphone GMM: %d pdfs, training on %d of %d utterances, %d passes, up to %d Gaussians, nj=%d",
             model.num_pdfs, len(subset), len(texts), cfg.num_iters, cfg.total_gauss, nj)
    with _Runner(nj, (str(feats_dir), str(lang_dir), {u: texts[u] for u in subset}, gcfg)) as runner:
        estimate(runner, model, tm, subset, gcfg, out_dir, first_mode="realign")
    log.info("triphone training took %.1fs; aligning all %d training utterances", time.time() - t0, len(texts))
    align(out_dir, lang_dir, feats_dir, manifest_path, ali_dir, nj=nj, train_labels=True, cfg=gcfg)
    mark_done(out_dir)
    return out_dir


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-tri", help="triphone GMM-HMM on a decision tree + training-set alignment")
    p.add_argument("--tree-dir", required=True, help="output of build-tree")
    p.add_argument("--mono-dir", required=True, help="the monophone GMM the tree was grown on")
    _add_required_paths(p, "--feats-dir", "--manifest", "--lang-dir", "--out-dir")
    p.add_argument("--ali-dir", default=None, help="where the training labels go (default OUT_DIR/ali_train)")
    add_config_args(p)
    p.add_argument("--nj", type=int, default=1, help="worker processes")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    train_tri(args.tree_dir, args.mono_dir, args.feats_dir, args.manifest, args.lang_dir, args.out_dir,
              config_from_args(TriConfig, args), nj=args.nj, ali_dir=args.ali_dir)
    return 0
