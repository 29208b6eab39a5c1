"""The lang directory: phone and word symbol tables, HMM topology, context dependency and L.

This is Kaldi's ``utils/prepare_lang.sh`` for a position-independent monophone system. Everything a
later stage needs to turn words into HMM states is derived here once, from the lexicon:

- ``phones.txt``: ``<eps>`` 0, the silence phones (``SIL``, ``SPN``), the 39 CMU phones, then the
  disambiguation symbols ``#0 .. #K``. ``#0`` is G's backoff symbol, ``#1 .. #K-1`` separate
  homophones and pronunciations that are prefixes of others, ``#K`` follows optional silence in
  ``L_disambig.fst`` (so that L o G stays determinisable, as in Kaldi).
- ``words.txt``: ``<eps>`` 0, the vocabulary (sorted, ``<UNK>`` included), then ``#0``, ``<s>``,
  ``</s>``.
- ``topo``: 3-state left-to-right HMMs for speech phones, Kaldi's 5-state ergodic-middle topology
  for silence phones (``SIL`` and ``SPN``, as in Kaldi).
- ``tree``: the monophone context dependency in Kaldi's binary format (kaldi-hmm-gmm's own writer).
  The initial transition model is rebuilt from ``topo`` + the monophone tree (kaldi-hmm-gmm 1.1.4
  exposes no reader or writer for TransitionModel; trained ones are stored by ``asr.gmm_model``).
- ``L.fst`` (training graphs) and ``L_disambig.fst`` (HCLG), both with optional silence between
  words (probability ``sil_prob``) and sorted on output labels; ``L_disambig.fst`` has a ``#0:#0``
  self-loop where words start and end so that G's backoff arcs pass through L o G.

Example::

    asr prepare-lang --lexicon exp/mini/data/local/lexicon.txt --out-dir exp/mini/lang \\
        --vocab exp/mini/corpus/lm_text.txt
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import kaldi_hmm_gmm as khg  # noqa: I001  (must be imported before kaldifst)
import kaldifst

from asr.config import add_config_args, config_from_args, config_hash, write_config
from asr.lexicon import PHONES
from asr.io import atomic_path, atomic_write_json, atomic_write_text, file_sha1, is_done, mark_done, read_json

__all__ = [
    "CMU_PHONES",
    "LangConfig",
    "LangError",
    "Lang",
    "prepare_lang",
    "load_lang",
    "read_lexicon",
    "add_cli",
]

log = logging.getLogger(__name__)

# The 39 CMU dictionary phones without stress marks (the lexicon step's phone set).
CMU_PHONES: tuple[str, ...] = PHONES

EPS = "<eps>"
_RESERVED_WORDS = {EPS, "#0", "<s>", "</s>"}
_STRESS = re.compile(r"^([A-Z]+)[012]$")


class LangError(ValueError):
    """The lexicon or a lang directory is unusable; the message names the file and the entry."""


@dataclass(frozen=True)
class LangConfig:
    """How the lang directory is built (Kaldi ``prepare_lang.sh`` defaults)."""

    sil_prob: float = 0.5            # probability of optional silence at the start and after each word
    sil_phone: str = "SIL"           # the optional silence phone
    unk_word: str = "<UNK>"          # words outside the lexicon map to this word ...
    unk_phone: str = "SPN"           # ... which is pronounced with this (silence-class) phone
    num_nonsil_states: int = 3       # HMM states of a speech phone (left to right)
    num_sil_states: int = 5          # HMM states of a silence phone (Kaldi's silence topology)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sil_prob < 1.0:
            raise ValueError(f"LangConfig.sil_prob must be in [0, 1), got {self.sil_prob}")
        if self.num_nonsil_states < 1:
            raise ValueError(f"LangConfig.num_nonsil_states must be >= 1, got {self.num_nonsil_states}")
        if self.num_sil_states < 2:
            raise ValueError(f"LangConfig.num_sil_states must be >= 2, got {self.num_sil_states}")
        if self.sil_phone == self.unk_phone:
            raise ValueError("LangConfig.sil_phone and unk_phone must differ")


# --------------------------------------------------------------------------------------------
# Lexicon


def read_lexicon(path: str | os.PathLike) -> list[tuple[str, tuple[str, ...]]]:
    """Read ``WORD PH1 PH2 ...`` lines; stress digits on phones are dropped (the set is stressless).

    Duplicate (word, pronunciation) pairs are kept once; a word may have several pronunciations.
    """
    path = Path(path)
    if not path.is_file():
        raise LangError(f"lexicon {path} does not exist (run the lexicon step first)")
    entries: list[tuple[str, tuple[str, ...]]] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise LangError(f"{path}:{lineno}: word {fields[0]!r} has no pronunciation")
            word = fields[0]
            if word in _RESERVED_WORDS or word.startswith("#"):
                raise LangError(f"{path}:{lineno}: {word!r} is a reserved symbol, not a word")
            pron = tuple(_STRESS.sub(r"\1", p) for p in fields[1:])
            key = (word, pron)
            if key not in seen:
                seen.add(key)
                entries.append(key)
    if not entries:
        raise LangError(f"lexicon {path} is empty")
    return entries


def _read_vocabulary(paths: Sequence[str | os.PathLike]) -> set[str]:
    vocab: set[str] = set()
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise LangError(f"vocabulary file {p} does not exist")
        with open(p, encoding="utf-8") as f:
            for line in f:
                vocab.update(line.split())
    return vocab


def _add_disambig(lexicon: list[tuple[str, tuple[str, ...]]]) -> tuple[list[tuple[str, tuple[str, ...]]], int]:
    """Kaldi's ``add_lex_disambig.pl``: append ``#n`` to homophones and to prefixes of other prons.

    Returns the lexicon with disambiguation symbols and the largest ``n`` used (0 if none).
    """
    count: dict[tuple[str, ...], int] = {}
    for _, pron in lexicon:
        count[pron] = count.get(pron, 0) + 1
    prefixes: set[tuple[str, ...]] = set()
    for _, pron in lexicon:
        for i in range(1, len(pron)):
            prefixes.add(pron[:i])
    next_id: dict[tuple[str, ...], int] = {}
    max_disambig = 0
    out = []
    for word, pron in lexicon:
        if count[pron] > 1 or pron in prefixes:
            n = next_id.get(pron, 0) + 1
            next_id[pron] = n
            max_disambig = max(max_disambig, n)
            out.append((word, pron + (f"#{n}",)))
        else:
            out.append((word, pron))
    return out, max_disambig


# --------------------------------------------------------------------------------------------
# Topology and L


def _topology_text(nonsil_ids: Sequence[int], sil_ids: Sequence[int], cfg: LangConfig) -> str:
    """Kaldi's ``utils/gen_topo.pl`` output for the given phone ids."""
    lines = ["<Topology>", "<TopologyEntry>", "<ForPhones>", " ".join(map(str, nonsil_ids)), "</ForPhones>"]
    n = cfg.num_nonsil_states
    for s in range(n):
        lines.append(f"<State> {s} <PdfClass> {s} <Transition> {s} 0.75 <Transition> {s + 1} 0.25 </State>")
    lines += [f"<State> {n} </State>", "</TopologyEntry>"]
    lines += ["<TopologyEntry>", "<ForPhones>", " ".join(map(str, sil_ids)), "</ForPhones>"]
    m = cfg.num_sil_states
    if m == 2:
        lines.append("<State> 0 <PdfClass> 0 <Transition> 0 0.5 <Transition> 1 0.5 </State>")
        lines.append("<State> 1 <PdfClass> 1 <Transition> 1 0.75 <Transition> 2 0.25 </State>")
    else:
        p = 1.0 / (m - 1)
        first = " ".join(f"<Transition> {t} {p:g}" for t in range(m - 1))
        lines.append(f"<State> 0 <PdfClass> 0 {first} </State>")
        mid = " ".join(f"<Transition> {t} {p:g}" for t in range(1, m))
        for s in range(1, m - 1):
            lines.append(f"<State> {s} <PdfClass> {s} {mid} </State>")
        lines.append(f"<State> {m - 1} <PdfClass> {m - 1} <Transition> {m - 1} 0.75 <Transition> {m} 0.25 </State>")
    lines += [f"<State> {m} </State>", "</TopologyEntry>", "</Topology>", ""]
    return "\n".join(lines)


def _lexicon_fst_text(
    lexicon: list[tuple[str, tuple[str, ...]]],
    phone2id: dict[str, int],
    word2id: dict[str, int],
    sil_prob: float,
    sil_phone: str,
    sil_disambig: str | None,
    word_disambig_loop: bool,
) -> str:
    """Kaldi's ``make_lexicon_fst.py`` with optional silence, as OpenFst text with integer labels.

    States: 0 start, 1 loop (words start and end here; final), 2 after a word followed by silence.
    """
    arcs: list[str] = []
    sil = phone2id[sil_phone]

    def arc(src: int, dst: int, ilabel: int, olabel: int, cost: float) -> None:
        arcs.append(f"{src}\t{dst}\t{ilabel}\t{olabel}\t{cost:.6g}" if cost else f"{src}\t{dst}\t{ilabel}\t{olabel}")

    start, loop, sil_state = 0, 1, 2
    next_state = 3
    if sil_prob > 0:
        sil_cost = -math.log(sil_prob)
        no_sil_cost = -math.log(1.0 - sil_prob)
        arc(start, loop, 0, 0, no_sil_cost)
        arc(start, sil_state, 0, 0, sil_cost)
        if sil_disambig is None:
            arc(sil_state, loop, sil, 0, 0.0)
        else:
            arc(sil_state, next_state, sil, 0, 0.0)
            arc(next_state, loop, phone2id[sil_disambig], 0, 0.0)
            next_state += 1
    else:
        sil_cost = no_sil_cost = 0.0
        arc(start, loop, 0, 0, 0.0)
    for word, pron in lexicon:
        w = word2id[word]
        ids = [phone2id[p] for p in pron]
        cur = loop
        for i, p in enumerate(ids[:-1]):
            arc(cur, next_state, p, w if i == 0 else 0, 0.0)
            cur = next_state
            next_state += 1
        last = ids[-1]
        out = w if len(ids) == 1 else 0
        arc(cur, loop, last, out, no_sil_cost)
        if sil_prob > 0:
            arc(cur, sil_state, last, out, sil_cost)
    if word_disambig_loop:
        arc(loop, loop, phone2id["#0"], word2id["#0"], 0.0)
    arcs.append(f"{loop}")
    return "\n".join(arcs) + "\n"


def _compile_fst(text: str) -> kaldifst.StdVectorFst:
    fst = kaldifst.compile(text, acceptor=False)
    kaldifst.arcsort(fst, sort_type="olabel")
    return fst


# --------------------------------------------------------------------------------------------
# prepare_lang


def _write_symbols(path: Path, symbols: Sequence[str]) -> None:
    atomic_write_text(path, "".join(f"{s} {i}\n" for i, s in enumerate(symbols)))


def _vocab_paths(vocabulary: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """One vocabulary file or several, as a list (empty: keep the whole lexicon)."""
    if vocabulary is None:
        return []
    if isinstance(vocabulary, (str, os.PathLike)):
        return [Path(vocabulary)]
    return [Path(v) for v in vocabulary]


def _load_lexicon(lexicon_path: Path, cfg: LangConfig, vocab_paths: list[Path]) -> list[tuple[str, tuple[str, ...]]]:
    """The lexicon checked against the phone set, with ``<UNK>``, cut to the vocabulary, sorted.

    An unknown phone is an error naming the word (it would have no HMM); a missing ``<UNK>`` entry is
    added, because every word outside the vocabulary maps to it.
    """
    lexicon = read_lexicon(lexicon_path)
    silence_phones = [cfg.sil_phone, cfg.unk_phone]
    phone_set = set(CMU_PHONES) | set(silence_phones)
    for word, pron in lexicon:
        bad = [p for p in pron if p not in phone_set]
        if bad:
            raise LangError(f"{lexicon_path}: word {word!r} uses unknown phone(s) {bad}; "
                            f"the phone set is the 39 CMU phones plus {silence_phones}")
    if not any(w == cfg.unk_word for w, _ in lexicon):
        log.warning("%s has no %s entry; adding '%s %s'", lexicon_path, cfg.unk_word, cfg.unk_word, cfg.unk_phone)
        lexicon.append((cfg.unk_word, (cfg.unk_phone,)))
    if vocab_paths:
        vocab = _read_vocabulary(vocab_paths) | {cfg.unk_word}
        in_lex = {w for w, _ in lexicon}
        missing = sorted(vocab - in_lex - _RESERVED_WORDS)
        lexicon = [(w, p) for w, p in lexicon if w in vocab]
        log.info("vocabulary: %d words, %d kept from the lexicon, %d not in the lexicon (-> %s)",
                 len(vocab), len({w for w, _ in lexicon}), len(missing), cfg.unk_word)
    lexicon.sort(key=lambda e: (e[0], e[1]))
    return lexicon


@dataclass(frozen=True)
class _Tables:
    """Symbol tables of a lang directory, as prepare_lang builds them from the sorted lexicon."""

    lexicon: list
    lexicon_disambig: list
    silence_phones: list[str]
    disambig: list[str]
    phones: list[str]
    phone2id: dict[str, int]
    vocab_words: list[str]
    words: list[str]
    word2id: dict[str, int]

    @property
    def sil_ids(self) -> list[int]:
        return [self.phone2id[p] for p in self.silence_phones]

    @property
    def nonsil_ids(self) -> list[int]:
        return [self.phone2id[p] for p in CMU_PHONES]


def _build_tables(lexicon: list, cfg: LangConfig) -> _Tables:
    """Phone and word tables: ``<eps>``, silences, the CMU phones, then the disambiguation symbols
    #0 (G backoff), #1..#max (homophones and prefixes in the lexicon), #max+1 (after optional silence)."""
    lexicon_disambig, max_disambig = _add_disambig(lexicon)
    disambig = [f"#{i}" for i in range(max_disambig + 2)]
    silence_phones = [cfg.sil_phone, cfg.unk_phone]
    phones = [EPS] + silence_phones + list(CMU_PHONES) + disambig
    vocab_words = sorted({w for w, _ in lexicon})
    words = [EPS] + vocab_words + ["#0", "<s>", "</s>"]
    return _Tables(lexicon, lexicon_disambig, silence_phones, disambig, phones, {p: i for i, p in enumerate(phones)},
                   vocab_words, words, {w: i for i, w in enumerate(words)})


def _write_tables(out_dir: Path, t: _Tables, topo_text: str, ctx_dep: object, cfg: LangConfig) -> None:
    """The text files of the lang directory (Kaldi's names and formats) and the monophone tree."""
    _write_symbols(out_dir / "phones.txt", t.phones)
    _write_symbols(out_dir / "words.txt", t.words)
    atomic_write_text(out_dir / "topo", topo_text)
    atomic_write_text(out_dir / "lexicon.txt", "".join(f"{w} {' '.join(p)}\n" for w, p in t.lexicon))
    atomic_write_text(out_dir / "lexicon_disambig.txt",
                      "".join(f"{w} {' '.join(p)}\n" for w, p in t.lexicon_disambig))
    atomic_write_text(out_dir / "disambig.int", "".join(f"{t.phone2id[d]}\n" for d in t.disambig))
    atomic_write_text(out_dir / "silence.int", "".join(f"{i}\n" for i in t.sil_ids))
    atomic_write_text(out_dir / "nonsilence.int", "".join(f"{i}\n" for i in t.nonsil_ids))
    atomic_write_text(out_dir / "optional_silence.int", f"{t.phone2id[cfg.sil_phone]}\n")
    with atomic_path(out_dir / "tree") as tmp:
        ctx_dep.write(True, str(tmp))


def _write_lexicon_fsts(out_dir: Path, t: _Tables, cfg: LangConfig) -> None:
    """``L.fst`` (for alignment graphs) and ``L_disambig.fst`` (for HCLG: disambiguation symbols and
    the #0 self-loop that lets G's backoff arcs through)."""
    l_text = _lexicon_fst_text(t.lexicon, t.phone2id, t.word2id, cfg.sil_prob, cfg.sil_phone, None, False)
    ld_text = _lexicon_fst_text(t.lexicon_disambig, t.phone2id, t.word2id, cfg.sil_prob, cfg.sil_phone,
                                t.disambig[-1], True)
    for name, text in (("L.fst", l_text), ("L_disambig.fst", ld_text)):
        fst = _compile_fst(text)
        with atomic_path(out_dir / name) as tmp:
            if not fst.write(str(tmp)):
                raise LangError(f"could not write {out_dir / name}")


def prepare_lang(
    lexicon_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: LangConfig = LangConfig(),
    vocabulary: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> Path:
    """Build the lang directory from a lexicon.

    ``vocabulary``: text file(s) whose whitespace-separated tokens are the words to keep (for
    example the LM text plus the training transcripts); lexicon words outside it are dropped.
    ``<UNK>`` is always kept. Vocabulary words missing from the lexicon are counted and logged:
    they will map to ``<UNK>``.
    """
    lexicon_path = Path(lexicon_path)
    out_dir = Path(out_dir)
    vocab_paths = _vocab_paths(vocabulary)
    if not lexicon_path.is_file():
        raise LangError(f"lexicon {lexicon_path} does not exist (run the lexicon step first)")
    stamp = {
        "config_hash": config_hash(cfg),
        "lexicon_sha1": file_sha1(lexicon_path, 12),
        "vocab_sha1": [file_sha1(p, 12) for p in vocab_paths] if vocab_paths else None,
    }
    t = _build_tables(_load_lexicon(lexicon_path, cfg, vocab_paths), cfg)

    topo_text = _topology_text(t.nonsil_ids, t.sil_ids, cfg)
    topo = khg.HmmTopology()
    topo.read(topo_text)
    real_phones = sorted(t.sil_ids + t.nonsil_ids)
    ctx_dep = khg.monophone_context_dependency(real_phones, topo.get_phone_to_num_pdf_classes())
    trans_model = khg.TransitionModel(ctx_dep, topo)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".done").unlink(missing_ok=True)
    _write_tables(out_dir, t, topo_text, ctx_dep, cfg)
    _write_lexicon_fsts(out_dir, t, cfg)
    info = {
        "num_phones": len(real_phones),
        "num_words": len(t.vocab_words),
        "num_pdfs": int(trans_model.num_pdfs),
        "num_transition_ids": int(trans_model.num_transition_ids),
        "num_disambig": len(t.disambig),
        "silence_phones": t.silence_phones,
        "optional_silence": cfg.sil_phone,
        "unk_word": cfg.unk_word,
        "unk_phone": cfg.unk_phone,
        "lexicon": str(lexicon_path.resolve()),
        "vocabulary": [str(p.resolve()) for p in vocab_paths] or None,
    }
    atomic_write_json(out_dir / "info.json", info)
    write_config(cfg, out_dir)
    mark_done(out_dir, stamp)
    log.info("lang %s: %d words, %d phones, %d pdfs, %d disambiguation symbols",
             out_dir, len(t.vocab_words), len(real_phones), info["num_pdfs"], len(t.disambig))
    return out_dir


# --------------------------------------------------------------------------------------------
# Reading a lang directory


def _read_symbols(path: Path) -> list[str]:
    if not path.is_file():
        raise LangError(f"{path} does not exist (run prepare-lang first)")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise LangError(f"{path}:{lineno}: expected 'symbol id', got {line.strip()!r}")
            pairs.append((int(fields[1]), fields[0]))
    pairs.sort()
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise LangError(f"{path}: symbol ids are not 0..{len(pairs) - 1}")
    return [s for _, s in pairs]


def _read_ints(path: Path) -> list[int]:
    if not path.is_file():
        raise LangError(f"{path} does not exist (run prepare-lang first)")
    return [int(x) for x in path.read_text().split()]


class Lang:
    """A prepared lang directory. Kaldi objects are built lazily and cached per instance."""

    def __init__(self, lang_dir: str | os.PathLike) -> None:
        self.dir = Path(lang_dir)
        if not is_done(self.dir):
            raise LangError(f"lang directory {self.dir} is not complete (no .done; run prepare-lang)")
        self.phones: list[str] = _read_symbols(self.dir / "phones.txt")
        self.words: list[str] = _read_symbols(self.dir / "words.txt")
        self.phone2id: dict[str, int] = {p: i for i, p in enumerate(self.phones)}
        self.word2id: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        self.disambig_phone_ids: list[int] = _read_ints(self.dir / "disambig.int")
        self.silence_phone_ids: list[int] = _read_ints(self.dir / "silence.int")
        self.nonsilence_phone_ids: list[int] = _read_ints(self.dir / "nonsilence.int")
        self.optional_silence_id: int = _read_ints(self.dir / "optional_silence.int")[0]
        self.info: dict = read_json(self.dir / "info.json")
        self.unk_word: str = self.info["unk_word"]
        self.unk_id: int = self.word2id[self.unk_word]
        self.word_disambig_id: int = self.word2id["#0"]         # word-level #0 (G's backoff)
        self.phone_disambig0_id: int = self.phone2id["#0"]      # phone-level #0
        self.bos_id: int = self.word2id["<s>"]
        self.eos_id: int = self.word2id["</s>"]

    # Symbols ---------------------------------------------------------------------------------

    @property
    def real_phone_ids(self) -> list[int]:
        """Phones that have HMMs: silence + speech phones (no ``<eps>``, no ``#n``)."""
        return sorted(self.silence_phone_ids + self.nonsilence_phone_ids)

    def words_to_ids(self, words: Iterable[str]) -> list[int]:
        """Map words to ids; words outside the vocabulary become ``<UNK>``."""
        return [self.word2id.get(w, self.unk_id) if w not in _RESERVED_WORDS else self.unk_id for w in words]

    def count_oov(self, words: Iterable[str]) -> int:
        return sum(1 for w in words if w not in self.word2id or w in _RESERVED_WORDS)

    @cached_property
    def lexicon(self) -> dict[str, list[tuple[str, ...]]]:
        """The (vocabulary-restricted) lexicon used for L: word -> its pronunciations."""
        lex: dict[str, list[tuple[str, ...]]] = {}
        for word, pron in read_lexicon(self.dir / "lexicon.txt"):
            lex.setdefault(word, []).append(pron)
        return lex

    # Kaldi objects ---------------------------------------------------------------------------

    def topology(self) -> khg.HmmTopology:
        topo = khg.HmmTopology()
        topo.read((self.dir / "topo").read_text())
        return topo

    def ctx_dep(self) -> khg.ContextDependency:
        """The monophone tree (rebuilt from ``topo``; identical to the ``tree`` file)."""
        topo = self.topology()
        return khg.monophone_context_dependency(self.real_phone_ids, topo.get_phone_to_num_pdf_classes())

    def transition_model(self) -> khg.TransitionModel:
        """The initial (untrained) transition model; trained ones come from ``asr.gmm_model.load_model``."""
        return khg.TransitionModel(self.ctx_dep(), self.topology())

    def L(self) -> kaldifst.StdVectorFst:
        """Lexicon FST without disambiguation symbols (training graphs), sorted on output labels."""
        return kaldifst.StdVectorFst.read(str(self.dir / "L.fst"))

    def L_disambig(self) -> kaldifst.StdVectorFst:
        """Lexicon FST with disambiguation symbols and a ``#0:#0`` loop (for HCLG)."""
        return kaldifst.StdVectorFst.read(str(self.dir / "L_disambig.fst"))

    @cached_property
    def _tm_arrays(self) -> tuple[np.ndarray, np.ndarray, int]:
        tm = self.transition_model()
        tid2pdf = np.full(tm.num_transition_ids + 1, -1, dtype=np.int32)
        tid2phone = np.zeros(tm.num_transition_ids + 1, dtype=np.int32)
        for t in range(1, tm.num_transition_ids + 1):
            tid2pdf[t] = tm.transition_id_to_pdf(t)
            tid2phone[t] = tm.transition_id_to_phone(t)
        return tid2pdf, tid2phone, int(tm.num_pdfs)

    @property
    def num_pdfs(self) -> int:
        return self._tm_arrays[2]

    @property
    def num_transition_ids(self) -> int:
        return len(self._tm_arrays[0]) - 1

    @property
    def tid2pdf(self) -> np.ndarray:
        """int32 ``(num_transition_ids + 1,)``: pdf of each transition id (index 0 unused, -1)."""
        return self._tm_arrays[0]

    def pdf_of_transition(self, tid: int) -> int:
        return int(self._tm_arrays[0][tid])

    @cached_property
    def pdf2phone(self) -> np.ndarray:
        """int32 ``(num_pdfs,)``: the phone each pdf belongs to (monophone: exactly one)."""
        tid2pdf, tid2phone, n = self._tm_arrays
        out = np.zeros(n, dtype=np.int32)
        out[tid2pdf[1:]] = tid2phone[1:]
        return out

    @cached_property
    def silence_pdf_ids(self) -> list[int]:
        sil = set(self.silence_phone_ids)
        return [p for p in range(self.num_pdfs) if int(self.pdf2phone[p]) in sil]

    def __repr__(self) -> str:
        return (f"Lang({str(self.dir)!r}, words={len(self.words)}, phones={len(self.real_phone_ids)}, "
                f"pdfs={self.num_pdfs})")


def load_lang(lang_dir: str | os.PathLike) -> Lang:
    return Lang(lang_dir)


# --------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("prepare-lang", help="phone/word tables, HMM topology, L.fst (Kaldi prepare_lang)")
    p.add_argument("--lexicon", required=True, help="lexicon.txt: WORD PH1 PH2 ...")
    p.add_argument("--out-dir", required=True, help="output lang directory")
    p.add_argument("--vocab", action="append", default=None,
                   help="text file whose tokens form the vocabulary (repeatable)")
    add_config_args(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(LangConfig, args)
    prepare_lang(args.lexicon, args.out_dir, cfg, vocabulary=args.vocab)
    return 0
