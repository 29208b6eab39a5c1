"""Decode and score any trained system on any prepared set: the ``asr decode`` command.

A *system* is whatever turns frames into pdf scores: the monophone GMM (its own log-likelihoods),
a member or a distilled student (a ``model.pt`` beside ``post/<set>.npy``), or an ensemble
(``ensemble/post_<k>/`` with ``members.json``). Neural systems are decoded in hybrid fashion,
``acwt * (log p(s|x) - log p(s))``, with the priors counted from the training alignment. The
acoustic scale is tuned on a dev set only (``--tune-set``) or copied from another system's
``tune.json`` (``--acwt-from``), never chosen on test data.

Outputs, per system: ``decode/<name>/system.json`` (what the report needs: name, kind, params,
seed / members / temperature / hard_weight), ``decode/<name>/tune.json``, and one scored folder
per set (``asr.scoring.score_decode``: hyp.txt, per_utt, wer.json, frame_acc.json, .done) with
``inputs.sha1``, the fingerprint of what that set's result depends on (its posteriors or the GMM,
HCLG, priors, features, manifest, alignment, the decoding config with the chosen acwt). A set whose
folder is done with the same fingerprint is skipped, so a killed decode resumes; decoding another
set adds to a system's results and never removes the others. A stale set is decoded into a folder
beside it and renamed into place only when complete; every input is validated before anything is
written. ``tune.json`` records what it was made from and is reused only when that matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from asr.config import add_config_args, config_from_args, config_to_dict
from asr.decode import DecodeConfig, decode_many, hybrid_loglikes, tune_acwt
from asr.features import FeatureStore
from asr.io import atomic_write_json, atomic_write_text, is_done, read_json
from asr.labels import LabelStore
from asr.manifest import read_manifest
from asr.scoring import score_decode

__all__ = ["SetPaths", "System", "open_system", "decode_system", "add_cli"]

log = logging.getLogger(__name__)


class SystemDirError(ValueError):
    """The system directory is not something ``asr decode`` knows how to score."""


@dataclass(frozen=True)
class SetPaths:
    """Where one prepared set lives: ``name`` is its directory name under data/, feats/, ali/."""

    name: str
    manifest: Path
    feats_dir: Path
    ali_dir: Path | None

    @classmethod
    def from_exp(cls, exp_dir: str | os.PathLike, name: str, ali_root: str = "ali") -> "SetPaths":
        """``ali_root``: the folder of reference alignments under ``exp_dir`` (``ali_tri`` scores a
        triphone system against its own tied-state labels)."""
        exp = Path(exp_dir)
        ali = exp / ali_root / name
        return cls(name, exp / "data" / name / "manifest.jsonl", exp / "feats" / name,
                   ali if (ali / "labels.npy").is_file() else None)


@dataclass(frozen=True)
class System:
    """A decodable system: ``info`` is what goes into ``system.json``."""

    info: dict
    dir: Path

    @property
    def name(self) -> str:
        return str(self.info["name"])

    @property
    def kind(self) -> str:
        return str(self.info["kind"])


def _model_meta(model_path: Path) -> dict:
    from asr.models import load_model

    _, meta = load_model(model_path)
    return meta


def open_system(system_dir: str | os.PathLike, name: str | None = None) -> System:
    """Recognise a system directory and describe it (kind, name, parameter count, ...)."""
    d = Path(system_dir)
    if (d / "choice.json").is_file() and not (d / "model.pt").is_file():
        # A distillation folder: the student chosen on dev (choice.json) stands for it.
        d = d / read_json(d / "choice.json")["best_dir"]
    if (d / "final.mdl").is_file():
        from asr.gmm import GmmModel

        model = GmmModel.load(d / "final.mdl")
        params = int(model.num_gauss * (2 * model.dim + 1))
        info = {"name": name or ("gmm-tri" if model.tree is not None else "gmm-mono"), "kind": "gmm",
                "params": params, "num_gauss": int(model.num_gauss), "num_pdfs": int(model.num_pdfs),
                "context": "triphone" if model.tree is not None else "monophone"}
    elif (d / "model.pt").is_file():
        meta = _model_meta(d / "model.pt")
        if meta.get("kind") == "distilled" or "temperature" in meta:
            from asr.distill import temperature_name

            t = float(meta["temperature"])
            variant = d.parent.name                   # distill/ (the reported student), distill_paper/, ...
            prefix = "distilled" if variant == "distill" else f"distilled-{variant.removeprefix('distill_')}"
            info = {"name": name or f"{prefix}-{temperature_name(t)}", "kind": "distilled", "variant": variant,
                    "params": int(meta["params"]), "seed": int(meta["seed"]), "temperature": t,
                    "hard_weight": float(meta.get("hard_weight", float("nan")))}
        else:
            info = {"name": name or f"member-seed{int(meta['seed'])}", "kind": "member",
                    "params": int(meta["params"]), "seed": int(meta["seed"])}
        info["arch"] = meta.get("arch", {}).get("name") if isinstance(meta.get("arch"), dict) else None
        info["num_pdfs"] = int(meta["num_pdfs"]) if "num_pdfs" in meta else None
    elif (d / "members.json").is_file():
        members = read_json(d / "members.json")["members"]
        metas = [_model_meta(Path(m) / "model.pt") for m in members]
        params = sum(int(m["params"]) for m in metas)
        info = {"name": name or f"ensemble-{len(members)}", "kind": "ensemble", "params": params,
                "num_pdfs": int(metas[0]["num_pdfs"]) if metas and "num_pdfs" in metas[0] else None,
                "members": len(members), "member_dirs": members,
                "mode": read_json(d / "members.json").get("mode", "arithmetic")}
    else:
        raise SystemDirError(f"{d}: not a system directory (expected final.mdl, model.pt or members.json)")
    return System(info, d)


def _post_path(system: System, set_name: str) -> Path:
    base = system.dir if system.kind == "ensemble" else system.dir / "post"
    p = base / f"{set_name}.npy"
    if not p.is_file():
        raise SystemDirError(f"{system.name}: no posteriors for {set_name} ({p}); compute them first")
    return p


class _Scores:
    """Per-utterance decoder input and the whole-set posteriors used for frame accuracy."""

    def __init__(self, system: System, paths: SetPaths, log_prior: np.ndarray | None) -> None:
        self.store = FeatureStore(paths.feats_dir)
        self._pos = {u: i for i, u in enumerate(self.store.ids)}
        if system.kind == "gmm":
            from asr.gmm import GmmScorer

            if log_prior is None:
                raise SystemDirError("the GMM's frame accuracy needs the training priors (--priors)")
            scorer = GmmScorer(system.dir, paths.feats_dir)
            # GMM log-likelihoods are computed once per set and reused for tuning and decoding.
            self._loglikes = {u: scorer.loglikes(u) for u in self.store.ids}
            self.frame_scores = np.concatenate([self._loglikes[u] for u in self.store.ids]) + log_prior
        else:
            if log_prior is None:
                raise SystemDirError(f"{system.name}: hybrid decoding needs the training priors (--priors)")
            post = np.load(_post_path(system, paths.name), mmap_mode="r", allow_pickle=False)
            if post.shape[0] != self.store.num_frames_total:
                raise SystemDirError(f"{system.name}: {paths.name} posteriors have {post.shape[0]} frames, "
                                   f"feature dir {paths.feats_dir} has {self.store.num_frames_total}")
            self.frame_scores = post
            self._loglikes = None
            self._log_prior = log_prior

    def loglikes(self, utt: str) -> np.ndarray:
        if self._loglikes is not None:
            return self._loglikes[utt]
        k = self._pos[utt]
        off, n = int(self.store.offsets[k]), int(self.store.lengths[k])
        return hybrid_loglikes(self.frame_scores[off:off + n], self._log_prior)

    def items(self, ids: Sequence[str]) -> list[tuple[str, np.ndarray]]:
        return [(u, self.loglikes(u)) for u in ids]


def _refs(paths: SetPaths, store: FeatureStore) -> dict[str, str]:
    """Reference transcripts of the utterances that have features (all of them, unless skipped)."""
    texts = {u.id: u.text for u in read_manifest(paths.manifest)}
    missing = [u for u in store.ids if u not in texts]
    if missing:
        raise SystemDirError(f"{paths.feats_dir}: utterances not in {paths.manifest}: {missing[:3]}")
    return {u: texts[u] for u in store.ids}


PRIOR_KINDS = ("count", "posterior")


def posterior_prior_path(system: System) -> Path | None:
    """The system's own mean posterior over the training frames (``priors.npy``), if it has one."""
    if system.kind == "gmm":
        return None
    p = system.dir / "priors.npy"
    return p if p.is_file() else None


def system_log_prior(system: System, kind: str, count_log_prior: np.ndarray | None) -> np.ndarray | None:
    """Log-priors of ``kind``: ``count`` (the training alignment's label counts) or ``posterior``
    (the system's mean posterior over the training frames, Kaldi's nnet3-am-adjust-priors)."""
    if kind == "count":
        return count_log_prior
    p = posterior_prior_path(system)
    if p is None:
        raise SystemDirError(f"{system.name}: no posterior priors ({system.dir / 'priors.npy'}); "
                             f"retrain or decode with count priors")
    pri = np.load(p, allow_pickle=False).astype(np.float64)
    if count_log_prior is not None and pri.shape != count_log_prior.shape:
        raise SystemDirError(f"{p}: {pri.shape[0]} pdfs, the count priors have {count_log_prior.shape[0]}")
    return np.log(pri)


def _tune(system: System, tune_paths: SetPaths, cfg: DecodeConfig, grid: Sequence[float], graph_dir: Path,
          lang_dir: Path, count_log_prior: np.ndarray | None, nj: int) -> tuple[dict, dict]:
    """Tune acwt on the dev set for each prior kind the system has; the lower WER wins (ties: count)."""
    kinds = [k for k in PRIOR_KINDS if k == "count" or posterior_prior_path(system) is not None]
    tried, best_results = {}, {}
    for kind in kinds:
        scores = _Scores(system, tune_paths, system_log_prior(system, kind, count_log_prior))
        refs = _refs(tune_paths, scores.store)
        t = tune_acwt(graph_dir, lang_dir, scores.items(scores.store.ids), refs, None, acwts=grid, cfg=cfg,
                      nj=nj, widen=True)
        best_results[kind] = t.pop("best_results")
        tried[kind] = t
    kind = min(kinds, key=lambda k: (tried[k]["wer"], kinds.index(k)))
    t = dict(tried[kind], priors=kind, tuned_on=tune_paths.name,
             by_priors={k: {"acwt": v["acwt"], "wer": v["wer"]} for k, v in tried.items()})
    return t, best_results[kind]


def _choose_acwt(system: System, out_dir: Path, cfg: DecodeConfig, tune_paths: SetPaths | None,
                 acwt_from: Path | None, grid: Sequence[float], graph_dir: Path, lang_dir: Path,
                 log_prior: np.ndarray | None, nj: int) -> tuple[DecodeConfig, str, dict | None]:
    """The decoding config with the tuned (or copied) acwt, the prior kind, and the tune set's
    results at that point when tuning just ran (so the tune set need not be decoded again)."""
    tune_file = out_dir / "tune.json"
    best = None
    key = _tune_key(system, cfg, tune_paths, acwt_from, grid, graph_dir)
    old = read_json(tune_file) if tune_file.is_file() else None
    if old is not None and (key is None or old.get("inputs") == key):
        t = old                 # made from the same inputs (or no tuning asked for: reuse it)
    elif acwt_from is not None:
        src = read_json(acwt_from)
        kind = src.get("priors", "count")
        if kind == "posterior" and posterior_prior_path(system) is None:
            raise SystemDirError(f"{acwt_from} chose posterior priors, but {system.dir} has no priors.npy")
        t = {"acwt": src["acwt"], "word_ins_penalty": src.get("word_ins_penalty", 0.0),
             "lm_weight": 1.0 / src["acwt"], "priors": kind, "copied_from": str(acwt_from), "inputs": key}
        atomic_write_json(tune_file, t)
    elif tune_paths is not None:
        t, best = _tune(system, tune_paths, cfg, grid, graph_dir, lang_dir, log_prior, nj)
        t["inputs"] = key
        atomic_write_json(tune_file, t)
    else:
        return cfg, "count", None
    cfg = dataclasses.replace(cfg, acwt=float(t["acwt"]), word_ins_penalty=float(t.get("word_ins_penalty", 0.0)))
    return cfg, t.get("priors", "count"), best


def _file_stats(files: Sequence[Path | None]) -> list:
    """(path, size, mtime) of each file: cheap, and any rebuild of an input changes it."""
    out = []
    for f in files:
        if f is not None and Path(f).is_file():
            st = Path(f).stat()
            out.append((str(f), st.st_size, st.st_mtime_ns))
        else:
            out.append((str(f), None, None))
    return out


def _system_file(system: System, set_name: str) -> Path:
    return system.dir / "final.mdl" if system.kind == "gmm" else _post_path(system, set_name)


def _set_files(system: System, paths: SetPaths, graph_dir: Path, priors: Path | None) -> list[Path | None]:
    """Every file the results of one set are computed from."""
    return [_system_file(system, paths.name), graph_dir / "HCLG.fst", graph_dir / "words.txt", priors,
            paths.manifest, paths.feats_dir / "index.jsonl",
            paths.ali_dir / "labels.npy" if paths.ali_dir is not None else None]


def _set_fingerprint(system: System, paths: SetPaths, graph_dir: Path, priors: Path | None,
                     cfg: DecodeConfig) -> str:
    """What ``decode/<name>/<set>/`` was made from: when any of it changes (a retrained model, new
    posteriors of that set, another graph or config, another acwt), that set's result is stale.
    Other sets are not part of it, so decoding a new set never invalidates the others."""
    blob = json.dumps([system.info, paths.name, _file_stats(_set_files(system, paths, graph_dir, priors)),
                       config_to_dict(cfg)], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _tune_key(system: System, cfg: DecodeConfig, tune_paths: SetPaths | None, acwt_from: Path | None,
              grid: Sequence[float], graph_dir: Path) -> str | None:
    """What ``tune.json`` is made from (None: no tuning asked for, so any existing one is used)."""
    if acwt_from is not None:
        src = read_json(acwt_from)
        what: list = ["from", str(acwt_from), src.get("acwt"), src.get("word_ins_penalty", 0.0),
                      src.get("priors", "count")]
    elif tune_paths is not None:
        what = ["tune", system.info, tune_paths.name, list(grid), config_to_dict(cfg),
                _file_stats([_system_file(system, tune_paths.name), graph_dir / "HCLG.fst",
                             tune_paths.feats_dir / "index.jsonl", tune_paths.manifest,
                             posterior_prior_path(system)])]
    else:
        return None
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


_GRAPHS_READ: set[tuple] = set()


def _check_inputs(system: System, sets: Sequence[SetPaths], graph_dir: Path, acwt_from: Path | None) -> None:
    """Fail before anything is written: a readable graph, an acwt source, and for neural systems
    posteriors of every set with as many frames as its features."""
    import kaldifst

    from asr.decode import DecodeError

    hclg = graph_dir / "HCLG.fst"
    if not is_done(graph_dir) or not hclg.is_file():
        raise DecodeError(f"graph {graph_dir} is not complete (no .done or HCLG.fst): run make-graph")
    key = tuple(_file_stats([hclg])[0])
    if key not in _GRAPHS_READ:         # one read per graph and process, however many systems
        fst = kaldifst.StdVectorFst.read(str(hclg))
        if fst is None or fst.num_states == 0:
            raise DecodeError(f"{hclg}: unreadable or empty graph (truncated or corrupt?); rebuild it with make-graph")
        del fst
        _GRAPHS_READ.add(key)
    if acwt_from is not None and not acwt_from.is_file():
        raise FileNotFoundError(f"{acwt_from}: no such tune.json (--acwt-from)")
    if system.kind == "gmm":
        return
    for paths in sets:
        post = np.load(_post_path(system, paths.name), mmap_mode="r", allow_pickle=False)
        frames = FeatureStore(paths.feats_dir).num_frames_total
        if post.ndim != 2 or post.shape[0] != frames:
            raise SystemDirError(f"{system.name}: {_post_path(system, paths.name)} has shape {post.shape}, "
                                 f"but {paths.feats_dir} has {frames} frames; recompute the posteriors")


def _replace_dir(new: Path, final: Path) -> None:
    """Rename a complete result folder onto ``final``; the previous one goes only after that."""
    stale = final.with_name(f".{final.name}.stale")
    if stale.exists():
        shutil.rmtree(stale)
    if final.exists():
        os.replace(final, stale)
    os.replace(new, final)
    if stale.exists():
        shutil.rmtree(stale)


def decode_system(system_dir: str | os.PathLike, sets: Sequence[SetPaths], graph_dir: str | os.PathLike,
                  lang_dir: str | os.PathLike, out_root: str | os.PathLike, cfg: DecodeConfig = DecodeConfig(),
                  priors: str | os.PathLike | None = None, tune_set: SetPaths | None = None,
                  acwt_from: str | os.PathLike | None = None,
                  acwt_grid: Sequence[float] = (0.05, 0.08, 0.12, 0.18, 0.25),
                  name: str | None = None, nj: int = 1) -> dict[str, dict]:
    """Decode ``sets`` with one system and score them; returns ``{set: wer.json summary}``."""
    system = open_system(system_dir, name)
    graph_dir, lang_dir = Path(graph_dir), Path(lang_dir)
    out_dir = Path(out_root) / system.name
    acwt_from = Path(acwt_from) if acwt_from else None
    _check_inputs(system, list(sets) + ([tune_set] if tune_set else []), graph_dir, acwt_from)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "inputs.sha1").unlink(missing_ok=True)      # the old whole-system fingerprint
    log_prior = None
    if priors is not None:
        log_prior = np.log(np.load(priors, allow_pickle=False).astype(np.float64))
    cfg, prior_kind, tuned = _choose_acwt(system, out_dir, cfg, tune_set, acwt_from,
                                          acwt_grid, graph_dir, lang_dir, log_prior, nj)
    if system.kind != "gmm":
        log_prior = system_log_prior(system, prior_kind, log_prior)
    info = dict(system.info, acwt=cfg.acwt, word_ins_penalty=cfg.word_ins_penalty, priors=prior_kind)
    atomic_write_json(out_dir / "system.json", info)
    results = {}
    for paths in sets:
        set_dir = out_dir / paths.name
        used_priors = posterior_prior_path(system) if prior_kind == "posterior" else (Path(priors) if priors else None)
        fingerprint = _set_fingerprint(system, paths, graph_dir, used_priors, cfg)
        stamp = set_dir / "inputs.sha1"
        if is_done(set_dir) and (set_dir / "wer.json").is_file() and stamp.is_file() \
                and stamp.read_text().strip() == fingerprint:
            log.info("%s/%s already scored; skipping", system.name, paths.name)
            results[paths.name] = read_json(set_dir / "wer.json")
            continue
        if set_dir.exists():
            log.info("%s/%s: inputs changed since it was scored (or it is incomplete); decoding it again "
                     "beside the old result", system.name, paths.name)
        new_dir = out_dir / f".{paths.name}.new"
        if new_dir.exists():
            shutil.rmtree(new_dir)          # left by a killed run: decoded again from the start
        scores = _Scores(system, paths, log_prior)
        refs = _refs(paths, scores.store)
        if tuned is not None and tune_set is not None and paths.name == tune_set.name:
            res = tuned                 # tuning already decoded this set at the chosen acwt
        else:
            res = decode_many(graph_dir, lang_dir, scores.loglikes, cfg, nj=nj, utt_ids=scores.store.ids)
        labels = None
        if paths.ali_dir is not None:
            ref = LabelStore(paths.ali_dir)
            if ref.num_pdfs != scores.frame_scores.shape[1]:
                raise SystemDirError(f"{system.name} scores {scores.frame_scores.shape[1]} pdfs, the reference "
                                     f"alignment {paths.ali_dir} has {ref.num_pdfs} (use --ali-root of its labels)")
            labels = ref.labels
        results[paths.name] = score_decode(
            new_dir, refs, {u: r.text for u, r in res.items()},
            log_post=scores.frame_scores if labels is not None else None, labels=labels,
            partial=[u for u, r in res.items() if not r.reached_final],
            extra={"system": system.name, "set": paths.name, "acwt": cfg.acwt, "priors": prior_kind,
                   "word_ins_penalty": cfg.word_ins_penalty, "decode_config": config_to_dict(cfg)})
        atomic_write_text(new_dir / "inputs.sha1", fingerprint + "\n")
        _replace_dir(new_dir, set_dir)
    return results


def _set_paths(exp_dir: str, names: Sequence[str], ali_root: str = "ali") -> list[SetPaths]:
    return [SetPaths.from_exp(exp_dir, n, ali_root) for n in names]


def _cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(DecodeConfig, args)
    sets = _set_paths(args.exp_dir, args.sets, args.ali_root)
    tune = SetPaths.from_exp(args.exp_dir, args.tune_set, args.ali_root) if args.tune_set else None
    grid = [float(x) for x in re.split(r"[, ]+", args.acwt_grid.strip()) if x]
    exp = Path(args.exp_dir)
    priors = args.priors or (exp / args.ali_root / args.train_set / "priors.npy")
    for system_dir in args.system:
        decode_system(system_dir, sets, args.graph_dir or exp / "graph", args.lang_dir or exp / "lang",
                      args.out_root or exp / "decode", cfg, priors=priors, tune_set=tune,
                      acwt_from=args.acwt_from, acwt_grid=grid,
                      name=args.name if len(args.system) == 1 else None, nj=args.nj)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "decode", help="decode and score prepared sets with a trained system (GMM, member, ensemble, student)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--exp-dir", required=True, help="experiment dir, e.g. exp/mini (holds data/ feats/ ali/)")
    p.add_argument("--system", nargs="+", required=True,
                   help="system dir(s): gmm_mono/, members/seed3/, ensemble/post_10/, distill/T2/")
    p.add_argument("--sets", nargs="+", required=True, help="set names, e.g. dev-clean test-clean test-other")
    p.add_argument("--train-set", default="train-clean-100", help="set whose alignment gave the priors")
    p.add_argument("--priors", default=None, help="priors.npy (default: <exp>/<ali-root>/<train-set>/priors.npy)")
    p.add_argument("--ali-root", default="ali",
                   help="reference alignments (frame accuracy, priors) under <exp>: ali, or ali_tri for gmm-tri")
    p.add_argument("--tune-set", default=None, help="dev set on which acwt is tuned (never a test set)")
    p.add_argument("--acwt-from", default=None, help="reuse the acwt of this tune.json instead of tuning")
    p.add_argument("--acwt-grid", default="0.05,0.08,0.12,0.18,0.25", help="acwt values tried on the tune set")
    p.add_argument("--graph-dir", default=None, help="default: <exp>/graph")
    p.add_argument("--lang-dir", default=None, help="default: <exp>/lang")
    p.add_argument("--out-root", default=None, help="default: <exp>/decode")
    p.add_argument("--name", default=None, help="system name (default from the system: member-seed3, ...)")
    p.add_argument("--nj", type=int, default=1, help="decoding processes")
    add_config_args(p)
    p.set_defaults(func=_cli)
