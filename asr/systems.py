"""Decode and score any trained system on any prepared set: the ``asr decode`` command.

A *system* is whatever turns frames into pdf scores: the monophone GMM (its own log-likelihoods),
a member or a distilled student (a ``model.pt`` beside ``post/<set>.npy``), or an ensemble
(``ensemble/post_<k>/`` with ``members.json``). Neural systems are decoded in hybrid fashion,
``acwt * (log p(s|x) - log p(s))``, with the priors counted from the training alignment. The
acoustic scale is tuned on a dev set only (``--tune-set``) or copied from another system's
``tune.json`` (``--acwt-from``), never chosen on test data.

Outputs, per system: ``decode/<name>/system.json`` (what the report needs: name, kind, params,
seed / members / temperature / hard_weight), ``decode/<name>/tune.json``, and one scored folder
per set (``asr.scoring.score_decode``: hyp.txt, per_utt, wer.json, frame_acc.json, .done). A set
whose folder is done is skipped, so a killed decode resumes.
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
from asr.io import atomic_write_json, is_done, read_json
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
            info = {"name": name or f"distilled-{temperature_name(t)}", "kind": "distilled",
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


def _choose_acwt(system: System, out_dir: Path, cfg: DecodeConfig, tune_paths: SetPaths | None,
                 acwt_from: Path | None, grid: Sequence[float], graph_dir: Path, lang_dir: Path,
                 log_prior: np.ndarray | None, nj: int) -> tuple[DecodeConfig, dict | None]:
    """The decoding config with the tuned (or copied) acwt, and the tune set's results at that
    acwt when tuning just ran (so the tune set need not be decoded again)."""
    tune_file = out_dir / "tune.json"
    best = None
    if tune_file.is_file():
        t = read_json(tune_file)
    elif acwt_from is not None:
        src = read_json(acwt_from)
        t = {"acwt": src["acwt"], "word_ins_penalty": src.get("word_ins_penalty", 0.0),
             "lm_weight": 1.0 / src["acwt"], "copied_from": str(acwt_from)}
        atomic_write_json(tune_file, t)
    elif tune_paths is not None:
        scores = _Scores(system, tune_paths, log_prior)
        refs = _refs(tune_paths, scores.store)
        t = tune_acwt(graph_dir, lang_dir, scores.items(scores.store.ids), refs, tune_file,
                      acwts=grid, cfg=cfg, nj=nj)
        best = t.pop("best_results")
        t["tuned_on"] = tune_paths.name
        atomic_write_json(tune_file, t)
    else:
        return cfg, None
    cfg = dataclasses.replace(cfg, acwt=float(t["acwt"]), word_ins_penalty=float(t.get("word_ins_penalty", 0.0)))
    return cfg, best


def _input_files(system: System, sets: Sequence[SetPaths]) -> list[Path]:
    if system.kind == "gmm":
        return [system.dir / "final.mdl"]
    return [_post_path(system, p.name) for p in sets]


def _fingerprint(system: System, sets: Sequence[SetPaths], graph_dir: Path, cfg: DecodeConfig,
                 tune_set: SetPaths | None, acwt_from: Path | None, grid: Sequence[float]) -> str:
    """What the results of ``decode/<name>/`` were made from: when any of it changes (a retrained
    model, new posteriors, another graph, another acwt source), earlier results are stale."""
    files = _input_files(system, sets) + [graph_dir / "HCLG.fst"] + ([acwt_from] if acwt_from else [])
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    blob = json.dumps([system.info, stats, config_to_dict(cfg), tune_set.name if tune_set else None,
                       list(grid), [p.name for p in sets]], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _clear_if_stale(out_dir: Path, fingerprint: str) -> None:
    stamp = out_dir / "inputs.sha1"
    if stamp.is_file() and stamp.read_text().strip() != fingerprint:
        log.info("%s: inputs changed since it was scored; decoding again", out_dir)
        for p in out_dir.iterdir():
            if p.name != "log":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")


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
    _clear_if_stale(out_dir, _fingerprint(system, sets, graph_dir, cfg, tune_set, acwt_from, acwt_grid))
    log_prior = None
    if priors is not None:
        log_prior = np.log(np.load(priors, allow_pickle=False).astype(np.float64))
    cfg, tuned = _choose_acwt(system, out_dir, cfg, tune_set, acwt_from,
                              acwt_grid, graph_dir, lang_dir, log_prior, nj)
    info = dict(system.info, acwt=cfg.acwt, word_ins_penalty=cfg.word_ins_penalty)
    atomic_write_json(out_dir / "system.json", info)
    results = {}
    for paths in sets:
        set_dir = out_dir / paths.name
        if is_done(set_dir):
            log.info("%s/%s already scored; skipping", system.name, paths.name)
            results[paths.name] = read_json(set_dir / "wer.json")
            continue
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
            set_dir, refs, {u: r.text for u, r in res.items()},
            log_post=scores.frame_scores if labels is not None else None, labels=labels,
            partial=[u for u, r in res.items() if not r.reached_final],
            extra={"system": system.name, "set": paths.name, "acwt": cfg.acwt,
                   "word_ins_penalty": cfg.word_ins_penalty, "decode_config": config_to_dict(cfg)})
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
