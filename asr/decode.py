"""Decoding: per-utterance (frames x pdfs) log-likelihoods -> words, on an HCLG graph.

One interface serves every acoustic model: the GMM gives its own log-likelihoods; a neural model's
log posteriors become pseudo log-likelihoods ``log p(s|x) - log p(s)`` (:func:`hybrid_loglikes`).
The decoder scales them by ``acwt`` (the LM weight is 1 / acwt) and searches HCLG with Kaldi's
FasterDecoder (1-best, default) or LatticeFasterDecoder, through ``DecodableCtc``: that decodable
reads column ``i - 1`` for transition id ``i``, so the pdf columns are mapped to transition ids with
the transition model once per utterance.

Outcomes worth knowing:

- An utterance whose search reaches no final state (too short for any word sequence, or pruned
  away) gets the best *partial* path; a warning is logged and ``DecodeResult.reached_final`` is
  False; :func:`asr.scoring.score_decode` lists such utterances in ``partial.txt``. If not even a
  partial path exists the hypothesis is empty (``cost`` is inf).
- A word missing from the lexicon cannot be produced (it is not in HCLG); scoring counts it as an
  error against the reference.

acwt (and optionally a word insertion penalty) are tuned on dev only with :func:`tune_acwt`,
which writes the grid and the chosen values to ``tune.json``.

Decoding parallelises over utterances with a process pool whose workers load the graph once.

The ``asr decode`` command (:func:`decode_system`) decodes and scores any trained system
(``asr.systems``) on any prepared set. The acoustic scale is tuned on a dev set only
(``--tune-set``) or copied from another system's ``tune.json`` (``--acwt-from``), never chosen on
test data. Outputs, per system: ``decode/<name>/system.json`` (what the report needs: name, kind,
params, seed / members / temperature / hard_weight), ``decode/<name>/tune.json``, and one scored
folder per set (``asr.scoring.score_decode``: hyp.txt, per_utt, wer.json, frame_acc.json, .done)
with ``inputs.sha1``, the fingerprint of what that set's result depends on (its posteriors or the
GMM, HCLG, priors, features, manifest, alignment, the decoding config with the chosen acwt). A set
whose folder is done with the same fingerprint is skipped, so a killed decode resumes; decoding
another set adds to a system's results and never removes the others. A stale set is decoded into
a folder beside it and renamed into place only when complete; every input is validated before
anything is written. ``tune.json`` records what it was made from and is reused only when that
matches.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

import kaldi_hmm_gmm as khg  # noqa: I001  (must be imported before kaldifst)
import kaldifst

from asr.config import add_config_args, config_from_args, config_to_dict
from asr.io import atomic_write_json, atomic_write_text, is_done, read_json
from asr.features import FeatureStore
from asr.labels import LabelStore
from asr.manifest import read_manifest
from asr.scoring import score_decode
from asr.systems import (PRIOR_KINDS, SetPaths, System, SystemDirError, _post_path, open_system,
                         posterior_prior_path, system_log_prior)

__all__ = [
    "DecodeConfig",
    "DecodeError",
    "DecodeResult",
    "Decoder",
    "hybrid_loglikes",
    "decode_many",
    "tune_acwt",
    "decode_system",
    "add_cli",
]

log = logging.getLogger(__name__)


class DecodeError(ValueError):
    """Bad decoder input (missing graph, wrong matrix shape, NaN); the message names it."""


@dataclass(frozen=True)
class DecodeConfig:
    """Search settings. Scores are ``acwt * loglikes`` plus graph costs (LM weight 1)."""

    acwt: float = 0.1                  # acoustic scale (1 / LM weight); tune on dev
    beam: float = 10.0                 # search beam (scaled cost units); 10/1000: RTF ~0.02 (benchmarks/)
    max_active: int = 1000             # maximum active states per frame
    min_active: int = 20               # minimum active states per frame
    word_ins_penalty: float = 0.0      # cost added per output word (>0 discourages insertions)
    lattice: bool = False              # LatticeFasterDecoder instead of FasterDecoder (slower)
    lattice_beam: float = 6.0          # lattice beam (lattice decoder only)
    allow_partial: bool = True         # no final state reached: output the best partial path

    def __post_init__(self) -> None:
        if self.acwt <= 0:
            raise ValueError(f"DecodeConfig.acwt must be > 0, got {self.acwt}")
        if self.beam <= 0 or self.max_active < 1 or self.min_active < 0:
            raise ValueError("DecodeConfig: beam must be > 0, max_active >= 1, min_active >= 0")


@dataclass(frozen=True)
class DecodeResult:
    """The 1-best of one utterance.

    ``cost`` is the total scaled path cost reported by the decoder (graph cost + acoustic cost),
    inf when no path exists; ``reached_final`` is False for a partial (best non-final) path.
    """

    words: tuple[str, ...]
    reached_final: bool
    cost: float
    num_frames: int = 0

    @property
    def text(self) -> str:
        return " ".join(self.words)


def hybrid_loglikes(log_post: np.ndarray, log_prior: np.ndarray, acwt: float = 1.0) -> np.ndarray:
    """Hybrid pseudo log-likelihoods ``acwt * (log p(s|x) - log p(s))``.

    log_post: ``(frames, pdfs)`` natural-log posteriors; log_prior: ``(pdfs,)`` natural-log priors
    (counted from the training labels and floored). Returns float32 ``(frames, pdfs)``. Leave
    ``acwt`` at 1 when the :class:`Decoder` applies ``DecodeConfig.acwt`` (the usual way).
    """
    log_post = np.asarray(log_post)
    log_prior = np.asarray(log_prior, dtype=np.float64)
    if log_post.ndim != 2:
        raise DecodeError(f"log_post must be (frames, pdfs), got shape {log_post.shape}")
    if log_prior.shape != (log_post.shape[1],):
        raise DecodeError(f"log_prior shape {log_prior.shape} does not match {log_post.shape[1]} pdfs")
    if not np.all(np.isfinite(log_prior)):
        raise DecodeError("log_prior has non-finite values: floor the priors before taking logs")
    return (acwt * (log_post.astype(np.float64) - log_prior)).astype(np.float32)


def _read_words(path: Path) -> list[str]:
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) == 2:
                pairs.append((int(fields[1]), fields[0]))
    out = [""] * (max(i for i, _ in pairs) + 1)
    for i, w in pairs:
        out[i] = w
    return out


def _add_word_penalty(fst: kaldifst.StdVectorFst, penalty: float) -> kaldifst.StdVectorFst:
    """A copy of ``fst`` with ``penalty`` added to every arc that outputs a word."""
    out = []
    for line in fst.to_str(show_weight_one=True).split("\n"):
        c = line.split()
        if len(c) >= 4 and c[3] != "0":
            w = float(c[4]) if len(c) >= 5 else 0.0
            c = c[:4] + [repr(w + penalty)]
        if c:
            out.append("\t".join(c))
    return kaldifst.compile("\n".join(out) + "\n")


class Decoder:
    """Loads HCLG and the transition-id -> pdf map once; decodes utterance after utterance."""

    def __init__(self, graph_dir: str | os.PathLike, lang_dir: str | os.PathLike,
                 cfg: DecodeConfig = DecodeConfig()) -> None:
        from asr.lang import load_lang

        self.graph_dir = Path(graph_dir)
        self.cfg = cfg
        hclg = self.graph_dir / "HCLG.fst"
        if not is_done(self.graph_dir) or not hclg.is_file():
            raise DecodeError(f"graph {self.graph_dir} is not complete (run make-graph)")
        lang = load_lang(lang_dir)
        info_path = self.graph_dir / "info.json"
        self.info = read_json(info_path) if info_path.is_file() else {}
        tid_map = self.graph_dir / "tid2pdf.npy"
        if tid_map.is_file():            # the graph's own tree (triphone graphs); older graphs: the lang's
            tid2pdf = np.load(tid_map, allow_pickle=False)
            self.num_pdfs = int(self.info.get("num_pdfs", int(tid2pdf.max()) + 1))
        else:
            tid2pdf = lang.tid2pdf
            self.num_pdfs = lang.num_pdfs
        self._tid2pdf = np.asarray(tid2pdf[1:], dtype=np.int64)   # column i-1 <- tid i
        self.words = _read_words(self.graph_dir / "words.txt")
        if self.words[: len(lang.words)] != lang.words:
            raise DecodeError(f"{self.graph_dir / 'words.txt'} differs from {lang.dir / 'words.txt'}: "
                              "the graph was built with another lang directory")
        self.fst = kaldifst.StdVectorFst.read(str(hclg))
        if self.fst is None or self.fst.num_states == 0:
            raise DecodeError(f"{hclg} is empty or unreadable")
        if cfg.word_ins_penalty:
            self.fst = _add_word_penalty(self.fst, cfg.word_ins_penalty)
        if cfg.lattice:
            if self.info.get("model"):
                from asr.gmm_model import load_model

                self._trans_model = load_model(self.info["model"])[1]
            else:
                self._trans_model = lang.transition_model()
            opts = khg.LatticeFasterDecoderConfig(beam=cfg.beam, max_active=cfg.max_active,
                                                  min_active=max(cfg.min_active, 1),
                                                  lattice_beam=cfg.lattice_beam)
            self._decoder = khg.LatticeFasterDecoder(self.fst, opts)
        else:
            opts = khg.FasterDecoderOptions(beam=cfg.beam, max_active=cfg.max_active,
                                            min_active=cfg.min_active)
            self._decoder = khg.FasterDecoder(self.fst, opts)

    def _tid_matrix(self, loglikes: np.ndarray, acwt: float, utt: str) -> np.ndarray:
        if loglikes.ndim != 2 or loglikes.shape[1] != self.num_pdfs:
            raise DecodeError(f"{utt}: log-likelihoods must be (frames, {self.num_pdfs} pdfs), "
                              f"got shape {loglikes.shape}")
        scaled = np.asarray(loglikes, dtype=np.float32) * np.float32(acwt)
        if not np.all(np.isfinite(scaled)):
            raise DecodeError(f"{utt}: log-likelihoods contain NaN or inf")
        return np.ascontiguousarray(scaled[:, self._tid2pdf])

    def decode(self, loglikes: np.ndarray, utt: str = "<utt>", acwt: float | None = None) -> DecodeResult:
        """Decode one utterance. loglikes: ``(frames, pdfs)`` unscaled log-likelihoods."""
        acwt = self.cfg.acwt if acwt is None else acwt
        mat = self._tid_matrix(np.asarray(loglikes), acwt, utt)
        frames = mat.shape[0]
        if frames == 0:
            log.warning("%s: no frames; empty hypothesis", utt)
            return DecodeResult((), False, math.inf, 0)
        decodable = khg.DecodableCtc(mat)
        if self.cfg.lattice:
            return self._decode_lattice(decodable, utt, frames)
        dec = self._decoder
        dec.decode(decodable)
        reached = bool(dec.reached_final())
        if reached:
            ok, lat = dec.get_best_path(use_final_probs=True)
        elif self.cfg.allow_partial:
            ok, lat = dec.get_best_path(use_final_probs=False)
        else:
            ok, lat = False, None
        if not ok:
            log.warning("%s: search produced no path (%d frames); empty hypothesis", utt, frames)
            return DecodeResult((), False, math.inf, frames)
        ok, _, word_ids, weight = kaldifst.get_linear_symbol_sequence(lat)
        if not ok:
            raise DecodeError(f"{utt}: best path is not linear (decoder error)")
        words = tuple(self.words[w] for w in word_ids)
        cost = float(weight.value1 + weight.value2)
        if not reached:
            log.warning("%s: no final state reached after %d frames; using the best partial path (%d words)",
                        utt, frames, len(words))
        return DecodeResult(words, reached, cost, frames)

    def _decode_lattice(self, decodable, utt: str, frames: int) -> DecodeResult:
        ok, _, word_ids, like = khg.decode_utterance_lattice_faster(
            self._decoder, decodable, self._trans_model, utt, False)
        reached = bool(ok)
        if not ok and self.cfg.allow_partial:
            ok, _, word_ids, like = khg.decode_utterance_lattice_faster(
                self._decoder, decodable, self._trans_model, utt, True)
        if not ok:
            log.warning("%s: search produced no path (%d frames); empty hypothesis", utt, frames)
            return DecodeResult((), False, math.inf, frames)
        if not reached:
            log.warning("%s: no final state reached after %d frames; using the best partial path", utt, frames)
        return DecodeResult(tuple(self.words[w] for w in word_ids), reached, float(-like), frames)


# --------------------------------------------------------------------------------------------
# Many utterances, in parallel

_WORKER: dict = {}


def _worker_init(graph_dir: str, lang_dir: str, cfg_dict: dict) -> None:
    _WORKER.clear()
    _WORKER.update(graph_dir=graph_dir, lang_dir=lang_dir, cfg=DecodeConfig(**cfg_dict), decoders={})


def _worker_decoder(wip: float) -> Decoder:
    decs = _WORKER["decoders"]
    if wip not in decs:
        cfg = dataclasses.replace(_WORKER["cfg"], word_ins_penalty=wip)
        decs[wip] = Decoder(_WORKER["graph_dir"], _WORKER["lang_dir"], cfg)
    return decs[wip]


def _worker_decode(task: tuple) -> tuple:
    key, utt, loglikes, acwt, wip = task
    t0 = time.process_time()
    res = _worker_decoder(wip).decode(loglikes, utt, acwt=acwt)
    return key, utt, res, time.process_time() - t0


Items = Iterable[tuple[str, np.ndarray]]


def _iter_items(items: Items | Callable[[str], np.ndarray], utt_ids: Sequence[str] | None) -> Iterator[tuple[str, np.ndarray]]:
    if callable(items):
        if utt_ids is None:
            raise DecodeError("decode_many: utt_ids are required when items is a callable")
        for u in utt_ids:
            yield u, items(u)
    else:
        yield from items


# Worker pools outlive one call: tuning, every set and every system decoded by one process share
# them, so each worker loads HCLG once (loading a graph costs more than decoding a small set).
_POOLS: dict[tuple, ProcessPoolExecutor] = {}


def _pool_key(graph_dir: Path, lang_dir: Path, cfg: DecodeConfig, nj: int) -> tuple:
    d = config_to_dict(cfg)
    d.pop("acwt")                      # acwt travels with each task
    return (str(graph_dir), str(lang_dir), tuple(sorted(d.items())), nj)


def _shared_pool(graph_dir: Path, lang_dir: Path, cfg: DecodeConfig, nj: int) -> ProcessPoolExecutor:
    key = _pool_key(graph_dir, lang_dir, cfg, nj)
    if key not in _POOLS:
        _POOLS[key] = ProcessPoolExecutor(nj, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                          initargs=(str(graph_dir), str(lang_dir), config_to_dict(cfg)))
    return _POOLS[key]


@atexit.register
def shutdown_pools() -> None:
    """Stop the shared decoding workers (also run at interpreter exit)."""
    while _POOLS:
        _POOLS.popitem()[1].shutdown(cancel_futures=True)


def _run_tasks(graph_dir: Path, lang_dir: Path, cfg: DecodeConfig, tasks: Iterable[tuple], nj: int,
               total: int | None, desc: str) -> Iterator[tuple]:
    """Yield ``(key, utt, DecodeResult, cpu_seconds)`` for each task, in order.

    With ``nj > 1`` a spawn pool decodes; at most ``2 * nj`` tasks are in flight, so a large set's
    log-likelihoods are never all in memory at once.
    """
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="utt", disable=None, leave=False)
    try:
        if nj <= 1:
            state = (str(graph_dir), str(lang_dir), config_to_dict(cfg))
            if _WORKER.get("state") != state:
                _worker_init(*state)
                _WORKER["state"] = state
            for t in tasks:
                yield _worker_decode(t)
                bar.update(1)
            return
        pool = _shared_pool(graph_dir, lang_dir, cfg, nj)
        pending: deque = deque()
        try:
            for t in tasks:
                pending.append(pool.submit(_worker_decode, t))
                while len(pending) >= 2 * nj:
                    yield pending.popleft().result()
                    bar.update(1)
            while pending:
                yield pending.popleft().result()
                bar.update(1)
        except BrokenProcessPool as e:
            _POOLS.pop(_pool_key(graph_dir, lang_dir, cfg, nj), None)
            raise DecodeError(f"a decoding worker died (graph {graph_dir}); run with nj=1 to see "
                              f"the error: {e}") from None
        finally:
            for f in pending:
                f.cancel()
    finally:
        bar.close()


def _report_partial(results: Mapping[str, DecodeResult], what: str) -> None:
    partial = sorted(u for u, r in results.items() if not r.reached_final)
    if partial:
        log.warning("%s: %d of %d utterance(s) reached no final state (partial hypotheses): %s%s", what,
                    len(partial), len(results), " ".join(partial[:5]), " ..." if len(partial) > 5 else "")


def decode_many(
    graph_dir: str | os.PathLike,
    lang_dir: str | os.PathLike,
    items: Items | Callable[[str], np.ndarray],
    cfg: DecodeConfig = DecodeConfig(),
    nj: int = 1,
    utt_ids: Sequence[str] | None = None,
) -> dict[str, DecodeResult]:
    """Decode many utterances; ``{utt: DecodeResult}`` in input order.

    ``items``: ``(utt, loglikes (frames, pdfs))`` pairs, or a callable ``utt -> loglikes`` together
    with ``utt_ids``. ``nj``: worker processes (each loads the graph once; 1 = in this process).
    The cost in CPU seconds is logged as a real-time factor (10 ms frames).
    """
    graph_dir, lang_dir = Path(graph_dir), Path(lang_dir)
    tasks = ((i, u, ll, cfg.acwt, cfg.word_ins_penalty) for i, (u, ll) in enumerate(_iter_items(items, utt_ids)))
    total = len(utt_ids) if utt_ids is not None else (len(items) if hasattr(items, "__len__") else None)
    out: dict[str, DecodeResult] = {}
    cpu = 0.0
    frames = 0
    for _, utt, res, secs in _run_tasks(graph_dir, lang_dir, cfg, tasks, nj, total, "decode"):
        if utt in out:
            raise DecodeError(f"decode_many: duplicate utterance id {utt}")
        out[utt] = res
        cpu += secs
        frames += res.num_frames
    if frames:
        log.info("decoded %d utterances, %d frames: %.3f CPU s per audio s", len(out), frames, cpu / (frames / 100.0))
    _report_partial(out, str(graph_dir))
    return out


def _tune_data(items: Items, refs: Mapping[str, str]) -> tuple[list, dict[str, str]]:
    """The dev set's ``(utt, loglikes)``, materialised once for every grid point, and its references;
    an empty set or an utterance without a reference is an error."""
    data = list(items)
    if not data:
        raise DecodeError("tune_acwt: no utterances to tune on")
    ids = [u for u, _ in data]
    missing = [u for u in ids if u not in refs]
    if missing:
        raise DecodeError(f"tune_acwt: no reference for {len(missing)} utterance(s), e.g. {missing[:3]}")
    return data, {u: refs[u] for u in ids}


class _GridSearch:
    """Decodes the dev set at grid points ``(acwt, word_ins_penalty)`` and scores each: ``rows`` (one
    per point, in the order tried) and ``hyps`` (the decoded results of each point)."""

    def __init__(self, graph_dir: Path, lang_dir: Path, data: list, refs: dict[str, str], cfg: DecodeConfig,
                 nj: int) -> None:
        self.graph_dir, self.lang_dir, self.cfg, self.nj = graph_dir, lang_dir, cfg, nj
        self.data, self.refs = data, refs
        self.grid: list[tuple[float, float]] = []
        self.hyps: dict[int, dict[str, DecodeResult]] = {}
        self.rows: list[dict] = []

    def run(self, points: list[tuple[float, float]]) -> None:
        """Decode every utterance at every point (one pool for all of them), then score each point."""
        from asr.scoring import compute_wer

        first = len(self.grid)
        self.grid.extend(points)
        tasks = ((first + g, u, ll, a, w) for g, (a, w) in enumerate(points) for u, ll in self.data)
        for g in range(first, len(self.grid)):
            self.hyps[g] = {}
        for g, utt, res, _ in _run_tasks(self.graph_dir, self.lang_dir, self.cfg, tasks, self.nj,
                                         len(points) * len(self.data), "tune"):
            self.hyps[g][utt] = res
        for g in range(first, len(self.grid)):
            a, w = self.grid[g]
            r = compute_wer(self.refs, {u: res.text for u, res in self.hyps[g].items()})
            self.rows.append({"acwt": a, "word_ins_penalty": w, "wer": r["wer"], "errors": r["errors"],
                              "ins": r["ins"], "del": r["del"], "sub": r["sub"], "ref_words": r["ref_words"],
                              "partial": sum(not res.reached_final for res in self.hyps[g].values())})
            log.info("acwt %.4g wip %.3g: %%WER %.2f", a, w, r["wer"])

    def best_row(self) -> dict:
        """Lowest WER; ties go to the smaller acwt, then the smaller penalty."""
        return min(self.rows, key=lambda r: (r["wer"], r["acwt"], r["word_ins_penalty"]))

    def edge_point(self) -> float | None:
        """The acwt one step beyond the grid's edge when the best acwt sits there and is strictly better
        than its neighbour (the optimum may lie beyond it); None otherwise."""
        b = self.best_row()
        wer_at = {r["acwt"]: r["wer"] for r in self.rows if r["word_ins_penalty"] == b["word_ins_penalty"]}
        xs = sorted(wer_at)
        low = b["acwt"] == xs[0] and wer_at[xs[0]] < wer_at[xs[1]]
        high = b["acwt"] == xs[-1] and wer_at[xs[-1]] < wer_at[xs[-2]]
        if not (low or high):
            return None
        a = xs[0] * xs[0] / xs[1] if low else xs[-1] * xs[-1] / xs[-2]
        log.info("best acwt %.4g is at the grid's %s edge: trying %.4g", b["acwt"], "lower" if low else "upper", a)
        return a


def tune_acwt(
    graph_dir: str | os.PathLike,
    lang_dir: str | os.PathLike,
    items: Items,
    refs: Mapping[str, str],
    out_path: str | os.PathLike | None,
    acwts: Sequence[float] = (0.05, 0.075, 0.1, 0.15, 0.2),
    word_ins_penalties: Sequence[float] = (0.0,),
    cfg: DecodeConfig = DecodeConfig(),
    nj: int = 1,
    widen: bool = False,
    max_widen: int = 4,
) -> dict:
    """Grid search of acwt (and word insertion penalty) on a *dev* set; writes ``tune.json``.

    ``items``: the dev set's ``(utt, loglikes)`` (materialised once, decoded for every grid point).
    Ties go to the smaller acwt, then the smaller penalty. Returns ``{acwt, word_ins_penalty, wer,
    grid: [{acwt, word_ins_penalty, wer, errors, ref_words, partial}], ...}``; the same is written to
    ``out_path`` (unless None), and the returned dict also holds ``best_results`` (``{utt:
    DecodeResult}`` at the chosen point). ``widen``: while the best acwt sits at an edge of the
    grid, one more point beyond that edge is tried (the grid's outer ratio; at most ``max_widen``
    times), so a grid that was too narrow cannot hide the optimum. Never pass test data here.
    """
    data, sub_refs = _tune_data(items, refs)
    t0 = time.time()
    search = _GridSearch(Path(graph_dir), Path(lang_dir), data, sub_refs, cfg, nj)
    search.run([(a, w) for w in word_ins_penalties for a in acwts])
    for _ in range(max_widen if widen and len(acwts) > 1 else 0):
        a = search.edge_point()
        if a is None:
            break
        search.run([(round(a, 6), search.best_row()["word_ins_penalty"])])
    best = search.best_row()
    result = {"acwt": best["acwt"], "word_ins_penalty": best["word_ins_penalty"], "lm_weight": 1.0 / best["acwt"],
              "wer": best["wer"], "utts": len(data), "seconds": round(time.time() - t0, 2),
              "config": config_to_dict(cfg), "grid": search.rows}
    if out_path is not None:
        atomic_write_json(out_path, result)
    # not in tune.json: lets the caller skip decoding dev again
    result["best_results"] = search.hyps[search.rows.index(best)]
    log.info("tuned on %d utterances: acwt %.4g (LM weight %.3g), word insertion penalty %.3g, %%WER %.2f -> %s",
             len(data), best["acwt"], 1.0 / best["acwt"], best["word_ins_penalty"], best["wer"], out_path)
    return result


# --------------------------------------------------------------------------------------------
# Decoding a system (asr decode): its scores, the acwt and priors chosen on dev, one scored folder per set


class _Scores:
    """Per-utterance decoder input and the whole-set posteriors used for frame accuracy."""

    def __init__(self, system: System, paths: SetPaths, log_prior: np.ndarray | None) -> None:
        self.store = FeatureStore(paths.feats_dir)
        self._pos = {u: i for i, u in enumerate(self.store.ids)}
        if system.kind == "gmm":
            from asr.gmm_model import GmmScorer

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


def _is_current(set_dir: Path, fingerprint: str) -> bool:
    """Whether ``set_dir`` holds a complete score of exactly these inputs (its ``inputs.sha1``)."""
    stamp = set_dir / "inputs.sha1"
    return is_done(set_dir) and (set_dir / "wer.json").is_file() and stamp.is_file() \
        and stamp.read_text().strip() == fingerprint


def _reference_labels(system: System, paths: SetPaths, scores: _Scores) -> np.ndarray | None:
    """The set's reference frame labels for frame accuracy (None without an alignment); they must
    count the pdfs the system scores, or the accuracy would compare different label sets."""
    if paths.ali_dir is None:
        return None
    ref = LabelStore(paths.ali_dir)
    if ref.num_pdfs != scores.frame_scores.shape[1]:
        raise SystemDirError(f"{system.name} scores {scores.frame_scores.shape[1]} pdfs, the reference "
                             f"alignment {paths.ali_dir} has {ref.num_pdfs} (use --ali-root of its labels)")
    return ref.labels


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
        if _is_current(set_dir, fingerprint):
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
        labels = _reference_labels(system, paths, scores)
        results[paths.name] = score_decode(
            new_dir, refs, {u: r.text for u, r in res.items()},
            log_post=scores.frame_scores if labels is not None else None, labels=labels,
            partial=[u for u, r in res.items() if not r.reached_final],
            extra={"system": system.name, "set": paths.name, "acwt": cfg.acwt, "priors": prior_kind,
                   "word_ins_penalty": cfg.word_ins_penalty, "decode_config": config_to_dict(cfg)})
        atomic_write_text(new_dir / "inputs.sha1", fingerprint + "\n")
        _replace_dir(new_dir, set_dir)
    return results


# --------------------------------------------------------------------------------------------
# CLI: ``asr decode`` (systems on prepared sets) and ``asr decode-loglikes`` (a saved log-likelihood
# matrix set; low level)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    _add_loglikes_parser(subparsers)
    _add_decode_parser(subparsers)


def _add_loglikes_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("decode-loglikes",
                              help="decode per-utterance log-likelihoods from an .npz (utt id -> (frames, pdfs))")
    p.add_argument("--graph-dir", required=True)
    p.add_argument("--lang-dir", required=True)
    p.add_argument("--loglikes", required=True, help=".npz: one (frames, pdfs) array per utterance id")
    p.add_argument("--out", required=True, help="output hypothesis file (<utt> words)")
    p.add_argument("--nj", type=int, default=1)
    add_config_args(p)
    p.set_defaults(func=_cli_loglikes)


def _cli_loglikes(args: argparse.Namespace) -> int:
    from asr.scoring import write_hyps

    cfg = config_from_args(DecodeConfig, args)
    with np.load(args.loglikes, allow_pickle=False) as z:
        ids = sorted(z.files)
        res = decode_many(args.graph_dir, args.lang_dir, lambda u: z[u], cfg, args.nj, utt_ids=ids)
    write_hyps(args.out, {u: r.text for u, r in res.items()})
    partial = [u for u, r in res.items() if not r.reached_final]
    if partial:
        atomic_write_text(str(args.out) + ".partial", "".join(u + "\n" for u in partial))
    return 0


def _set_paths(exp_dir: str, names: Sequence[str], ali_root: str = "ali") -> list[SetPaths]:
    return [SetPaths.from_exp(exp_dir, n, ali_root) for n in names]


def _add_decode_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "decode", help="decode and score prepared sets with a trained system (GMM, member, ensemble, student)",
        description="Decode and score any trained system on any prepared set.")
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
    p.set_defaults(func=_cli_decode)


def _cli_decode(args: argparse.Namespace) -> int:
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
