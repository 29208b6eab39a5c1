"""The synthetic mini corpus: King James Bible chapters read by Debian's TTS voices, LibriSpeech layout.

LibriSpeech cannot be downloaded everywhere, so every stage of the pipeline can run on this corpus
instead (docs/DESIGN.md section 5). A *speaker* is a TTS engine and voice (espeak-ng accent + variant,
flite voice, festival voice) with its own pitch and rate, recorded through its own *channel*
(sox: speed change, band limits, equalisation, reverberation; numpy: coloured, modulated noise at a
drawn SNR and a recording level). A speaker reads one or more KJV chapters; a chapter is cut into
utterances of about 6-20 words at punctuation. ``test-other`` uses voices and accents never heard
in training and harsher channels, as LibriSpeech's "other" sets hold harder speakers.

Everything random is drawn from ``cfg.seed`` (noise comes from numpy, never sox), so the same seed
gives byte-identical files whatever ``nj`` is. Utterances already on disk are not synthesised again.

Example::

    asr build-mini-corpus --out-dir exp/mini/corpus --seed 1 --num-utts 2000 --nj 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf

from asr.config import (add_print_config_arg, config_hash, config_to_dict, exit_if_print_config, load_config,
                        parse_kv, write_config)
from asr.io import atomic_path, atomic_write_json, atomic_write_text, mark_done

__all__ = [
    "SUBSETS",
    "MiniCorpusConfig",
    "MiniCorpusError",
    "Chapter",
    "Segment",
    "SpeakerSpec",
    "UttSpec",
    "CorpusPlan",
    "load_kjv",
    "normalise_text",
    "tts_text",
    "segment_chapter",
    "plan_corpus",
    "build_mini_corpus",
    "add_cli",
]

log = logging.getLogger(__name__)

SUBSETS: tuple[str, ...] = ("train-clean", "dev-clean", "test-clean", "test-other")
# Unlabelled audio for distillation (its transcripts exist but distillation never reads them):
# new speakers drawn like the training speakers, reading chapters no other subset reads.
TRANSFER_SUBSET = "train-unlabeled"
SAMPLE_RATE = 16000
ENGINES: tuple[str, ...] = ("espeak-ng", "flite", "festival")


class MiniCorpusError(RuntimeError):
    """The corpus cannot be built (missing tool, failed synthesis, conflicting output dir)."""


@dataclass(frozen=True)
class MiniCorpusConfig:
    seed: int = 1
    num_utts: int = 2000
    # Shares of the utterances per subset, in SUBSETS order (must sum to 1).
    train_share: float = 0.76
    dev_clean_share: float = 0.08
    test_clean_share: float = 0.08
    test_other_share: float = 0.08
    train_speakers: int = 60
    eval_speakers: int = 8                 # per dev/test subset
    max_utts_per_chapter: int = 16         # a speaker moves on to a new chapter after this many
    min_words: int = 6                     # utterance length in words (about 2-8 s of speech)
    max_words: int = 20
    eval_oov_share: float = 0.05           # dev/test utterances allowed to hold a word missing from CMUdict
    engine_weights: tuple[float, ...] = (0.62, 0.26, 0.12)  # espeak-ng, flite, festival
    clean_snr_db: tuple[float, ...] = (15.0, 35.0)
    other_snr_db: tuple[float, ...] = (5.0, 15.0)
    clean_reverb_prob: float = 0.4         # share of clean speakers recorded in a (small) room
    clean_reverberance: tuple[float, ...] = (5.0, 40.0)
    other_reverberance: tuple[float, ...] = (40.0, 90.0)
    speed_range: tuple[float, ...] = (0.94, 1.06)
    level_dbfs: tuple[float, ...] = (-32.0, -18.0)    # active-speech RMS level of a speaker
    pad_s: tuple[float, ...] = (0.1, 0.5)             # leading / trailing silence
    transfer_utts: int = 0                 # utterances of the unlabelled transfer subset (0: none)
    transfer_speakers: int = 60

    def __post_init__(self) -> None:
        shares = self.shares
        if any(s < 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"subset shares {shares} must be non-negative and sum to 1")
        if self.num_utts < len(SUBSETS):
            raise ValueError(f"num_utts={self.num_utts}: need at least one utterance per subset")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if len(self.engine_weights) != len(ENGINES) or min(self.engine_weights) < 0 or sum(self.engine_weights) <= 0:
            raise ValueError(f"engine_weights {self.engine_weights}: need {len(ENGINES)} weights (espeak-ng, flite, festival)")
        for name in ("clean_snr_db", "other_snr_db", "clean_reverberance", "other_reverberance",
                     "speed_range", "level_dbfs", "pad_s"):
            r = getattr(self, name)
            if len(r) != 2 or r[0] > r[1]:
                raise ValueError(f"{name}={r}: expected a range (low, high)")
        if self.train_speakers < 1 or self.eval_speakers < 1:
            raise ValueError("train_speakers and eval_speakers must be >= 1")
        if self.transfer_utts < 0 or self.transfer_speakers < 1:
            raise ValueError("transfer_utts must be >= 0 and transfer_speakers >= 1")

    @property
    def subsets(self) -> tuple[str, ...]:
        """The subsets this config builds: SUBSETS, plus the transfer subset when asked for."""
        return SUBSETS + ((TRANSFER_SUBSET,) if self.transfer_utts else ())

    @property
    def shares(self) -> tuple[float, float, float, float]:
        return (self.train_share, self.dev_clean_share, self.test_clean_share, self.test_other_share)


# --------------------------------------------------------------------------------------------
# Voices

@dataclass(frozen=True)
class Voice:
    engine: str
    name: str       # espeak-ng: "accent+variant"; flite: voice; festival: voice function suffix
    sex: str        # "F" / "M"
    base_f0: float  # typical F0 of the voice in Hz (to draw pitch targets around it)


_ESPEAK_ACCENTS_SEEN = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-us-nyc")
_ESPEAK_ACCENTS_UNSEEN = ("en-029", "en-gb-x-gbcwmd")
_F = "F"
_M = "M"
_ESPEAK_VARIANTS_SEEN = {
    "m1": _M, "m2": _M, "m3": _M, "m4": _M, "m5": _M, "m6": _M, "f1": _F, "f2": _F, "f3": _F, "f4": _F,
    "klatt": _M, "klatt2": _M, "klatt3": _M, "adam": _M, "Alex": _M, "Andy": _M, "Annie": _F,
    "aunty": _F, "benjamin": _M, "caleb": _M, "david": _M, "Denis": _M, "ed": _M, "edward": _M,
    "Gene": _M, "john": _M, "Lee": _M, "linda": _F, "max": _M, "Michael": _M, "paul": _M, "rob": _M,
    "steph": _F, "Alicia": _F, "belinda": _F,
}
_ESPEAK_VARIANTS_UNSEEN = {
    "m7": _M, "m8": _M, "f5": _F, "klatt4": _M, "klatt5": _M, "klatt6": _M, "grandpa": _M,
    "grandma": _F, "shelby": _F, "norbert": _M, "travis": _M, "victor": _M, "iven": _M, "Mike": _M,
    "quincy": _M, "Andrea": _F, "anika": _F, "croak": _M, "sandro": _M,
}
_FLITE_SEEN = (Voice("flite", "kal", _M, 100.0), Voice("flite", "kal16", _M, 100.0),
               Voice("flite", "awb", _M, 130.0), Voice("flite", "slt", _F, 170.0))
_FLITE_UNSEEN = (Voice("flite", "rms", _M, 110.0),)
_FESTIVAL_SEEN = (Voice("festival", "kal_diphone", _M, 105.0), Voice("festival", "cmu_us_slt_arctic_hts", _F, 170.0))
_FESTIVAL_UNSEEN = (Voice("festival", "ked_diphone", _M, 105.0),)


def _voice_pool(unseen: bool) -> dict[str, tuple[Voice, ...]]:
    accents = _ESPEAK_ACCENTS_UNSEEN if unseen else _ESPEAK_ACCENTS_SEEN
    variants = _ESPEAK_VARIANTS_UNSEEN if unseen else _ESPEAK_VARIANTS_SEEN
    espeak = tuple(Voice("espeak-ng", f"{a}+{v}", sex, 200.0 if sex == _F else 100.0)
                   for a in accents for v, sex in variants.items())
    return {"espeak-ng": espeak,
            "flite": _FLITE_UNSEEN if unseen else _FLITE_SEEN,
            "festival": _FESTIVAL_UNSEEN if unseen else _FESTIVAL_SEEN}


# --------------------------------------------------------------------------------------------
# Text

@dataclass(frozen=True)
class Chapter:
    id: int                 # book * 1000 + chapter number (Genesis 1 -> 1001)
    title: str              # "Genesis 1"
    verses: tuple[str, ...]


@dataclass(frozen=True)
class Segment:
    index: int              # position among the chapter's segments (the NNNN of the utterance id)
    tts: str                # text given to the TTS engine (mixed case, punctuation kept)
    text: str               # normalised transcript


@functools.lru_cache(maxsize=1)
def load_kjv() -> tuple[Chapter, ...]:
    """All 1189 KJV chapters from Debian's ``bible-kjv`` (``bible -l100000 'Gen1:1-Rev22:21'``)."""
    exe = shutil.which("bible")
    if exe is None:
        raise MiniCorpusError("the 'bible' command is missing: install Debian's bible-kjv package")
    out = subprocess.run([exe, "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise MiniCorpusError(f"'bible -l100000 Gen1:1-Rev22:21' failed: {out.stderr.strip()[:200]}")
    chapters: list[Chapter] = []
    books: list[str] = []
    title = None
    verses: list[str] = []
    verse_re = re.compile(r"^\s+(\d+) (.*\S)\s*$")

    def flush() -> None:
        if title is not None and verses:
            book, num = title.rsplit(" ", 1)
            if not books or books[-1] != book:
                books.append(book)
            chapters.append(Chapter(len(books) * 1000 + int(num), title, tuple(verses)))

    for line in out.stdout.splitlines():
        m = verse_re.match(line)
        if m:
            verses.append(m.group(2))
        elif line.strip():
            flush()
            title, verses = line.strip(), []
    flush()
    if len(chapters) < 100:
        raise MiniCorpusError(f"'bible' printed only {len(chapters)} chapters; is bible-kjv complete?")
    return tuple(chapters)


_WORD_RE = re.compile(r"[A-Za-z']+")


def normalise_text(text: str) -> str:
    """LibriSpeech-style transcript: upper case, apostrophes kept, other punctuation removed.

    Hyphens separate words (``God-ward`` -> ``GOD WARD``), as the TTS engines read them.
    """
    words = [w.strip("'") for w in _WORD_RE.findall(text.replace("-", " "))]
    return " ".join(w.upper() for w in words if w)


def tts_text(text: str) -> str:
    """Text for the engines: the same words as ``normalise_text`` with the prosodic punctuation kept.

    All-capital words (``LORD``) are title-cased so no engine spells them out letter by letter.
    """
    t = text.replace("--", ", ").replace("-", " ").replace("(", ", ").replace(")", ", ")
    out = []
    for tok in t.split():
        word = "".join(_WORD_RE.findall(tok))
        punct = tok[-1] if tok[-1] in ",;:.?!" else ""
        if not word.strip("'"):
            if punct and out and out[-1][-1] not in ",;:.?!":
                out[-1] += punct
            continue
        word = word.strip("'") if word.startswith("'") else word
        head, sep, tail = word.partition("'")
        if len(head) > 1 and head.isupper():  # LORD, LORD's
            word = head.capitalize() + sep + tail.lower()
        out.append(word + punct)
    s = " ".join(out)
    s = re.sub(r"([,;:.?!])[,;:.?!]+", r"\1", s)
    return s.strip(" ,")


_STRONG = ".?!"
_MEDIUM = ";:"


def _clauses(verse: str) -> list[tuple[str, str]]:
    """Split a verse after punctuation: ``[(piece, boundary)]``, boundary one of 'verse', '.', ';', ','."""
    pieces = [p for p in re.split(r"(?<=[,;:.?!])\s+", verse.strip()) if p]
    out = []
    for i, p in enumerate(pieces):
        last = p.rstrip(")")[-1:]
        kind = "verse" if i == len(pieces) - 1 else "." if last in _STRONG else ";" if last in _MEDIUM else ","
        out.append((p, kind))
    return out


_BREAK_PENALTY = {"verse": 0.0, ".": 0.0, ";": 6.0, ",": 20.0, "word": 45.0}
_DROP_PENALTY = 400.0


def segment_chapter(verses: Sequence[str], min_words: int, max_words: int) -> list[Segment]:
    """Cut a chapter into utterances of ``min_words``..``max_words`` words at punctuation.

    A dynamic programme over clauses picks the cut points: segments close to the middle length,
    cut preferably at verse and sentence ends, then at ';' / ':', then ','; a clause longer than
    ``max_words`` is cut between words. Clauses that fit in no segment (a lone very short verse
    between long ones) are left out, which costs more than any cut.
    """
    units: list[tuple[str, int, str]] = []   # (tts piece, word count, boundary after it)
    for verse in verses:
        for piece, kind in _clauses(verse):
            words = piece.split()
            n = len(normalise_text(piece).split())
            if n == 0:
                continue
            if n <= max_words:
                units.append((piece, n, kind))
                continue
            parts = math.ceil(n / max_words)
            size = math.ceil(len(words) / parts)
            chunks = [words[i:i + size] for i in range(0, len(words), size)]
            for j, c in enumerate(chunks):
                text = " ".join(c)
                units.append((text, len(normalise_text(text).split()), kind if j == len(chunks) - 1 else "word"))
    target = (min_words + max_words) / 2
    n = len(units)
    best = [0.0] + [math.inf] * n
    back: list[tuple[int, bool]] = [(0, False)] * (n + 1)
    for j in range(1, n + 1):
        # leave unit j-1 out
        cost = best[j - 1] + _DROP_PENALTY
        if cost < best[j]:
            best[j], back[j] = cost, (j - 1, False)
        words = 0
        for i in range(j - 1, -1, -1):
            words += units[i][1]
            if words > max_words:
                break
            if words < min_words:
                continue
            cost = best[i] + (words - target) ** 2 + _BREAK_PENALTY[units[j - 1][2]]
            if cost < best[j]:
                best[j], back[j] = cost, (i, True)
    segs: list[tuple[int, int]] = []
    j = n
    while j > 0:
        i, keep = back[j]
        if keep:
            segs.append((i, j))
        j = i
    segs.reverse()
    out = []
    for k, (i, j) in enumerate(segs):
        raw = " ".join(u[0] for u in units[i:j])
        out.append(Segment(k, tts_text(raw), normalise_text(raw)))
    return out


# --------------------------------------------------------------------------------------------
# Planning: who reads what, through which channel


@dataclass(frozen=True)
class SpeakerSpec:
    id: str
    subset: str
    index: int              # position among all speakers (seeds the speaker's random streams)
    voice: Voice
    pitch: float            # espeak-ng: -p value; flite/festival: target F0 in Hz; HTS: pitch ratio
    rate: float             # espeak-ng: words per minute; others: duration stretch
    word_gap: int           # espeak-ng -g (10 ms units)
    channel: dict = field(hash=False, compare=True)

    @property
    def description(self) -> str:
        v = self.voice
        if v.engine == "espeak-ng":
            tts = f"espeak-ng {v.name} pitch {self.pitch:.0f} rate {self.rate:.0f}wpm gap {self.word_gap}"
        elif v.name.endswith("_hts"):
            tts = f"festival {v.name} pitch x{self.pitch:.2f} stretch {self.rate:.2f}"
        else:
            tts = f"{v.engine} {v.name} f0 {self.pitch:.0f}Hz stretch {self.rate:.2f}"
        c = self.channel
        rev = f"reverb {c['reverberance']:.0f}%" if c["reverb"] else "no reverb"
        return (f"{tts}, channel: speed {c['speed']:.3f}, band {c['highpass']:.0f}-{c['lowpass']:.0f} Hz, {rev}, "
                f"noise a={c['noise_alpha']:.1f} SNR {c['snr_db']:.0f} dB")


@dataclass(frozen=True)
class UttSpec:
    id: str
    speaker: str
    chapter: int
    subset: str
    tts: str
    text: str
    oov: bool
    seed: tuple[int, ...]   # the utterance's own random stream


@dataclass(frozen=True)
class CorpusPlan:
    speakers: tuple[SpeakerSpec, ...]
    utts: tuple[UttSpec, ...]
    eval_chapters: frozenset[int]


def _draw_channel(rng: np.random.Generator, other: bool, cfg: MiniCorpusConfig) -> dict:
    snr = cfg.other_snr_db if other else cfg.clean_snr_db
    reverb = other or bool(rng.random() < cfg.clean_reverb_prob)
    rev_range = cfg.other_reverberance if other else cfg.clean_reverberance
    eq = [[float(np.exp(rng.uniform(np.log(200), np.log(4000)))), float(rng.uniform(0.6, 2.0)),
           float(rng.uniform(-8, 8))] for _ in range(2)]
    return {
        "speed": float(rng.uniform(*cfg.speed_range)),
        "highpass": float(rng.uniform(40, 250 if other else 150)),
        "lowpass": float(rng.uniform(2800, 5500) if other else rng.uniform(5000, 7800)),
        "eq": eq,
        "reverb": reverb,
        "reverberance": float(rng.uniform(*rev_range)),
        "hf_damping": float(rng.uniform(20, 80)),
        "room_scale": float(rng.uniform(50, 100) if other else rng.uniform(10, 60)),
        "pre_delay_ms": float(rng.uniform(0, 40 if other else 15)),
        "wet_gain_db": float(rng.uniform(-2, 3) if other else rng.uniform(-6, 0)),
        "snr_db": float(rng.uniform(*snr)),
        "snr_lo": float(snr[0]),
        "snr_hi": float(snr[1]),
        "noise_alpha": float(rng.uniform(0.0, 2.0)),
        "noise_mod_depth": float(rng.uniform(0.0, 0.6)),
        "noise_mod_hz": float(rng.uniform(0.1, 1.5)),
        "hum_hz": float(rng.choice([50.0, 60.0])) if rng.random() < (0.4 if other else 0.15) else 0.0,
        "hum_db": float(rng.uniform(-10, 0)),
        "level_dbfs": float(rng.uniform(*cfg.level_dbfs)),
        "pad_s": [float(cfg.pad_s[0]), float(cfg.pad_s[1])],
    }


def _draw_speaker(rng: np.random.Generator, spk_id: str, subset: str, index: int,
                  cfg: MiniCorpusConfig) -> SpeakerSpec:
    other = subset.endswith("-other")
    pool = _voice_pool(unseen=other)
    w = np.asarray(cfg.engine_weights, dtype=float)
    engine = ENGINES[int(rng.choice(len(ENGINES), p=w / w.sum()))]
    voices = pool[engine]
    voice = voices[int(rng.integers(len(voices)))]
    gap = 0
    if engine == "espeak-ng":
        pitch, rate = float(rng.uniform(25, 75)), float(rng.uniform(140, 195))
        gap = int(rng.choice([0, 0, 1, 2]))
    elif voice.name.endswith("_hts"):  # pitch: a ratio, applied as a speed change
        pitch, rate = float(2 ** (rng.uniform(-3, 3) / 12)), float(rng.uniform(0.85, 1.2))
    else:
        pitch, rate = float(voice.base_f0 * rng.uniform(0.8, 1.3)), float(rng.uniform(0.85, 1.2))
    return SpeakerSpec(spk_id, subset, index, voice, pitch, rate, gap, _draw_channel(rng, other, cfg))


def _subset_sizes(cfg: MiniCorpusConfig) -> list[int]:
    evals = [max(1, round(cfg.num_utts * s)) for s in cfg.shares[1:]]
    train = cfg.num_utts - sum(evals)
    if train < 1:
        raise ValueError(f"num_utts={cfg.num_utts} leaves no training utterances")
    return [train, *evals]


def plan_corpus(cfg: MiniCorpusConfig, lexicon: set[str] | None = None) -> CorpusPlan:
    """Decide every speaker, chapter and utterance text from ``cfg.seed`` alone (no synthesis).

    Dev/test speakers take their chapters first; training speakers take others, so no chapter is
    read in two subsets and the LM text can leave out every dev/test chapter. Training utterances
    have every word in ``lexicon`` (default: CMUdict); dev/test ones may hold OOV words for up to
    ``cfg.eval_oov_share`` of their utterances, spread evenly.
    """
    if lexicon is None:
        from asr.lexicon import load_cmudict

        lexicon = set(load_cmudict())
    chapters = load_kjv()
    rng = np.random.default_rng([cfg.seed, 0])
    order = [chapters[i] for i in rng.permutation(len(chapters))]
    sizes = _subset_sizes(cfg)
    n_spk = [min(cfg.train_speakers, sizes[0])] + [min(cfg.eval_speakers, s) for s in sizes[1:]]
    ids = (rng.choice(9900, size=sum(n_spk), replace=False) + 100).tolist()
    speakers: list[SpeakerSpec] = []
    utts: list[UttSpec] = []
    eval_chapters: set[int] = set()
    next_chapter = 0
    # Eval subsets first so their chapters are fixed by the seed before training takes its share.
    for si in (1, 2, 3, 0):
        subset = SUBSETS[si]
        k = n_spk[si]
        quotas = _even_split(sizes[si], k)
        first = sum(n_spk[:si])
        taken = oov_taken = 0
        for j in range(k):
            index = first + j
            spk = _draw_speaker(np.random.default_rng([cfg.seed, 1, index]), str(ids[index]), subset, index, cfg)
            speakers.append(spk)
            need = quotas[j]
            while need > 0:
                if next_chapter >= len(order):
                    raise MiniCorpusError(f"ran out of KJV chapters for {cfg.num_utts} utterances; "
                                          f"raise max_utts_per_chapter")
                chap = order[next_chapter]
                next_chapter += 1
                if si != 0:
                    eval_chapters.add(chap.id)
                got = 0
                for seg in segment_chapter(chap.verses, cfg.min_words, cfg.max_words):
                    if got >= min(need, cfg.max_utts_per_chapter):
                        break
                    oov = any(w not in lexicon for w in seg.text.split())
                    if oov and (si == 0 or oov_taken + 1 > cfg.eval_oov_share * (taken + 1)):
                        continue
                    uid = f"{spk.id}-{chap.id}-{seg.index:04d}"
                    utts.append(UttSpec(uid, spk.id, chap.id, subset, seg.tts, seg.text, oov,
                                        (cfg.seed, 2, index, chap.id, seg.index)))
                    got += 1
                    taken += 1
                    oov_taken += oov
                need -= got
    if cfg.transfer_utts:
        _plan_transfer(cfg, order[next_chapter:], set(ids), len(speakers), lexicon, speakers, utts)
    return CorpusPlan(tuple(speakers), tuple(utts), frozenset(eval_chapters))


def _even_split(total: int, k: int) -> list[int]:
    """``total`` utterances over ``k`` speakers as evenly as possible, the first ones one more."""
    return [total // k + (1 if j < total % k else 0) for j in range(k)]


def _plan_transfer(cfg: MiniCorpusConfig, chapters: Sequence[Chapter], used_ids: set[int], first_index: int,
                   lexicon: set[str], speakers: list[SpeakerSpec], utts: list[UttSpec]) -> None:
    """Add the transfer subset: ``transfer_speakers`` new training-like speakers (drawn from their
    own random streams, so the other subsets stay byte-identical) reading chapters nobody else
    reads (so no dev/test text)."""
    rng = np.random.default_rng([cfg.seed, 3])
    free = np.array(sorted(set(range(100, 10000)) - used_ids))
    k = min(cfg.transfer_speakers, cfg.transfer_utts)
    ids = rng.choice(free, size=k, replace=False).tolist()
    quotas = _even_split(cfg.transfer_utts, k)
    it = iter(chapters)
    for j in range(k):
        index = first_index + j
        spk = _draw_speaker(np.random.default_rng([cfg.seed, 1, index]), str(ids[j]), TRANSFER_SUBSET, index, cfg)
        speakers.append(spk)
        need = quotas[j]
        while need > 0:
            chap = next(it, None)
            if chap is None:
                raise MiniCorpusError(f"ran out of KJV chapters for {cfg.transfer_utts} transfer utterances")
            got = 0
            for seg in segment_chapter(chap.verses, cfg.min_words, cfg.max_words):
                if got >= min(need, cfg.max_utts_per_chapter):
                    break
                if any(w not in lexicon for w in seg.text.split()):
                    continue
                utts.append(UttSpec(f"{spk.id}-{chap.id}-{seg.index:04d}", spk.id, chap.id, TRANSFER_SUBSET,
                                    seg.tts, seg.text, False, (cfg.seed, 2, index, chap.id, seg.index)))
                got += 1
            need -= got


# --------------------------------------------------------------------------------------------
# Synthesis (runs in worker processes; everything it needs travels in the job)


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(cmd, capture_output=True, check=False, **kw)
    except FileNotFoundError:
        raise MiniCorpusError(f"{what}: command {cmd[0]!r} not found (install Debian's {cmd[0]} package)") from None
    if out.returncode != 0:
        err = out.stderr.decode(errors="replace") if isinstance(out.stderr, bytes) else out.stderr
        raise MiniCorpusError(f"{what}: {' '.join(cmd[:3])} ... failed (exit {out.returncode}): {err.strip()[-300:]}")
    return out


def _scm_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tts(spk: SpeakerSpec, jobs: list[tuple[UttSpec, float, float]], tmp: Path) -> list[Path]:
    """Synthesise each job's text to a wav in ``tmp``; ``jobs`` hold (utt, pitch jitter, rate jitter)."""
    v = spk.voice
    wavs = [tmp / f"{u.id}.wav" for u, _, _ in jobs]
    if v.engine == "espeak-ng":
        for (u, pj, rj), wav in zip(jobs, wavs):
            pitch = int(round(min(99, max(0, spk.pitch * pj))))
            rate = int(round(spk.rate * rj))
            _run(["espeak-ng", "-v", v.name, "-p", str(pitch), "-s", str(rate), "-g", str(spk.word_gap),
                  "-w", str(wav), u.tts], u.id)
    elif v.engine == "flite":
        for (u, pj, rj), wav in zip(jobs, wavs):
            _run(["flite", "-voice", v.name, "--setf", f"int_f0_target_mean={spk.pitch * pj:.1f}",
                  "--setf", f"duration_stretch={spk.rate * rj:.3f}", "-t", u.tts, "-o", str(wav)], u.id)
    else:
        lines = [f"(voice_{v.name})"]
        hts = v.name.endswith("_hts")
        for (u, pj, rj), wav in zip(jobs, wavs):
            if hts:  # pitch comes from the sox speed change; -r keeps the duration right
                speed = 1.0 / (spk.rate * rj * spk.pitch * pj)
                lines.append(f"(set! hts_engine_params (append {v.name}::hts_engine_params "
                             f"(list '(\"-r\" {speed:.4f}))))")
            else:
                lines.append(f"(Parameter.set 'Duration_Stretch {spk.rate * rj:.3f})")
                lines.append(f"(set! int_lr_params '((target_f0_mean {spk.pitch * pj:.1f}) (target_f0_std "
                             f"{0.15 * spk.pitch:.1f}) (model_f0_mean 170) (model_f0_std 34)))")
            lines.append(f"(utt.save.wave (utt.synth (Utterance Text {_scm_string(u.tts)})) "
                         f"{_scm_string(str(wav))} 'riff)")
        script = tmp / "synth.scm"
        script.write_text("\n".join(lines) + "\n", encoding="utf-8")
        _run(["festival", "--batch", str(script)], f"{spk.id} ({v.name})")
    for (u, _, _), wav in zip(jobs, wavs):
        if not wav.is_file() or wav.stat().st_size <= 44:
            raise MiniCorpusError(f"{u.id}: {v.engine} {v.name} wrote no audio for {u.tts!r}")
    return wavs


def _sox_channel(spk: SpeakerSpec, wav: Path, hts_jitter: tuple[float, float], what: str) -> np.ndarray:
    """Apply the speaker's deterministic channel with sox; float32 samples at 16 kHz."""
    c = spk.channel
    speed = c["speed"]
    if spk.voice.name.endswith("_hts"):
        speed *= spk.pitch * hts_jitter[0]
    fx = ["vol", "0.25", "speed", f"{speed:.4f}", "rate", "-h", str(SAMPLE_RATE),
           "highpass", f"{c['highpass']:.0f}", "lowpass", f"{c['lowpass']:.0f}"]
    for f, q, g in c["eq"]:
        fx += ["equalizer", f"{f:.0f}", f"{q:.2f}q", f"{g:.1f}"]
    if c["reverb"]:
        fx += ["reverb", f"{c['reverberance']:.0f}", f"{c['hf_damping']:.0f}", f"{c['room_scale']:.0f}", "100",
               f"{c['pre_delay_ms']:.0f}", f"{c['wet_gain_db']:.1f}"]
    out = _run(["sox", "-V1", "-D", str(wav), "-t", "raw", "-e", "floating-point", "-b", "32", "-L",
                "-c", "1", "-r", str(SAMPLE_RATE), "-", *fx], what)
    x = np.frombuffer(out.stdout, dtype="<f4").astype(np.float64)
    if x.size < SAMPLE_RATE // 10:
        raise MiniCorpusError(f"{what}: sox produced only {x.size} samples")
    return x


def _active_power(x: np.ndarray) -> float:
    """Mean power of the 20 ms frames within 30 dB of the loudest (a crude active speech level)."""
    n = len(x) // 320
    if n == 0:
        return float(np.mean(x ** 2)) + 1e-12
    p = np.mean(x[: n * 320].reshape(n, 320) ** 2, axis=1)
    return float(np.mean(p[p > p.max() * 1e-3])) + 1e-12


def _noise(n: int, c: dict, rng: np.random.Generator) -> np.ndarray:
    """Unit-power noise: 1/f^alpha colour, slow amplitude modulation, optional mains hum."""
    size = 1 << max(10, (n - 1).bit_length())  # a power of two keeps the FFT fast
    spec = np.fft.rfft(rng.standard_normal(size))
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0
    spec *= f ** (-c["noise_alpha"] / 2)
    spec[0] = 0.0
    x = np.fft.irfft(spec, size)[:n]
    t = np.arange(n) / SAMPLE_RATE
    x *= 1.0 + c["noise_mod_depth"] * np.sin(2 * np.pi * c["noise_mod_hz"] * t + rng.uniform(0, 2 * np.pi))
    x /= np.sqrt(np.mean(x ** 2)) + 1e-12
    if c["hum_hz"] > 0:
        phase = 2 * np.pi * c["hum_hz"] * t + rng.uniform(0, 2 * np.pi)
        hum = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.33 * np.sin(3 * phase)
        x += 10 ** (c["hum_db"] / 20) * hum / np.sqrt(np.mean(hum ** 2))
        x /= np.sqrt(np.mean(x ** 2))
    return x


def _render(spk: SpeakerSpec, u: UttSpec, wav: Path, rng: np.random.Generator,
            hts_jitter: tuple[float, float]) -> np.ndarray:
    c = spk.channel
    x = _sox_channel(spk, wav, hts_jitter, u.id)
    p_speech = _active_power(x)
    pad = (rng.uniform(*c["pad_s"], size=2) * SAMPLE_RATE).astype(int)
    x = np.concatenate([np.zeros(pad[0]), x, np.zeros(pad[1])])
    snr = float(np.clip(c["snr_db"] + rng.uniform(-3, 3), c["snr_lo"], c["snr_hi"]))
    x = x + _noise(len(x), c, rng) * math.sqrt(p_speech / 10 ** (snr / 10))
    level = c["level_dbfs"] + rng.uniform(-2, 2)
    x *= 10 ** (level / 20) / math.sqrt(p_speech)
    peak = float(np.max(np.abs(x)))
    if peak > 0.98:
        x *= 0.98 / peak
    return x.astype(np.float32)


def _synth_chunk(job: tuple[SpeakerSpec, list[UttSpec], str]) -> list[tuple[str, int]]:
    """Worker: synthesise a speaker's utterances not yet on disk; ``[(utt id, num samples)]``."""
    spk, utts, root = job
    todo = []
    for u in utts:
        path = _flac_path(Path(root), u)
        if not path.is_file():
            rng = np.random.default_rng(list(u.seed))
            pj, rj = rng.uniform(0.95, 1.05), rng.uniform(0.95, 1.05)
            todo.append((u, float(pj), float(rj), rng))
    if not todo:
        return []
    done = []
    with tempfile.TemporaryDirectory(prefix="minicorpus-") as tmp:
        wavs = _tts(spk, [(u, pj, rj) for u, pj, rj, _ in todo], Path(tmp))
        for (u, pj, rj, rng), wav in zip(todo, wavs):
            y = _render(spk, u, wav, rng, (pj, rj))
            path = _flac_path(Path(root), u)
            with atomic_path(path) as tmp_path:
                sf.write(str(tmp_path), y, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            done.append((u.id, int(y.shape[0])))
    return done


def _flac_path(root: Path, u: UttSpec) -> Path:
    return root / u.subset / u.speaker / str(u.chapter) / f"{u.id}.flac"


# --------------------------------------------------------------------------------------------
# Building


_SPEAKERS_HEADER = """\
; Speakers of the synthetic mini corpus, in the format of LibriSpeech's SPEAKERS.TXT.
; SEX: 'F' for female, 'M' for male (of the voice)
; SUBSET: the corpus subset the speaker's utterances are in
; MINUTES: the total duration of the speaker's utterances, in minutes
; NAME: the engine, voice, prosody and channel that make up the speaker
;ID  |SEX| SUBSET           |MINUTES| NAME
"""


def _lm_text(chapters: Sequence[Chapter], exclude: frozenset[int], eval_texts: frozenset[str]) -> str:
    """One normalised sentence per line, from every chapter not read in dev or test.

    Formulas recur across the Bible ("AND THE WORD OF THE LORD CAME UNTO ME SAYING"), so a line
    identical to a dev/test transcript is dropped too: the LM must not have seen a test sentence.
    """
    lines = []
    for chap in chapters:
        if chap.id in exclude:
            continue
        for verse in chap.verses:
            for sent in re.split(r"(?<=[.?!])\s+", verse):
                t = normalise_text(sent)
                if t and t not in eval_texts:
                    lines.append(t)
    return "\n".join(lines) + "\n"


def _readme(cfg: MiniCorpusConfig, stats: dict) -> str:
    rows = "\n".join(f"  {s:<12} {d['num_utts']:>6} utts {d['num_speakers']:>4} speakers {d['hours']:7.3f} h "
                     f"{d['oov_utts']:>4} utts with an OOV word" for s, d in stats["subsets"].items())
    return f"""Synthetic mini corpus in the LibriSpeech layout (built by data_prep.mini_corpus, seed {cfg.seed})

{rows}

How it was made
- Text: King James Bible (Debian bible-kjv). Each speaker reads one or more chapters (chapter id =
  book * 1000 + chapter, so 1001 is Genesis 1), cut into utterances of {cfg.min_words}-{cfg.max_words} words at
  punctuation. Transcripts are upper case with apostrophes kept and other punctuation removed.
- Training utterances contain only words in CMUdict; dev/test keep up to {cfg.eval_oov_share:.0%} of utterances
  with an out-of-vocabulary word (counted above).
- Speakers (disjoint across subsets) are a TTS engine and voice (espeak-ng accents x variants, flite
  kal/kal16/awb/slt, festival kal_diphone/cmu_us_slt_arctic_hts) with their own pitch and rate, plus a
  channel: sox speed change {cfg.speed_range[0]}-{cfg.speed_range[1]}, high/low-pass band limits, two EQ bands,
  reverberation for {cfg.clean_reverb_prob:.0%} of clean speakers, then numpy noise (1/f^a colour, slow
  modulation, sometimes mains hum) at {cfg.clean_snr_db[0]:.0f}-{cfg.clean_snr_db[1]:.0f} dB SNR and a level
  of {cfg.level_dbfs[0]:.0f} to {cfg.level_dbfs[1]:.0f} dBFS.
- test-other uses voices never used in the other subsets (espeak-ng accents en-029 and
  en-gb-x-gbcwmd with unseen variants, flite rms, festival ked_diphone), always reverberant, narrower
  bands and {cfg.other_snr_db[0]:.0f}-{cfg.other_snr_db[1]:.0f} dB SNR.
- lm_text.txt: one normalised sentence per line from every chapter not read in dev or test, less
  any line identical to a dev/test transcript.
- SPEAKERS.TXT names each speaker's engine, voice and channel; corpus_info.json has all parameters;
  config.yaml the configuration. The same seed gives byte-identical files.
"""


def _check_tools(engines: set[str]) -> None:
    missing = [t for t in ["sox", *sorted(engines)] if shutil.which(t) is None]
    if missing:
        raise MiniCorpusError(f"missing command(s) {missing}: install the Debian package(s) of the same name")


def _jobs(plan: CorpusPlan, root: Path) -> list[tuple[SpeakerSpec, list[UttSpec], str]]:
    by_spk: dict[str, list[UttSpec]] = {}
    for u in plan.utts:
        by_spk.setdefault(u.speaker, []).append(u)
    jobs = []
    for spk in plan.speakers:
        utts = by_spk.get(spk.id, [])
        size = 32 if spk.voice.engine == "festival" else 6
        for i in range(0, len(utts), size):
            jobs.append((spk, utts[i:i + size], str(root)))
    # Slow engines first so the pool ends evenly; the order does not change any file.
    cost = {"festival": 3.0, "flite": 1.5, "espeak-ng": 1.0}
    jobs.sort(key=lambda j: -cost[j[0].voice.engine] * len(j[1]))
    return jobs


def build_mini_corpus(out_dir: str | os.PathLike, cfg: MiniCorpusConfig = MiniCorpusConfig(), nj: int = 1) -> Path:
    """Build (or finish building) the corpus in ``out_dir``; return ``out_dir``.

    Resumable: utterances already on disk are kept (a rerun of a finished corpus only rewrites its
    small text files). An ``out_dir`` started with a different config is an error rather than a
    silent mix of two corpora.
    """
    root = Path(out_dir).resolve()
    cfg_path = root / "config.yaml"
    if cfg_path.is_file():
        old = load_config(MiniCorpusConfig, cfg_path)
        if config_hash(old) != config_hash(cfg):
            raise MiniCorpusError(f"{root} holds a corpus built with another config ({cfg_path}); "
                                  f"use a new --out-dir or delete it")
    plan = plan_corpus(cfg)
    _check_tools({s.voice.engine for s in plan.speakers})
    root.mkdir(parents=True, exist_ok=True)
    write_config(cfg, root)
    jobs = _jobs(plan, root)
    from tqdm import tqdm

    todo = sum(not _flac_path(root, u).is_file() for u in plan.utts)
    log.info("%d utterances planned, %d to synthesise, %d processes", len(plan.utts), todo, nj)
    bar = tqdm(total=len(plan.utts), desc="synthesising", unit="utt", mininterval=2)
    if nj <= 1:
        for job in jobs:
            _synth_chunk(job)
            bar.update(len(job[1]))
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=nj, mp_context=ctx) as pool:
            futures = {pool.submit(_synth_chunk, job): job for job in jobs}
            for fut in cf.as_completed(futures):
                fut.result()
                bar.update(len(futures[fut][1]))
    bar.close()
    return _finish(root, cfg, plan)


def _finish(root: Path, cfg: MiniCorpusConfig, plan: CorpusPlan) -> Path:
    """Write transcripts, SPEAKERS.TXT, lm_text.txt, README and corpus_info.json, then ``.done``."""
    samples = {u.id: sf.info(str(_flac_path(root, u))).frames for u in plan.utts}
    by_chapter: dict[tuple[str, str, int], list[UttSpec]] = {}
    for u in plan.utts:
        by_chapter.setdefault((u.subset, u.speaker, u.chapter), []).append(u)
    for (subset, spk, chap), utts in by_chapter.items():
        lines = "".join(f"{u.id} {u.text}\n" for u in sorted(utts, key=lambda x: x.id))
        atomic_write_text(root / subset / spk / str(chap) / f"{spk}-{chap}.trans.txt", lines)
    minutes: dict[str, float] = {}
    for u in plan.utts:
        minutes[u.speaker] = minutes.get(u.speaker, 0.0) + samples[u.id] / SAMPLE_RATE / 60
    rows = [f"{s.id:<5}| {s.voice.sex} | {s.subset:<16} | {minutes.get(s.id, 0.0):5.2f} | {s.description}"
            for s in sorted(plan.speakers, key=lambda s: int(s.id))]
    atomic_write_text(root / "SPEAKERS.TXT", _SPEAKERS_HEADER + "\n".join(rows) + "\n")
    eval_texts = frozenset(u.text for u in plan.utts if u.subset not in (SUBSETS[0], TRANSFER_SUBSET))
    atomic_write_text(root / "lm_text.txt", _lm_text(load_kjv(), plan.eval_chapters, eval_texts))
    stats: dict = {"seed": cfg.seed, "subsets": {}, "speakers": {}}
    for subset in cfg.subsets:
        utts = [u for u in plan.utts if u.subset == subset]
        stats["subsets"][subset] = {
            "num_utts": len(utts),
            "num_speakers": len({u.speaker for u in utts}),
            "hours": round(sum(samples[u.id] for u in utts) / SAMPLE_RATE / 3600, 4),
            "num_words": sum(len(u.text.split()) for u in utts),
            "oov_utts": sum(u.oov for u in utts),
        }
    for s in plan.speakers:
        stats["speakers"][s.id] = {"subset": s.subset, "sex": s.voice.sex, "engine": s.voice.engine,
                                   "voice": s.voice.name, "pitch": s.pitch, "rate": s.rate,
                                   "word_gap": s.word_gap,
                                   "channel": s.channel}
    stats["eval_chapters"] = sorted(plan.eval_chapters)
    atomic_write_json(root / "corpus_info.json", stats)
    atomic_write_text(root / "README", _readme(cfg, stats))
    mark_done(root, {k: v["num_utts"] for k, v in stats["subsets"].items()})
    return root


# --------------------------------------------------------------------------------------------
# CLI


def _cli(args: argparse.Namespace) -> int:
    overrides = parse_kv(args.override)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.num_utts is not None:
        overrides["num_utts"] = args.num_utts
    if args.transfer_utts is not None:
        overrides["transfer_utts"] = args.transfer_utts
    cfg = load_config(MiniCorpusConfig, args.config, overrides)
    exit_if_print_config(args, cfg)
    log.info("config: %s", json.dumps(config_to_dict(cfg)))
    build_mini_corpus(args.out_dir, cfg, nj=args.nj)
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("build-mini-corpus", help="synthesise the TTS mini corpus in the LibriSpeech layout",
                              description="Build the synthetic KJV/TTS corpus (docs/DESIGN.md section 5).")
    p.add_argument("--out-dir", required=True, help="corpus folder, e.g. exp/mini/corpus")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: config's)")
    p.add_argument("--num-utts", type=int, default=None, help="number of utterances (default: config's)")
    p.add_argument("--transfer-utts", type=int, default=None,
                   help=f"utterances of the unlabelled {TRANSFER_SUBSET} subset for distillation (default: config's)")
    p.add_argument("--nj", type=int, default=1, help="parallel synthesis processes")
    p.add_argument("--config", default=None, help="YAML file of MiniCorpusConfig fields")
    p.add_argument("override", nargs="*", help="key=value config overrides")
    add_print_config_arg(p)
    p.set_defaults(func=_cli)
