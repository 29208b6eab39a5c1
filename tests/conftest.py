"""Shared pytest fixtures: tiny corpora written inside each test's tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

# The system programs the project needs (scripts/setup.sh installs them with apt-get): program ->
# its Debian package. A missing one fails the tests that need it instead of skipping them, so CI
# cannot pass without them.
SYSTEM_TOOLS = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival", "sox": "sox", "flac": "flac"}


def require_tool(program: str) -> str:
    """The path of ``program``; a test failure naming the package and how to install it when it
    is missing (never a skip)."""
    path = shutil.which(program)
    if path is None:
        pkg = SYSTEM_TOOLS.get(program, program)
        pytest.fail(f"{program} is not installed: `sudo apt-get install {pkg}` (or `bash scripts/setup.sh`, "
                    f"which installs every system package the project needs)", pytrace=False)
    return path


def write_flac(path: Path, seconds: float = 0.5, sample_rate: int = 16000, seed: int = 0) -> Path:
    """A short FLAC of a tone plus noise (distinct per seed)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * (150 + 10 * seed) * t) + 0.01 * rng.standard_normal(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x.astype(np.float32), sample_rate, format="FLAC", subtype="PCM_16")
    return path


SPEAKERS_TXT = """\
; A tiny corpus in the LibriSpeech layout
;ID  |SEX| SUBSET           |MINUTES| NAME
19   | F | dev-clean        | 0.05 | Kara Shallenberg
26   | M | dev-clean        | 0.05 | |CBW|Simon
"""


def make_librispeech(root: Path, subset: str = "dev-clean",
                     layout: dict[str, dict[str, list[str]]] | None = None) -> Path:
    """Write ``root/<subset>/<reader>/<chapter>/...`` with one FLAC and transcript line per utterance.

    ``layout`` maps reader -> chapter -> transcripts (default: 2 readers x 1 chapter x 3 lines).
    Returns ``root``.
    """
    layout = layout or {
        "19": {"198": ["HELLO WORLD", "THE QUICK BROWN FOX", "IT'S A TEST"]},
        "26": {"495": ["ONE TWO THREE", "FOUR FIVE", "SIX"]},
    }
    seed = 0
    for reader, chapters in layout.items():
        for chapter, texts in chapters.items():
            d = root / subset / reader / chapter
            lines = []
            for i, text in enumerate(texts):
                uid = f"{reader}-{chapter}-{i:04d}"
                write_flac(d / f"{uid}.flac", seconds=0.3 + 0.1 * i, seed=seed)
                seed += 1
                lines.append(f"{uid} {text}\n")
            (d / f"{reader}-{chapter}.trans.txt").write_text("".join(lines), encoding="utf-8")
    (root / "SPEAKERS.TXT").write_text(SPEAKERS_TXT, encoding="utf-8")
    return root


@pytest.fixture
def tiny_librispeech(tmp_path: Path) -> Path:
    """A 6-utterance ``dev-clean`` corpus under ``tmp_path/corpus``."""
    return make_librispeech(tmp_path / "corpus")
