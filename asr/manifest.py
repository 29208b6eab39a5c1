"""Utterance manifests: one typed record per utterance, stored sorted by id as JSON lines.

A manifest is the only thing later stages read about a data set, so it is validated when it is
made and when it is read: every error names the utterance id and the file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from asr.io import read_jsonl, write_jsonl

__all__ = ["Utterance", "read_manifest", "write_manifest", "ManifestError"]


class ManifestError(ValueError):
    """A manifest or the corpus behind it is inconsistent; the message names the id and file."""


@dataclass(frozen=True)
class Utterance:
    id: str            # LibriSpeech style: SPEAKER-CHAPTER-NNNN
    speaker: str
    chapter: str
    audio: str         # absolute path to the audio file
    num_samples: int
    sample_rate: int
    text: str          # normalised transcript: upper-case words separated by single spaces

    def __post_init__(self) -> None:
        if not self.id or any(c.isspace() for c in self.id):
            raise ManifestError(f"bad utterance id {self.id!r}")
        if self.num_samples <= 0:
            raise ManifestError(f"{self.id}: no samples in {self.audio}")
        if self.sample_rate <= 0:
            raise ManifestError(f"{self.id}: bad sample rate {self.sample_rate} in {self.audio}")

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def words(self) -> list[str]:
        return self.text.split()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["duration"] = round(self.duration, 4)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Utterance":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def write_manifest(path: str | os.PathLike, utts: list[Utterance]) -> None:
    ids = [u.id for u in utts]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ManifestError(f"{path}: duplicate utterance ids {dup}")
    write_jsonl(path, (u.to_dict() for u in sorted(utts, key=lambda u: u.id)))


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist (run data preparation first)")
    utts = []
    for i, d in enumerate(read_jsonl(path)):
        try:
            utts.append(Utterance.from_dict(d))
        except (TypeError, ManifestError) as e:
            raise ManifestError(f"{path}: line {i + 1}: {e}") from None
    return utts
