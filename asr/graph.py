"""The decoding graph HCLG, built once per (lang, LM) and reused by every system.

This is Kaldi's ``utils/mkgraph.sh`` for a monophone system with kaldifst and kaldi-hmm-gmm:

1. ``LG = L_disambig o G``, determinized (``determinize_star``, log semiring) and minimized
   (``minimize_encoded``);
2. ``CLG = C o LG`` by ``compose_context`` (monophone: context width 1), which also gives the
   ilabel info (the phone window each CLG input label stands for);
3. ``Ha`` from ``get_h_transducer`` (transition ids without self-loops, and the transition ids that
   stand for the disambiguation symbols);
4. ``HCLGa = Ha o CLG``, determinized; the disambiguation transition ids are relabelled to
   epsilon by a text round trip (kaldifst has no ``fstrmsymbols``), epsilons removed, minimized;
5. ``HCLG = add_self_loops(HCLGa)`` (self-loop scale 0.1, reordered, as Kaldi).

An OpenFst FATAL error (for example determinizing a non-functional transducer when the lexicon's
homophones lack disambiguation symbols) aborts the process, so the build runs in a child process
(``python -m asr.graph --child ...``): a crash becomes a :class:`GraphError` that quotes the child's
log (``graph/log/mkgraph.log``).

Outputs (``graph/``): ``HCLG.fst``, ``tid2pdf.npy`` (the pdf of every transition id: the decoder
scores pdfs through it), ``words.txt``, ``info.json`` (states, arcs, size, build time, number of
transition ids and pdfs, the model it was built with), ``config.yaml``, ``log/``, ``.done``.

Context-dependent graphs: given a triphone GMM (``--transition-model gmm_tri``), C has context width
3 and H is built from that model's tree and trained transition model, as Kaldi's ``mkgraph.sh``
with a tri1 ``final.mdl``.

Example::

    asr make-graph --lang-dir exp/mini/lang --lm-dir exp/mini/lm --out-dir exp/mini/graph
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from asr.config import add_config_args, config_from_args, config_hash, config_to_dict, write_config
from asr.io import file_sha1, atomic_path, atomic_write_json, is_done, mark_done

__all__ = ["GraphConfig", "GraphError", "make_graph", "run_child", "fst_stats", "add_cli"]

log = logging.getLogger(__name__)


class GraphError(RuntimeError):
    """Graph building failed (bad inputs, or an OpenFst/Kaldi crash in the child process)."""


@dataclass(frozen=True)
class GraphConfig:
    """How HCLG is built (Kaldi ``mkgraph.sh`` defaults)."""

    self_loop_scale: float = 0.1     # scale on self-loop log-probs (Kaldi: 0.1)
    transition_scale: float = 1.0    # scale on the other transition log-probs (Kaldi: 1.0)
    rmepsilon: bool = True           # remove epsilons after the disambiguation symbols are gone
    max_states_det: int = -1         # abort determinization beyond this many states (-1: no limit)

    def __post_init__(self) -> None:
        if self.self_loop_scale <= 0 or self.transition_scale <= 0:
            raise ValueError("GraphConfig.self_loop_scale and transition_scale must be > 0")


# --------------------------------------------------------------------------------------------
# Child processes


def run_child(task: str, args: dict, log_path: str | os.PathLike, what: str) -> dict:
    """Run ``task`` of :func:`_child_main` in a fresh Python process and return its JSON result.

    The child's stdout/stderr go to ``log_path``; a non-zero exit (an OpenFst FATAL aborts the
    process) raises :class:`GraphError` quoting the end of that log.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "asr.graph", "--child", task, json.dumps(args)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TQDM_DISABLE", "1")
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as logf:
        logf.write("# " + " ".join(cmd[:4]) + " '" + cmd[4] + "'\n")
        logf.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=logf, env=env, text=True)
    tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
    if proc.returncode != 0:
        sig = f" (killed by signal {-proc.returncode})" if proc.returncode < 0 else ""
        raise GraphError(f"{what} failed in a child process with exit code {proc.returncode}{sig}; "
                         f"log {log_path}:\n" + "\n".join(tail))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    log.debug("%s took %.1f s", what, time.time() - t0)
    return result


def _child_arpa2fst(arpa: str, words: str, out: str) -> dict:
    import kaldilm

    kaldilm.arpa2fst(arpa, output_fst=out, disambig_symbol="#0", read_symbol_table=words)
    return {}


def fst_stats(fst) -> dict:
    """States, arcs (counted over states) and the size of the binary file when written."""
    from kaldifst import StateIterator

    arcs = 0
    for s in StateIterator(fst):
        arcs += fst.num_arcs(s)
    return {"states": int(fst.num_states), "arcs": int(arcs)}


def _relabel_text(fst, disambig: set[int], max_ilabel: int, what: str):
    """Replace the input labels in ``disambig`` by epsilon through an OpenFst text round trip.

    Any remaining input label above ``max_ilabel`` (a transition id the decoder cannot score)
    is an error: it would index past the log-likelihood matrix.
    """
    import kaldifst

    text = fst.to_str(show_weight_one=True)
    out = []
    n_relabelled = 0
    for line in text.split("\n"):
        if not line:
            continue
        c = line.split()
        if len(c) >= 4:
            il = int(c[2])
            if il in disambig:
                c[2] = "0"
                n_relabelled += 1
            elif il > max_ilabel:
                raise GraphError(f"{what}: input label {il} is neither a transition id "
                                 f"(<= {max_ilabel}) nor a disambiguation symbol")
            out.append("\t".join(c))
        else:
            out.append("\t".join(c))
    return kaldifst.compile("\n".join(out) + "\n"), n_relabelled


def _load_transition_log_probs(path: str | os.PathLike):
    """``(num_transition_ids + 1,)`` log-probs from a ``.npy`` or from a GMM model archive
    (``final.mdl``: an ``.npz`` with ``transition_log_probs``, or the directory holding it)."""
    import numpy as np

    p = Path(path)
    if p.is_dir():
        p = p / "final.mdl"
    if not p.is_file():
        raise GraphError(f"transition model source {p} does not exist")
    with open(p, "rb") as f:
        arr = np.load(f, allow_pickle=False)
        if hasattr(arr, "files"):
            if "transition_log_probs" not in arr.files:
                raise GraphError(f"{p} has no transition_log_probs")
            arr = arr["transition_log_probs"]
    return np.asarray(arr, dtype=np.float64)


def _model_tree(path: str | os.PathLike | None) -> bytes | None:
    """The decision tree stored in a GMM model archive (a triphone ``final.mdl``), else None."""
    import numpy as np

    if path is None or Path(path).suffix == ".npy":
        return None
    p = Path(path)
    p = p / "final.mdl" if p.is_dir() else p
    with np.load(p, allow_pickle=False) as z:
        return z["tree"].tobytes() if "tree" in z.files else None


def _transition_model(lang: object, ctx: object, transition_log_probs: str | None) -> object:
    """The transition model of ``ctx`` on the lang's topology, with the GMM's trained transition
    probabilities when given (set by one ML update whose counts are those probabilities)."""
    import kaldi_hmm_gmm as khg  # noqa: I001  (before kaldifst)

    from asr.gmm_model import set_transition_log_probs

    tm = khg.TransitionModel(ctx, lang.topology())
    if transition_log_probs:
        lp = _load_transition_log_probs(transition_log_probs)
        if lp.shape != (tm.num_transition_ids + 1,):
            raise GraphError(f"{transition_log_probs}: {lp.shape[0] - 1} transition ids, the lang's "
                             f"topology gives {tm.num_transition_ids}")
        set_transition_log_probs(tm, lp)
    return tm


def _compose_lg(L: object, g: str, gc: GraphConfig, info: dict) -> object:
    """det(min(L o G)), the word-level part of the graph; G's and LG's sizes go into ``info``. An
    empty LG means G and the lexicon share no word, which would only show later as an empty HCLG."""
    import kaldifst

    G = kaldifst.StdVectorFst.read(g)
    kaldifst.arcsort(G, sort_type="ilabel")
    kaldifst.arcsort(L, sort_type="olabel")
    info["G"] = fst_stats(G)
    print("composing L o G", file=sys.stderr, flush=True)
    LG = kaldifst.compose(L, G)
    print("determinizing LG", file=sys.stderr, flush=True)
    if kaldifst.determinize_star(LG, max_states=gc.max_states_det, use_log=True):
        raise GraphError(f"determinizing LG stopped at max_states_det={gc.max_states_det}")
    kaldifst.minimize_encoded(LG)
    kaldifst.arcsort(LG, sort_type="ilabel")
    info["LG"] = fst_stats(LG)
    if info["LG"]["states"] == 0:
        raise GraphError("L o G is empty: no word of G is in the lexicon")
    return LG


def _child_hclg(lang_dir: str, g: str, out: str, cfg: dict, transition_log_probs: str | None) -> dict:
    """Kaldi's mkgraph.sh in the child process: HCLG from the lang, G and the model's tree and
    transitions, written to ``out`` (with its transition-id -> pdf table); returns the sizes for info.json."""
    import kaldi_hmm_gmm as khg  # noqa: I001  (before kaldifst)
    import kaldifst
    import numpy as np

    from asr.lang import load_lang
    from asr.tree import context_dependency_from_bytes

    gc = GraphConfig(**cfg)
    t0 = time.time()
    lang = load_lang(lang_dir)
    tree = _model_tree(transition_log_probs)
    ctx = context_dependency_from_bytes(tree) if tree is not None else lang.ctx_dep()
    tm = _transition_model(lang, ctx, transition_log_probs)
    info: dict = {}
    LG = _compose_lg(lang.L_disambig(), g, gc, info)

    print("composing C o LG", file=sys.stderr, flush=True)
    CLG, ilabels = kaldifst.compose_context(lang.disambig_phone_ids, ctx.context_width,
                                            ctx.central_position, LG)
    kaldifst.arcsort(CLG, sort_type="ilabel")
    info["CLG"] = fst_stats(CLG)

    print("making H", file=sys.stderr, flush=True)
    Ha, disambig_tids = khg.get_h_transducer(ilabels, ctx, tm,
                                              khg.HTransducerConfig(transition_scale=gc.transition_scale))
    kaldifst.arcsort(Ha, sort_type="olabel")
    print("composing Ha o CLG", file=sys.stderr, flush=True)
    HCLGa = kaldifst.compose(Ha, CLG)
    del CLG, LG, Ha
    print("determinizing HCLGa", file=sys.stderr, flush=True)
    if kaldifst.determinize_star(HCLGa, max_states=gc.max_states_det, use_log=True):
        raise GraphError(f"determinizing HCLGa stopped at max_states_det={gc.max_states_det}")
    HCLGa, n_rel = _relabel_text(HCLGa, set(disambig_tids), tm.num_transition_ids, "HCLGa")
    if gc.rmepsilon:
        kaldifst.rmepsilon(HCLGa)
    kaldifst.minimize_encoded(HCLGa)
    print("adding self-loops", file=sys.stderr, flush=True)
    HCLG = khg.add_self_loops(self_loop_scale=gc.self_loop_scale, disambig_syms=[], reorder=True,
                              trans_model=tm, ifst=HCLGa)
    kaldifst.arcsort(HCLG, sort_type="ilabel")
    if not HCLG.write(out):
        raise GraphError(f"could not write {out}")
    info["HCLG"] = fst_stats(HCLG)
    info.update(disambig_tids=len(disambig_tids), disambig_arcs_relabelled=n_rel,
                num_transition_ids=int(tm.num_transition_ids), num_pdfs=int(tm.num_pdfs),
                context_width=int(ctx.context_width), trained_transitions=bool(transition_log_probs),
                build_seconds=round(time.time() - t0, 3))
    tid2pdf = np.array([-1] + [tm.transition_id_to_pdf(t) for t in range(1, tm.num_transition_ids + 1)], np.int32)
    np.save(out + ".tid2pdf.npy", tid2pdf)
    return info


def _child_main(argv: list[str]) -> int:
    import kaldi_hmm_gmm  # noqa: F401  (must precede kaldifst)

    task, args = argv[0], json.loads(argv[1])
    fn = {"arpa2fst": _child_arpa2fst, "hclg": _child_hclg}.get(task)
    if fn is None:
        print(f"unknown child task {task!r}", file=sys.stderr)
        return 2
    try:
        result = fn(**args)
    except Exception as e:  # reported through the exit code and the log
        print(f"ERROR: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# make_graph



def make_graph(
    lang_dir: str | os.PathLike,
    lm_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: GraphConfig = GraphConfig(),
    transition_log_probs: str | os.PathLike | None = None,
) -> Path:
    """Build ``HCLG.fst`` from ``lang_dir`` and ``lm_dir/G.fst``.

    ``transition_log_probs``: optional trained transition probabilities, a ``.npy``
    ``(num_transition_ids + 1,)`` or a GMM model (``gmm_mono/final.mdl`` or its directory), as Kaldi
    builds HCLG with ``final.mdl``; without it the topology's initial probabilities are used (the
    graph then depends on lang + LM only and can be shared by every system).
    Returns ``out_dir``.
    """
    lang_dir, lm_dir, out_dir = Path(lang_dir), Path(lm_dir), Path(out_dir)
    if not is_done(lang_dir):
        raise GraphError(f"lang directory {lang_dir} is not complete (run prepare-lang)")
    g = lm_dir / "G.fst"
    if not g.is_file():
        raise GraphError(f"{g} does not exist (run train-lm)")
    inputs = [lang_dir / "L_disambig.fst", lang_dir / "words.txt", lang_dir / "topo", g]
    for p in inputs:
        if not p.is_file():
            raise GraphError(f"{p} does not exist")
    ts = Path(transition_log_probs) if transition_log_probs is not None else None
    if ts is not None and ts.is_dir():
        ts = ts / "final.mdl"
    stamp = {
        "config_hash": config_hash(cfg),
        "inputs": {p.name: file_sha1(p) for p in inputs},
        "transition_log_probs": file_sha1(ts) if ts is not None else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".done").unlink(missing_ok=True)
    log.info("building HCLG in %s", out_dir)
    t0 = time.time()
    with atomic_path(out_dir / "HCLG.fst") as tmp, atomic_path(out_dir / "tid2pdf.npy") as tmp_map:
        info = run_child("hclg", {"lang_dir": str(lang_dir), "g": str(g), "out": str(tmp),
                                  "cfg": config_to_dict(cfg),
                                  "transition_log_probs": str(ts) if ts is not None else None},
                         out_dir / "log" / "mkgraph.log", what=f"building HCLG from {lang_dir} and {g}")
        os.replace(str(tmp) + ".tid2pdf.npy", tmp_map)
    info["model"] = str(ts.resolve()) if ts is not None and ts.suffix != ".npy" else None
    info["wall_seconds"] = round(time.time() - t0, 3)
    info["size_mb"] = round((out_dir / "HCLG.fst").stat().st_size / 2**20, 3)
    with atomic_path(out_dir / "words.txt") as tmp:
        shutil.copyfile(lang_dir / "words.txt", tmp)
    atomic_write_json(out_dir / "info.json", info)
    write_config(cfg, out_dir)
    mark_done(out_dir, stamp)
    log.info("HCLG: %d states, %d arcs, %.1f MB, built in %.1f s", info["HCLG"]["states"],
             info["HCLG"]["arcs"], info["size_mb"], info["wall_seconds"])
    return out_dir


# --------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("make-graph", help="HCLG decoding graph (Kaldi mkgraph.sh)")
    p.add_argument("--lang-dir", required=True, help="lang directory")
    p.add_argument("--lm-dir", required=True, help="LM directory with G.fst")
    p.add_argument("--out-dir", required=True, help="output graph directory")
    p.add_argument("--transition-model", default=None,
                   help="trained transition probabilities: a GMM model (final.mdl or its dir) or a .npy")
    add_config_args(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(GraphConfig, args)
    make_graph(args.lang_dir, args.lm_dir, args.out_dir, cfg, transition_log_probs=args.transition_model)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[2:]))
    print("usage: python -m asr.graph --child TASK JSON  (internal; use `asr make-graph`)", file=sys.stderr)
    sys.exit(2)
