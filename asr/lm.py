"""Language model and G: a Kneser-Ney n-gram (or a given ARPA file), its perplexity, and G.fst.

For LibriSpeech the official ARPA models of OpenSLR resource 11 are used (``--arpa``; tgsmall =
``3-gram.pruned.3e-7.arpa.gz`` by default in the recipe, tgmed = ``3-gram.pruned.1e-7`` as an
option). For the mini corpus a Kneser-Ney n-gram is trained with kaldingram on the LM text, which
must not contain dev or test sentences: that would make WER meaningless, so an overlap raises
:class:`LmError` naming the sentences (``allow_overlap=true`` turns it into a warning).

Outputs (``lm/``): ``lm.arpa``, ``G.fst`` (kaldilm ``arpa2fst`` with ``#0`` on backoff arcs and the
lang directory's ``words.txt``; n-grams with words outside it are dropped, as Kaldi's
``format_lms.sh`` does), ``ppl.json`` (per evaluation set: sentences, words, OOV counts and rates
against the LM and against the lexicon, log10 probability, perplexity with and without ``</s>``),
``info.json``, ``config.yaml``, ``log/``, ``.done``.

Perplexity follows SRILM's ``ngram -ppl``: OOV words (not in the LM vocabulary) are not scored and
not counted in the denominator; later words back off past them.

Example::

    asr train-lm --text exp/mini/corpus/lm_text.txt --lang-dir exp/mini/lang --out-dir exp/mini/lm \\
        --eval dev=exp/mini/data/dev/manifest.jsonl --eval test=exp/mini/data/test/manifest.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from asr.config import add_config_args, config_from_args, config_hash, config_to_dict, write_config
from asr.io import file_sha1, atomic_path, atomic_write_json, mark_done
from asr.manifest import read_manifest

__all__ = ["LmConfig", "LmError", "ArpaLm", "train_lm", "make_g", "read_arpa", "perplexity",
           "check_overlap", "add_cli"]

log = logging.getLogger(__name__)

_ARPA_ENCODING = "latin-1"  # byte-transparent, as kaldingram and Kaldi read ARPA files


class LmError(ValueError):
    """Bad LM input (missing file, dev/test leakage, unusable ARPA); the message names it."""


@dataclass(frozen=True)
class LmConfig:
    """How the n-gram LM is trained (ignored for the n-gram itself when an ARPA file is given)."""

    order: int = 3                  # n-gram order of the Kneser-Ney model
    prune_threshold: float = 0.0    # kaldingram entropy pruning threshold (0: no pruning)
    oov_to_unk: bool = False        # map LM-text words outside words.txt to <UNK> before training
    allow_overlap: bool = False     # dev/test sentences in the LM text: warn instead of raising

    def __post_init__(self) -> None:
        if not 1 <= self.order <= 5:
            raise ValueError(f"LmConfig.order must be in 1..5, got {self.order}")
        if self.prune_threshold < 0:
            raise ValueError(f"LmConfig.prune_threshold must be >= 0, got {self.prune_threshold}")


# --------------------------------------------------------------------------------------------
# ARPA reading and perplexity


@dataclass
class ArpaLm:
    """A back-off n-gram in log10, holding only the n-grams a scorer asked for (see read_arpa)."""

    order: int
    vocab: set[str]                                   # every unigram of the model
    prob: dict[tuple[str, ...], float]                # n-gram -> log10 p
    bow: dict[tuple[str, ...], float]                 # history -> log10 back-off weight
    counts: dict[int, int]                            # n-gram counts from the \data\ header

    def log10_p(self, word: str, history: tuple[str, ...]) -> float:
        """log10 p(word | history) with standard back-off (missing back-off weights are 0)."""
        h = history[-(self.order - 1):] if self.order > 1 else ()
        total = 0.0
        while True:
            p = self.prob.get(h + (word,))
            if p is not None:
                return total + p
            if not h:
                raise KeyError(word)
            total += self.bow.get(h, 0.0)
            h = h[1:]


def _open_arpa(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding=_ARPA_ENCODING)
    return open(path, encoding=_ARPA_ENCODING)


def read_arpa(path: str | os.PathLike, keep_words: set[str] | None = None) -> ArpaLm:
    """Parse an ARPA file (optionally gzipped).

    ``keep_words``: only n-grams made entirely of these words (plus ``<s>``/``</s>``) are kept;
    this is exact for scoring text over that vocabulary and keeps large models (LibriSpeech's
    tgsmall) small in memory. The full unigram vocabulary is always kept.
    """
    path = Path(path)
    if not path.is_file():
        raise LmError(f"ARPA file {path} does not exist")
    keep = None if keep_words is None else set(keep_words) | {"<s>", "</s>"}
    counts: dict[int, int] = {}
    prob: dict[tuple[str, ...], float] = {}
    bow: dict[tuple[str, ...], float] = {}
    vocab: set[str] = set()
    section = None
    with _open_arpa(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line == "\\data\\":
                section = "data"
                continue
            if line == "\\end\\":
                break
            if line.startswith("\\") and line.endswith("-grams:"):
                try:
                    section = int(line[1:-len("-grams:")])
                except ValueError:
                    raise LmError(f"{path}:{lineno}: bad section header {line!r}") from None
                continue
            if section == "data":
                if line.startswith("ngram "):
                    n, c = line[len("ngram "):].split("=")
                    counts[int(n)] = int(c)
                continue
            if not isinstance(section, int):
                continue
            fields = line.split()
            n = section
            if len(fields) not in (n + 1, n + 2):
                raise LmError(f"{path}:{lineno}: expected {n}-gram line, got {line!r}")
            words = tuple(fields[1:n + 1])
            if n == 1:
                vocab.add(words[0])
            if keep is not None and any(w not in keep for w in words):
                continue
            prob[words] = float(fields[0])
            if len(fields) == n + 2:
                bow[words] = float(fields[n + 1])
    if not counts or not vocab:
        raise LmError(f"{path}: not an ARPA file (no \\data\\ section or no unigrams)")
    return ArpaLm(order=max(counts), vocab=vocab, prob=prob, bow=bow, counts=counts)


def perplexity(lm: ArpaLm, sentences: Iterable[str], lexicon_words: set[str] | None = None) -> dict:
    """SRILM-style perplexity of ``sentences`` (one per item, words separated by spaces).

    OOV words (outside the LM vocabulary) are skipped: not scored, not in the denominator.
    Returns ``{sentences, words, oov, oov_rate, logprob, ppl, ppl1}`` plus ``oov_lexicon`` and
    ``oov_rate_lexicon`` (percent of words outside ``lexicon_words``) when it is given.
    """
    n_sent = n_words = n_oov = n_oov_lex = 0
    logprob = 0.0
    for sent in sentences:
        words = sent.split()
        if not words:
            continue
        n_sent += 1
        n_words += len(words)
        hist: tuple[str, ...] = ("<s>",)
        for w in words:
            if lexicon_words is not None and w not in lexicon_words:
                n_oov_lex += 1
            if w not in lm.vocab or w in ("<s>", "</s>"):
                n_oov += 1
                hist = hist + (w,)
                continue
            logprob += lm.log10_p(w, hist)
            hist = hist + (w,)
        logprob += lm.log10_p("</s>", hist)
    scored = n_words - n_oov
    out = {
        "sentences": n_sent,
        "words": n_words,
        "oov": n_oov,
        "oov_rate": 100.0 * n_oov / n_words if n_words else 0.0,
        "logprob": logprob,
        "ppl": 10 ** (-logprob / (scored + n_sent)) if scored + n_sent else float("nan"),
        "ppl1": 10 ** (-logprob / scored) if scored else float("nan"),
    }
    if lexicon_words is not None:
        out["oov_lexicon"] = n_oov_lex
        out["oov_rate_lexicon"] = 100.0 * n_oov_lex / n_words if n_words else 0.0
    return out


# --------------------------------------------------------------------------------------------
# Training


def _norm(sentence: str) -> str:
    return " ".join(sentence.split())


def check_overlap(lm_sentences: Iterable[str], eval_texts: Mapping[str, Iterable[str]],
                  allow: bool = False, source: str = "LM text") -> dict[str, list[str]]:
    """Find evaluation transcripts that occur verbatim as a line of the LM text.

    Raises :class:`LmError` naming the overlapping sentences (and their set) unless ``allow``, in
    which case it warns. Returns ``{set: [sentences]}``.
    """
    lm_set = {_norm(s) for s in lm_sentences}
    lm_set.discard("")
    found: dict[str, list[str]] = {}
    for name, texts in eval_texts.items():
        hits = sorted({_norm(t) for t in texts if _norm(t) in lm_set})
        if hits:
            found[name] = hits
    if found:
        desc = "; ".join(f"{name}: {len(h)} sentence(s), e.g. " + " | ".join(repr(s) for s in h[:3])
                         for name, h in found.items())
        msg = f"{source} contains evaluation transcripts ({desc})"
        if not allow:
            raise LmError(msg + "; remove them from the LM text (or set allow_overlap=true)")
        log.warning("%s", msg)
    return found


def _train_kn(text: Path, arpa: Path, order: int, prune_threshold: float) -> dict:
    """Kneser-Ney training with kaldingram (same model as SRILM ``-ukndiscount``)."""
    from kaldingram.train import NgramCounts

    counts = NgramCounts(order)
    counts.add_raw_counts_from_file(str(text))
    counts.cal_discounting_constants()
    counts.cal_f()
    counts.cal_bow()
    with atomic_path(arpa) as tmp:
        with open(tmp, "w", encoding=_ARPA_ENCODING) as f:
            counts.print_as_arpa(fout=f)
        dropped = _drop_zero_prob_ngrams(tmp)
        if prune_threshold > 0:
            from kaldingram.prune import ArpaParser, prune

            model = ArpaParser().loadf(str(tmp), encoding=_ARPA_ENCODING)[0]
            prune(model, prune_threshold, 1)
            ArpaParser().dumpf(model, str(tmp), encoding=_ARPA_ENCODING)
    return {"zero_prob_ngrams_dropped": dropped}


def _drop_zero_prob_ngrams(path: Path) -> int:
    """Remove higher-order n-grams with log10 p <= -99 (KN with discount 1 on tiny data).

    Such an entry would block back-off and make a seen n-gram almost impossible in G.
    """
    lines = path.read_text(encoding=_ARPA_ENCODING).splitlines()
    section = None
    out: list[str] = []
    removed: dict[int, int] = defaultdict(int)
    for line in lines:
        s = line.strip()
        if s.startswith("\\") and s.endswith("-grams:"):
            section = int(s[1:-len("-grams:")])
        elif s == "\\end\\":
            section = None
        elif isinstance(section, int) and section > 1 and s:
            if float(s.split()[0]) <= -99.0:
                removed[section] += 1
                continue
        out.append(line)
    if not removed:
        return 0
    fixed = []
    for line in out:
        if line.startswith("ngram ") and "=" in line:
            n, c = line[len("ngram "):].split("=")
            line = f"ngram {n}={int(c) - removed.get(int(n), 0)}"
        fixed.append(line)
    path.write_text("\n".join(fixed) + "\n", encoding=_ARPA_ENCODING)
    total = sum(removed.values())
    log.warning("dropped %d zero-probability n-gram(s) (log10 p <= -99); the LM text is tiny or "
                "has no repeated n-grams", total)
    return total


def _training_transcripts(manifests: Sequence[Path], eval_texts: Mapping[str, Iterable[str]]) -> tuple[list[str], int]:
    """Transcripts of the training manifests, less any sentence that is also a dev/test transcript.

    A short sentence ("CHAPTER ONE") can be read in both a training and a test chapter; in the LM
    it would give that test utterance a probability learnt from itself, so it is left out here.
    """
    held_out = {_norm(t) for texts in eval_texts.values() for t in texts}
    kept, dropped = [], 0
    for m in manifests:
        for u in read_manifest(m):
            s = _norm(u.text)
            if not s:
                continue
            if s in held_out:
                dropped += 1
                continue
            kept.append(s)
    if dropped:
        log.warning("%d training transcript(s) are also dev/test sentences; left out of the LM text", dropped)
    return kept, dropped


def _read_words_txt(lang_dir: Path) -> set[str]:
    path = lang_dir / "words.txt"
    if not path.is_file():
        raise LmError(f"{path} does not exist (run prepare-lang first)")
    with open(path, encoding="utf-8") as f:
        return {line.split()[0] for line in f if line.strip()}



def make_g(arpa: str | os.PathLike, lang_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """``G.fst`` from an ARPA file with the lang directory's ``words.txt`` (``#0`` on backoff arcs).

    kaldilm aborts the process on a malformed ARPA file, so the conversion runs in a child process
    (its log is ``log/arpa2fst.log``). Returns the path of ``G.fst``.
    """
    from asr.graph import run_child

    arpa, lang_dir, out_dir = Path(arpa), Path(lang_dir), Path(out_dir)
    words = _read_words_txt(lang_dir)
    if "#0" not in words:
        raise LmError(f"{lang_dir / 'words.txt'} has no #0 (needed on G's backoff arcs)")
    if not arpa.is_file():
        raise LmError(f"ARPA file {arpa} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    g = out_dir / "G.fst"
    with atomic_path(g) as tmp:
        run_child("arpa2fst", {"arpa": str(arpa), "words": str(lang_dir / "words.txt"), "out": str(tmp)},
                  out_dir / "log" / "arpa2fst.log", what=f"arpa2fst of {arpa}")
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise LmError(f"arpa2fst wrote no G for {arpa} (see {out_dir / 'log' / 'arpa2fst.log'})")
    return g


def _copy_arpa(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        if src.suffix == ".gz":
            with gzip.open(src, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
        else:
            shutil.copyfile(src, tmp)


def _check_inputs(text: Path | None, arpa_src: Path | None, trans_paths: list[Path], lang_dir: Path) -> Path:
    """Every input exists before anything is written; returns the lang's ``words.txt``."""
    if arpa_src is None and text is None and not trans_paths:
        raise LmError("train_lm needs the LM text (text_path), training transcripts or an ARPA file (arpa)")
    for p, what in ((text, "LM text"), (arpa_src, "ARPA file")):
        if p is not None and not p.is_file():
            raise LmError(f"{what} {p} does not exist")
    words_txt = lang_dir / "words.txt"
    if not words_txt.is_file():
        raise LmError(f"{words_txt} does not exist (run prepare-lang first)")
    return words_txt


def _read_lm_text(text: Path | None, trans_paths: list[Path], eval_texts: dict[str, list[str]],
                  cfg: LmConfig, info: dict) -> list[str]:
    """Normalised LM sentences: the LM text (refused if it holds dev/test sentences, unless allowed)
    followed by the training transcripts (dev/test sentences left out). What was read goes into ``info``."""
    lm_lines: list[str] = []
    if text is not None:
        with open(text, encoding="utf-8") as f:
            lm_lines = [_norm(line) for line in f]
        lm_lines = [s for s in lm_lines if s]
        if not lm_lines:
            raise LmError(f"LM text {text} is empty")
        overlap = check_overlap(lm_lines, eval_texts, allow=cfg.allow_overlap, source=f"LM text {text}")
        info.update(text=str(text.resolve()), text_sentences=len(lm_lines),
                    overlap={k: len(v) for k, v in overlap.items()})
    if trans_paths:
        own, dropped = _training_transcripts(trans_paths, eval_texts)
        lm_lines += own
        info.update(transcripts=[str(t.resolve()) for t in trans_paths], transcript_sentences=len(own),
                    transcripts_left_out_as_eval=dropped)
    return lm_lines


def _count_outside_lexicon(lm_lines: list[str], lexicon_words: set[str], words_txt: Path, cfg: LmConfig,
                           info: dict) -> None:
    """Count (and warn about) LM-text words the lexicon lacks: they become ``<UNK>`` or vanish from G."""
    if not lm_lines:
        raise LmError("the LM text and training transcripts hold no sentence")
    lm_vocab = {w for s in lm_lines for w in s.split()}
    outside = sorted(lm_vocab - lexicon_words)
    info["text_words_not_in_lexicon"] = len(outside)
    if outside:
        log.warning("%d LM-text word type(s) are not in %s (e.g. %s): %s", len(outside), words_txt,
                    " ".join(outside[:5]),
                    "mapped to <UNK>" if cfg.oov_to_unk else "their n-grams are dropped from G")


def _train_arpa(lm_lines: list[str], lexicon_words: set[str], words_txt: Path, out_dir: Path, cfg: LmConfig,
                arpa_out: Path) -> dict:
    """Write ``lm_train.txt`` (OOVs mapped to ``<UNK>`` if so configured) and train the Kneser-Ney
    ARPA model on it; returns what the training reports for ``info.json``."""
    train_text = out_dir / "lm_train.txt"
    unk = "<UNK>"
    if cfg.oov_to_unk and unk not in lexicon_words:
        raise LmError(f"oov_to_unk is set but {words_txt} has no {unk}")
    with atomic_path(train_text) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for s in lm_lines:
                if cfg.oov_to_unk:
                    s = " ".join(w if w in lexicon_words else unk for w in s.split())
                f.write(s + "\n")
    log.info("training a %d-gram Kneser-Ney LM on %d sentences", cfg.order, len(lm_lines))
    return _train_kn(train_text, arpa_out, cfg.order, cfg.prune_threshold)


def _evaluate(arpa_out: Path, eval_texts: dict[str, list[str]], lexicon_words: set[str], info: dict) -> dict:
    """Perplexity and OOV rates of every eval set; n-gram counts and the LM's words outside the
    lexicon go into ``info``."""
    eval_vocab = {w for texts in eval_texts.values() for t in texts for w in t.split()}
    lm = read_arpa(arpa_out, keep_words=eval_vocab)
    info["ngram_counts"] = {str(k): v for k, v in sorted(lm.counts.items())}
    info["lm_words_not_in_lexicon"] = len(lm.vocab - lexicon_words - {"<s>", "</s>"})
    ppl = {name: perplexity(lm, texts, lexicon_words) for name, texts in eval_texts.items()}
    for name, r in ppl.items():
        log.info("%s: ppl %.1f, OOV %.2f%% (LM) %.2f%% (lexicon), %d sentences", name, r["ppl"],
                 r["oov_rate"], r["oov_rate_lexicon"], r["sentences"])
    return ppl


def train_lm(
    text_path: str | os.PathLike | None,
    lang_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: LmConfig = LmConfig(),
    eval_manifests: Mapping[str, str | os.PathLike] | None = None,
    arpa: str | os.PathLike | None = None,
    transcripts: Sequence[str | os.PathLike] = (),
) -> Path:
    """Train (or take) the n-gram LM, make G and write perplexities.

    ``text_path``: LM training text, one sentence per line (ignored when ``arpa`` is given, but
    still checked for dev/test overlap if present). ``eval_manifests``: ``{set: manifest.jsonl}``
    whose transcripts get perplexity / OOV figures and are checked against the LM text.
    ``transcripts``: training manifests whose transcripts are added to the LM text (real corpora
    without an LM text of their own); a transcript identical to a dev/test sentence is left out of
    the LM text (the acoustic training keeps it), while such a line in ``text_path`` is refused.
    Returns ``out_dir``.
    """
    lang_dir, out_dir = Path(lang_dir), Path(out_dir)
    text = Path(text_path) if text_path is not None else None
    arpa_src = Path(arpa) if arpa is not None else None
    eval_manifests = {k: Path(v) for k, v in (eval_manifests or {}).items()}
    trans_paths = [Path(t) for t in transcripts]
    words_txt = _check_inputs(text, arpa_src, trans_paths, lang_dir)
    stamp = {
        "config_hash": config_hash(cfg),
        "text_sha1": file_sha1(text) if text is not None else None,
        "transcripts_sha1": [file_sha1(t) for t in trans_paths] or None,
        "arpa_sha1": file_sha1(arpa_src) if arpa_src is not None else None,
        "words_sha1": file_sha1(words_txt),
        "eval": {k: file_sha1(v) for k, v in sorted(eval_manifests.items())},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".done").unlink(missing_ok=True)

    eval_texts = {name: [u.text for u in read_manifest(p)] for name, p in sorted(eval_manifests.items())}
    lexicon_words = _read_words_txt(lang_dir) - {"<eps>", "#0", "<s>", "</s>"}
    info: dict = {"config": config_to_dict(cfg)}
    lm_lines = _read_lm_text(text, trans_paths, eval_texts, cfg, info)
    arpa_out = out_dir / "lm.arpa"
    if arpa_src is not None:
        log.info("using the given ARPA model %s", arpa_src)
        _copy_arpa(arpa_src, arpa_out)
        info["arpa"] = str(arpa_src.resolve())
    else:
        _count_outside_lexicon(lm_lines, lexicon_words, words_txt, cfg, info)
        info.update(_train_arpa(lm_lines, lexicon_words, words_txt, out_dir, cfg, arpa_out))

    make_g(arpa_out, lang_dir, out_dir)
    ppl = _evaluate(arpa_out, eval_texts, lexicon_words, info)
    atomic_write_json(out_dir / "ppl.json", ppl)
    atomic_write_json(out_dir / "info.json", info)
    write_config(cfg, out_dir)
    mark_done(out_dir, stamp)
    return out_dir


# --------------------------------------------------------------------------------------------
# CLI


def _parse_eval(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--eval {item!r}: expected NAME=MANIFEST")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-lm", help="n-gram LM (Kneser-Ney or a given ARPA), G.fst, perplexity")
    p.add_argument("--text", default=None, help="LM training text, one sentence per line")
    p.add_argument("--arpa", default=None, help="use this ARPA model (.arpa or .arpa.gz) instead of training")
    p.add_argument("--transcripts", action="append", default=[], metavar="MANIFEST",
                   help="add this training manifest's transcripts to the LM text (repeatable)")
    p.add_argument("--lang-dir", required=True, help="lang directory (words.txt)")
    p.add_argument("--out-dir", required=True, help="output LM directory")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=MANIFEST",
                   help="evaluation set for perplexity / OOV and the overlap check (repeatable)")
    add_config_args(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(LmConfig, args)
    train_lm(args.text, args.lang_dir, args.out_dir, cfg, _parse_eval(args.eval), arpa=args.arpa,
             transcripts=args.transcripts)
    return 0
