"""Flat-start monophone GMM-HMM training (Kaldi's ``steps/train_mono.sh``): ``asr train-gmm``.

Recipe, as in Kaldi: every pdf starts as the global Gaussian of the features; pass 0 accumulates on
equal alignments; later passes realign on a schedule (``realign_iters``) and otherwise re-accumulate
on the previous alignment; after each ML update the Gaussians are split towards ``total_gauss``
(linearly over ``max_iter_inc`` passes, allocated to pdfs by occupancy ** ``power``). Training uses
the ``subset_utts`` shortest utterances; the final model then aligns every utterance.

Where the parts are: the model, its statistics and ML update in ``asr.gmm_model``; the features
(cepstra, deltas) in ``asr.cepstra``; alignment and the worker pool every pass runs in, in
``asr.align``; the triphone system, which reuses :func:`estimate`, in ``asr.tri``.

Example::

    asr train-gmm --feats-dir exp/mini/feats/train --manifest exp/mini/data/train/manifest.jsonl \\
        --lang-dir exp/mini/lang --out-dir exp/mini/gmm_mono --ali-dir exp/mini/ali/train --nj 2
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import time
from pathlib import Path

import numpy as np

import kaldi_hmm_gmm as khg  # noqa: I001  (must be imported before kaldifst)

from asr.align import _add_config_args, _add_required_paths, _run_pass, _Runner, _transcripts, align
from asr.cepstra import GmmFeatureSource
from asr.config import config_from_args, config_to_dict, write_config
from asr.gmm_model import GmmConfig, GmmError, GmmModel, _mix_up, _mle_update, _Stats
from asr.io import atomic_write_text, mark_done
from asr.lang import Lang, load_lang

__all__ = ["train_mono", "estimate", "training_subset", "add_cli"]

log = logging.getLogger(__name__)


def _write_train_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def estimate(runner: _Runner, model: GmmModel, tm: khg.TransitionModel, subset: list[str], cfg: GmmConfig,
             out_dir: Path, first_mode: str) -> GmmModel:
    """The estimation passes shared by the monophone and the triphone GMM (Kaldi's train_mono.sh /
    train_deltas.sh loop): pass 0 in ``first_mode`` (``equal`` from a flat start, ``realign`` from
    a tree-initialised model), later passes realign on ``cfg.realign_iters`` or re-accumulate;
    each ends with an ML update of transitions and Gaussians and a split towards the Gaussian
    budget. Writes ``out_dir/final.mdl`` and ``out_dir/log/train.csv``; returns the final model."""
    rng = np.random.default_rng(cfg.seed)
    num_gauss = float(model.num_pdfs)
    inc_gauss = max(0.0, (cfg.total_gauss - num_gauss) / max(cfg.max_iter_inc, 1))
    alis: dict[str, np.ndarray] = {}
    rows: list[dict] = []
    model_path = out_dir / "0.mdl"
    model.save(model_path)
    t_start = time.time()
    for it in range(cfg.num_iters):
        t0 = time.time()
        mode = first_mode if it == 0 else ("realign" if it in cfg.realign_iters else "acc")
        utts = subset if mode != "acc" else sorted(alis)
        res = _run_pass(runner, mode, model_path, utts, cfg, alis, model, tm.num_transition_ids,
                        f"gmm pass {it} ({mode})")
        if mode != "acc":
            alis = res["alis"]
        st: _Stats = res["stats"]
        if st.frames == 0:
            raise GmmError(f"pass {it}: no utterance could be aligned ({len(res['failed'])} failed, e.g. "
                           f"{next(iter(res['failed'].items()), ('', ''))})")
        # ML update of transitions and Gaussians, then split towards the Gaussian budget
        tm.mle_update(st.trans, khg.MleTransitionUpdateConfig(floor=cfg.transition_floor,
                                                              mincount=cfg.transition_mincount))
        pdf_occs = np.add.reduceat(st.occ, model.offsets[:-1])  # (P,) under the model of this pass
        model = _mle_update(model, st, cfg)
        model = _mix_up(model, pdf_occs, int(num_gauss), cfg, rng)
        model = model.replace(transition_log_probs=np.array(tm.log_probs))
        if it >= 1 and it <= cfg.max_iter_inc:
            num_gauss = min(num_gauss + inc_gauss, float(cfg.total_gauss))
        new_path = out_dir / f"{it + 1}.mdl"
        model.save(new_path)
        if model_path.name != "0.mdl":
            model_path.unlink(missing_ok=True)
        model_path = new_path
        row = {"pass": it, "mode": mode, "utts": len(utts) - len(res["failed"]), "frames": st.frames,
               "avg_loglike": round(st.like / st.frames, 4), "num_gauss": model.num_gauss,
               "failed": len(res["failed"]), "retried": res["retried"], "seconds": round(time.time() - t0, 2)}
        rows.append(row)
        log.info("pass %d (%s): avg log-like/frame %.3f over %d frames, %d Gaussians, %d failed, %.1fs",
                 it, mode, row["avg_loglike"], st.frames, model.num_gauss, row["failed"], row["seconds"])
        _write_train_log(out_dir / "log" / "train.csv", rows)
    model.save(out_dir / "final.mdl")
    model_path.unlink(missing_ok=True)
    log.info("training took %.1fs", time.time() - t_start)
    return model


def training_subset(manifest_path: Path, feats_dir: str | os.PathLike, source: GmmFeatureSource, lang: Lang,
                    subset_utts: int) -> tuple[dict[str, list[int]], list[str]]:
    """(transcripts as word ids, the ``subset_utts`` shortest utterances that GMM training uses;
    all when 0): a flat start learns fastest from short utterances, as Kaldi's train_mono does."""
    texts, _, _ = _transcripts(manifest_path, source, lang)
    if not texts:
        raise GmmError(f"{manifest_path}: no utterance has both features in {feats_dir} and a transcript")
    order = sorted(texts, key=lambda u: (source.num_frames(u), u))
    return texts, sorted(order[:subset_utts] if subset_utts > 0 else order)


def train_mono(
    feats_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    lang_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: GmmConfig = GmmConfig(),
    nj: int = 1,
    ali_dir: str | os.PathLike | None = None,
) -> Path:
    """Train a monophone GMM-HMM from a flat start and align the whole training set.

    Writes ``out_dir/final.mdl`` (see ``GmmModel``), ``out_dir/log/train.csv`` (per pass: realigned
    or not, Gaussians, average log-likelihood per frame, failures, seconds), ``config.yaml`` and the
    training-set labels with priors in ``ali_dir`` (default ``out_dir/ali_train``).
    """
    feats_dir, manifest_path, lang_dir, out_dir = Path(feats_dir), Path(manifest_path), Path(lang_dir), Path(out_dir)
    ali_dir = Path(ali_dir) if ali_dir is not None else out_dir / "ali_train"
    lang = load_lang(lang_dir)
    if nj < 1:
        raise ValueError(f"nj must be >= 1, got {nj}")
    (out_dir / ".done").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "log").mkdir(exist_ok=True)
    write_config(cfg, out_dir)

    source = GmmFeatureSource(feats_dir, cfg)
    texts, subset = training_subset(manifest_path, feats_dir, source, lang, cfg.subset_utts)
    num_frames = sum(source.num_frames(u) for u in subset)
    log.info("training on %d of %d utterances (%d frames), %d passes, up to %d Gaussians, nj=%d",
             len(subset), len(texts), num_frames, cfg.num_iters, cfg.total_gauss, nj)

    # gmm-init-mono: all pdfs = the global Gaussian of (a sample of) the training features
    sample = np.concatenate([source.feats(u) for u in subset[:200]])
    tm = lang.transition_model()
    model = GmmModel.flat(lang.num_pdfs, sample.mean(0), np.maximum(sample.var(0), cfg.min_variance), tm,
                          (lang.dir / "topo").read_text(), lang.real_phone_ids, config_to_dict(cfg))
    if model.dim != cfg.feature_dim:
        raise GmmError(f"feature dim {model.dim} != configured {cfg.feature_dim}")
    with _Runner(nj, (str(feats_dir), str(lang_dir), {u: texts[u] for u in subset}, cfg)) as runner:
        estimate(runner, model, tm, subset, cfg, out_dir, first_mode="equal")
    log.info("aligning all %d training utterances", len(texts))
    align(out_dir, lang_dir, feats_dir, manifest_path, ali_dir, nj=nj, train_labels=True, cfg=cfg)
    mark_done(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-gmm", help="flat-start monophone GMM-HMM training + training-set alignment")
    _add_required_paths(p, "--feats-dir", "--manifest", "--lang-dir", "--out-dir")
    p.add_argument("--ali-dir", default=None, help="where the training labels go (default OUT_DIR/ali_train)")
    _add_config_args(p)
    p.set_defaults(func=_cli_train)


def _cli_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(GmmConfig, args)
    train_mono(args.feats_dir, args.manifest, args.lang_dir, args.out_dir, cfg, nj=args.nj, ali_dir=args.ali_dir)
    return 0
