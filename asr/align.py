"""Forced alignment with a GMM-HMM: frame labels of a set (``asr align``), and the pool of worker
processes in which every GMM pass (training or alignment) runs its per-utterance work.

Per utterance: a training graph from the transcript (kaldi-hmm-gmm ``TrainingGraphCompiler``),
then either an equal alignment (the flat start's pass 0) or a Viterbi alignment
(``align_utterance_wrapper``, retried with a wider beam), optionally followed by the accumulation
of the GMM statistics (``asr.gmm_model``). Alignment failures are never silent (docs/DESIGN.md
section 8): the failure flag and the alignment length are checked for every utterance, and each
utterance left out is listed with its reason.

Example::

    asr align --model-dir exp/mini/gmm_mono --lang-dir exp/mini/lang --feats-dir exp/mini/feats/dev \\
        --manifest exp/mini/data/dev/manifest.jsonl --out-dir exp/mini/ali/dev --nj 2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import multiprocessing
import os
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

import kaldi_hmm_gmm as khg  # noqa: I001  (must be imported before kaldifst)
import kaldifst

from asr.cepstra import GmmFeatureSource
from asr.config import add_config_args, exit_if_print_config, parse_kv, resolve_config_args, write_config
from asr.gmm_model import (_FEATURE_FIELDS, GmmConfig, GmmError, GmmModel, _accumulate, _model_config, _model_path,
                           _Stats, transition_tables)
from asr.io import mark_done
from asr.labels import write_labels
from asr.lang import Lang, load_lang
from asr.manifest import read_manifest

__all__ = ["align", "add_cli"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Per-utterance work (in worker processes, or in-process for nj = 1)

_W: dict[str, Any] = {}  # worker state: features, lang tables, transcripts, the current model


def _worker_init(feats_dir: str, lang_dir: str, texts: dict[str, list[int]], cfg: GmmConfig) -> None:
    lang = load_lang(lang_dir)
    topo = lang.topology()
    min_len = {p: int(topo.min_length(p)) for p in lang.real_phone_ids}
    word_min = {}
    for w, prons in lang.lexicon.items():
        word_min[lang.word2id[w]] = min(sum(min_len[lang.phone2id[ph]] for ph in pron) for pron in prons)
    word_phones = {lang.word2id[w]: sorted({lang.phone2id[ph] for pron in prons for ph in pron})
                   for w, prons in lang.lexicon.items()}
    _W.clear()
    _W.update(source=GmmFeatureSource(feats_dir, cfg), lang=lang, texts=texts, cfg=cfg, word_min=word_min,
              word_phones=word_phones, L=lang.L(), model_path=None)


def _load_worker_model(path: str) -> None:
    if _W["model_path"] == path:
        return
    model = GmmModel.load(path)
    lang: Lang = _W["lang"]
    cfg: GmmConfig = _W["cfg"]
    tm = model.transition_model()
    opts = khg.TrainingGraphCompilerOptions(transition_scale=cfg.transition_scale,
                                            self_loop_scale=cfg.self_loop_scale)
    # The compiler keeps references to the transition model, tree and lexicon: keep them alive.
    ctx_dep = model.ctx_dep()
    lex = kaldifst.StdVectorFst(_W["L"])
    _W["compiler"] = khg.TrainingGraphCompiler(tm, ctx_dep, lex, lang.disambig_phone_ids, opts)
    _W.update(model=model, tm=tm, ctx_dep=ctx_dep, lex=lex, model_path=path)
    _W["tid2pdf"], pdf2phone = transition_tables(tm)
    _W["pdf2phone"] = pdf2phone
    _W["sil_pdfs"] = np.nonzero(np.isin(pdf2phone, lang.silence_phone_ids))[0]


def _align_one(utt: str, feats: np.ndarray, mode: str) -> tuple[np.ndarray | None, str | None, int, np.ndarray | None]:
    """``(transition-id alignment, None, retried, pdf log-likelihoods (T, P) or None)`` of one
    utterance, or ``(None, reason, retried, None)``."""
    cfg: GmmConfig = _W["cfg"]
    model: GmmModel = _W["model"]
    words = _W["texts"][utt]
    t = feats.shape[0]
    need = sum(_W["word_min"][w] for w in words)
    if t < need:
        return None, f"too short: {t} frames, its {len(words)} word(s) need at least {need}", 0, None
    graph = _W["compiler"].compile_graph_from_text(words)
    if graph.num_states == 0:
        return None, "empty training graph (transcript not accepted by L)", 0, None
    if mode == "equal":
        seed = zlib.crc32(f"{cfg.seed}:{utt}".encode()) & 0x7FFFFFFF
        ok, path = kaldifst.equal_align(graph, t, seed)
        if not ok:
            return None, f"equal alignment failed ({t} frames)", 0, None
        _, ali, _, _ = kaldifst.get_linear_symbol_sequence(path)
        ali = np.asarray(ali, np.int64)
        pdf_ll = None
        retried = 0
    else:
        lang: Lang = _W["lang"]
        phones = set(lang.silence_phone_ids)
        for w in set(words):
            phones.update(_W["word_phones"][w])
        pdfs = np.nonzero(np.isin(_W["pdf2phone"], sorted(phones)))[0]
        pdf_ll = np.full((t, model.num_pdfs), -1e5)
        pdf_ll[:, pdfs] = model.loglikes(feats, pdfs)
        if cfg.boost_silence != 1.0:
            pdf_ll[:, _W["sil_pdfs"]] += math.log(cfg.boost_silence)
        mat = (cfg.acoustic_scale * pdf_ll[:, _W["tid2pdf"][1:]]).astype(np.float32)  # (T, num_tids)
        dec = khg.DecodableCtc(mat)
        acfg = khg.AlignConfig(beam=cfg.beam, retry_beam=cfg.retry_beam, careful=False)
        done, err, retried, _, _, ali, _ = khg.align_utterance_wrapper(acfg, utt, cfg.acoustic_scale, graph, dec,
                                                                       0, 0, 0, 0.0, 0)
        if err or not done or len(ali) == 0:
            return None, f"alignment failed (beam {cfg.beam:g}, retry beam {cfg.retry_beam:g})", retried, None
        ali = np.asarray(ali, np.int64)
    if len(ali) != t:
        return None, f"alignment has {len(ali)} frames, features have {t}", retried, None
    return ali, None, retried, pdf_ll


def _worker_task(task: tuple[str, str, list[str], list[np.ndarray] | None]) -> dict:
    """One chunk of utterances. Modes: ``equal`` (equal alignment + stats), ``realign`` (Viterbi
    alignment + stats), ``acc`` (stats on the given alignments), ``align`` (alignment only)."""
    mode, model_path, utts, given = task
    _load_worker_model(model_path)
    model: GmmModel = _W["model"]
    tm = _W["tm"]
    st = _Stats.zeros(model.num_gauss, model.dim, tm.num_transition_ids) if mode != "align" else None
    alis: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    likes: dict[str, float] = {}
    retried = 0
    for i, utt in enumerate(utts):
        feats = _W["source"].feats(utt)
        if mode == "acc":
            ali = given[i]
        else:
            ali, reason, r, pdf_ll = _align_one(utt, feats, mode)
            retried += r
            if ali is None:
                failed[utt] = reason
                continue
            alis[utt] = ali.astype(np.int32)
        pdf_ali = _W["tid2pdf"][ali]
        if st is not None:
            likes[utt] = _accumulate(model, feats, pdf_ali, ali, st)
        else:
            likes[utt] = float(pdf_ll[np.arange(len(pdf_ali)), pdf_ali].sum())
    return {"stats": st, "alis": alis, "failed": failed, "likes": likes, "retried": retried}


class _Runner:
    """Runs chunk tasks in order in a pool of ``nj`` spawned worker processes.

    Workers are always separate processes, even for nj = 1: they start with one BLAS thread
    (``OPENBLAS_NUM_THREADS=1``), which is 5-10x faster for these small products on a shared
    machine than numpy's default thread pool, and it never oversubscribes the cores.
    """

    def __init__(self, nj: int, init_args: tuple) -> None:
        self.nj = nj
        saved = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        for k in saved:
            os.environ[k] = "1"
        try:
            self.pool = multiprocessing.get_context("spawn").Pool(nj, initializer=_worker_init, initargs=init_args)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def run(self, tasks: list[tuple], total_utts: int, desc: str) -> Iterator[dict]:
        from tqdm import tqdm

        it = self.pool.imap(_worker_task, tasks)
        with tqdm(total=total_utts, desc=desc, unit="utt", leave=False, disable=None) as bar:
            for task, res in zip(tasks, it):
                bar.update(len(task[2]))
                yield res

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None


def _run_pass(runner: _Runner, mode: str, model_path: Path, utts: list[str], cfg: GmmConfig,
              alis: dict[str, np.ndarray] | None, model: GmmModel, num_tids: int, desc: str) -> dict:
    n = cfg.chunk_utts
    chunks = [utts[i:i + n] for i in range(0, len(utts), n)]
    tasks = [(mode, str(model_path), c, [alis[u] for u in c] if mode == "acc" else None) for c in chunks]
    st = _Stats.zeros(model.num_gauss, model.dim, num_tids) if mode != "align" else None
    out = {"stats": st, "alis": {}, "failed": {}, "likes": {}, "retried": 0}
    for res in runner.run(tasks, len(utts), desc):
        if st is not None:
            st.add(res["stats"])
        out["alis"].update(res["alis"])
        out["failed"].update(res["failed"])
        out["likes"].update(res["likes"])
        out["retried"] += res["retried"]
    return out


def _transcripts(manifest_path: Path, source: GmmFeatureSource, lang: Lang) -> tuple[dict[str, list[int]], dict[str, str], dict]:
    """Word ids of every utterance with features; utterances that cannot be used, with the reason."""
    utts = {u.id: u for u in read_manifest(manifest_path)}
    texts: dict[str, list[int]] = {}
    failed: dict[str, str] = {}
    oov_tokens = 0
    oov_words: dict[str, int] = {}
    num_words = 0
    for uid in source.store.ids:
        u = utts.get(uid)
        if u is None:
            failed[uid] = f"no transcript in {manifest_path}"
            continue
        if not u.words:
            failed[uid] = "empty transcript"
            continue
        for w in u.words:
            num_words += 1
            if w not in lang.word2id or w in ("<eps>", "#0", "<s>", "</s>"):
                oov_tokens += 1
                oov_words[w] = oov_words.get(w, 0) + 1
        texts[uid] = lang.words_to_ids(u.words)
    for uid in sorted(set(utts) - set(source.store.ids)):
        failed[uid] = f"no features in {source.store.dir}"
    top = sorted(oov_words.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    stats = {"num_words": num_words, "num_oov_words": oov_tokens, "oov_examples": dict(top)}
    if oov_tokens:
        log.info("%d of %d words not in the lexicon map to %s (e.g. %s)", oov_tokens, num_words, lang.unk_word,
                 ", ".join(w for w, _ in top[:5]))
    return texts, failed, stats


def _alignment_config(cfg: GmmConfig | None, model: GmmModel, model_file: Path) -> GmmConfig:
    """The config to align with: the model's own training config, or ``cfg`` if its feature settings
    are the model's (features computed otherwise would not fit the Gaussians)."""
    mcfg = _model_config(model)
    if cfg is None:
        return mcfg
    changed = [f for f in _FEATURE_FIELDS if getattr(cfg, f) != getattr(mcfg, f)]
    if changed:
        raise GmmError(f"feature settings {changed} differ from those of model {model_file}")
    return cfg


def _check_model_fits_lang(model: GmmModel, tm: object, model_file: Path, lang: Lang, lang_dir: Path) -> None:
    """A monophone model must have the lang's pdfs, and any model its phone set."""
    if model.tree is None and lang.num_pdfs != model.num_pdfs:
        raise GmmError(f"model {model_file} has {model.num_pdfs} pdfs, lang {lang_dir} has {lang.num_pdfs}")
    if sorted(tm.phones) != lang.real_phone_ids:
        raise GmmError(f"model {model_file} and lang {lang_dir} have different phone sets")


def _frame_labels(alis: dict[str, np.ndarray], store: object, tid2pdf: np.ndarray,
                  sil_pdfs: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Pdf label of every frame of the set in store order (-1 where an utterance failed), and how
    many alignments start and end in silence (a check that the silence model works)."""
    labels = np.full(store.num_frames_total, -1, np.int32)
    pos = {u: k for k, u in enumerate(store.ids)}
    last_sil = first_sil = 0
    for u, ali in alis.items():
        k = pos[u]
        off, n = int(store.offsets[k]), int(store.lengths[k])
        if len(ali) != n:  # checked in the worker too; a mismatch here is a bug, never a silent shift
            raise GmmError(f"{u}: alignment has {len(ali)} frames, features have {n}")
        pdfs = tid2pdf[ali]
        labels[off:off + n] = pdfs
        first_sil += int(pdfs[0] in sil_pdfs)
        last_sil += int(pdfs[-1] in sil_pdfs)
    return labels, first_sil, last_sil


def _alignment_info(res: dict, labels: np.ndarray, first_sil: int, last_sil: int, opt_sil_pdfs: np.ndarray,
                    oov: dict, model_file: Path, t0: float) -> dict:
    """``info.json`` of an alignment: likelihood, silence shares, retries, OOVs, model, time."""
    aligned = labels[labels >= 0]
    num_aligned = len(res["alis"])
    total_like = sum(res["likes"].values())
    return {
        "num_aligned": num_aligned,
        "avg_loglike": round(total_like / max(aligned.size, 1), 4),
        "silence_share": round(float(np.isin(aligned, opt_sil_pdfs).mean()) if aligned.size else 0.0, 4),
        "first_frame_silence_share": round(first_sil / max(num_aligned, 1), 4),
        "last_frame_silence_share": round(last_sil / max(num_aligned, 1), 4),
        "num_retried": res["retried"],
        **oov,
        "model": str(model_file.resolve()),
        "seconds": round(time.time() - t0, 2),
    }


def align(
    model_dir: str | os.PathLike,
    lang_dir: str | os.PathLike,
    feats_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    nj: int = 1,
    train_labels: bool = False,
    cfg: GmmConfig | None = None,
) -> Path:
    """Force-align every utterance of a set and write ``ali/<set>/`` (docs/FORMATS.md "Frame labels").

    ``train_labels``: this is the training set, so ``priors.npy`` is counted from these labels.
    ``cfg``: alignment settings (beams, boost, prior floor); None takes the model's training config.
    Feature settings always come from the model.
    """
    model_dir, lang_dir, feats_dir, out_dir = Path(model_dir), Path(lang_dir), Path(feats_dir), Path(out_dir)
    manifest_path = Path(manifest_path)
    model_file = _model_path(model_dir)
    model = GmmModel.load(model_file)
    cfg = _alignment_config(cfg, model, model_file)
    lang = load_lang(lang_dir)
    tm = model.transition_model()
    _check_model_fits_lang(model, tm, model_file, lang, lang_dir)
    (out_dir / ".done").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out_dir)

    t0 = time.time()
    source = GmmFeatureSource(feats_dir, cfg)
    texts, failed, oov = _transcripts(manifest_path, source, lang)
    utts = sorted(texts)
    with _Runner(nj, (str(feats_dir), str(lang_dir), texts, cfg)) as runner:
        res = _run_pass(runner, "align", model_file, utts, cfg, None, model, 0, f"align {out_dir.name}")
    failed.update(res["failed"])

    store = source.store
    tid2pdf, pdf2phone = transition_tables(tm)
    sil_pdfs = np.nonzero(np.isin(pdf2phone, lang.silence_phone_ids))[0]
    opt_sil_pdfs = np.nonzero(pdf2phone == lang.optional_silence_id)[0]
    labels, first_sil, last_sil = _frame_labels(res["alis"], store, tid2pdf, sil_pdfs)
    info = _alignment_info(res, labels, first_sil, last_sil, opt_sil_pdfs, oov, model_file, t0)
    write_labels(out_dir, labels, failed, model.num_pdfs, len(store.ids),
                 priors_floor=cfg.prior_floor if train_labels else None, extra_info=info)
    if failed:
        log.warning("%s: %d utterance(s) left out, listed in %s", out_dir, len(failed), out_dir / "failed.txt")
    log.info("%s: %d utterances aligned, %d failed, silence share %.3f, %.1fs", out_dir, info["num_aligned"],
             len(failed), info["silence_share"], info["seconds"])
    mark_done(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# CLI


def _add_config_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--nj", type=int, default=1, help="worker processes")


def _add_required_paths(p: argparse.ArgumentParser, *flags: str) -> None:
    """The GMM steps' input and output folders (``--feats-dir``, ``--lang-dir`` ...), each required."""
    for flag in flags:
        p.add_argument(flag, required=True)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("align", help="forced alignment -> frame labels (ali/<set>/)")
    _add_required_paths(p, "--model-dir", "--lang-dir", "--feats-dir", "--manifest", "--out-dir")
    p.add_argument("--train-labels", action="store_true", help="training set: also write priors.npy")
    _add_config_args(p)
    p.set_defaults(func=_cli_align)


def _cli_align(args: argparse.Namespace) -> int:
    cfg = None
    if args.config or args.overrides:
        base = _model_config(GmmModel.load(_model_path(args.model_dir)))
        cfg = resolve_config_args(GmmConfig, args)
        cfg = dataclasses.replace(cfg, **{f: getattr(base, f) for f in _FEATURE_FIELDS
                                          if f not in parse_kv(args.overrides)})
    if args.print_config:   # without --config / --set, the model's own training config aligns
        exit_if_print_config(args, cfg or _model_config(GmmModel.load(_model_path(args.model_dir))))
    align(args.model_dir, args.lang_dir, args.feats_dir, args.manifest, args.out_dir, nj=args.nj,
          train_labels=args.train_labels, cfg=cfg)
    return 0
