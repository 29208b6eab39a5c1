"""Split one prepared subset by speaker into disjoint sets (e.g. train / dev / test), deterministically.

Copies of mini-LibriSpeech often hold ``train-clean-5`` but not ``dev-clean-2``; a recipe still
needs a dev set (to tune acwt and pick the temperature) and a test set on speakers it never saw.
Splitting by speaker, never by utterance, keeps every reader's voice in exactly one set, as in
LibriSpeech's own subsets.

The order of speakers is a seeded hash of their id (not the file system's order), so the same
spec and seed give the same split on every machine. When SPEAKERS.TXT gives the readers' sex, the
speakers of each sex are ordered separately and each part takes its share of each sex (smallest
part first), so dev and test are balanced by sex where the counts allow.

Spec (``prepare-librispeech --split``)::

    train-clean-5:train=20,dev=4,test=4          # speaker counts (may leave speakers unused)
    train-clean-5:train=0.7,dev=0.15,test=0.15   # fractions of the speakers (sum <= 1)

Outputs, beside the subset's own folder: ``<part>/manifest.jsonl``, ``<part>/speakers.json``,
``<part>/.done`` for each part, and ``<subset>/split.json`` (which speaker went where).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from asr.io import atomic_write_json, mark_done
from asr.manifest import read_manifest, write_manifest

__all__ = ["SplitError", "SplitSpec", "parse_split", "part_sizes", "assign_speakers", "split_subset"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class SplitError(ValueError):
    """A bad split spec or a split the subset cannot satisfy; the message names both."""


@dataclass(frozen=True)
class SplitSpec:
    """Which subset to split and into what: ``parts`` is ``((name, count or fraction), ...)``."""

    subset: str
    parts: tuple[tuple[str, float], ...]
    seed: int = 0

    @property
    def fractions(self) -> bool:
        return any(not float(v).is_integer() or v < 1 for _, v in self.parts)


def parse_split(spec: str, seed: int = 0) -> SplitSpec:
    """Parse ``SUBSET:NAME=N,NAME=N,...`` (all counts, or all fractions in (0, 1])."""
    subset, sep, rest = spec.partition(":")
    if not sep or not subset or not rest:
        raise SplitError(f"--split {spec!r}: expected SUBSET:NAME=N,NAME=N,... (e.g. train-clean-5:train=20,dev=4,test=4)")
    parts: list[tuple[str, float]] = []
    for item in rest.split(","):
        name, eq, value = item.partition("=")
        if not eq or not _NAME.match(name):
            raise SplitError(f"--split {spec!r}: bad part {item!r} (expected NAME=N with a plain folder name)")
        try:
            v = float(value)
        except ValueError:
            raise SplitError(f"--split {spec!r}: {name}={value!r} is not a number") from None
        if not v > 0:
            raise SplitError(f"--split {spec!r}: {name} must get more than 0 speakers")
        parts.append((name, v))
    names = [n for n, _ in parts]
    if len(set(names)) != len(names) or subset in names:
        raise SplitError(f"--split {spec!r}: part names must be distinct and differ from the subset {subset!r}")
    out = SplitSpec(subset, tuple(parts), seed)
    if out.fractions:
        if any(v > 1 for _, v in parts):
            raise SplitError(f"--split {spec!r}: mix of counts and fractions; give all counts or all fractions")
        if sum(v for _, v in parts) > 1 + 1e-9:
            raise SplitError(f"--split {spec!r}: fractions sum to more than 1")
    return out


def _largest_remainder(total: int, weights: list[float], caps: list[int] | None = None) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total`` (each <= its cap)."""
    caps = caps or [total] * len(weights)
    wsum = sum(weights) or 1.0
    exact = [total * w / wsum for w in weights]
    out = [min(int(x), c) for x, c in zip(exact, caps)]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    while sum(out) < total:
        grown = False
        for i in order:
            if sum(out) < total and out[i] < caps[i]:
                out[i] += 1
                grown = True
        if not grown:
            break
    return out


def part_sizes(spec: SplitSpec, num_speakers: int) -> dict[str, int]:
    """Speakers per part: the counts as given, or fractions of ``num_speakers`` (each part >= 1)."""
    names = [n for n, _ in spec.parts]
    if spec.fractions:
        total = round(num_speakers * sum(v for _, v in spec.parts))
        sizes = _largest_remainder(total, [v for _, v in spec.parts])
        sizes = [max(1, s) for s in sizes]
    else:
        sizes = [int(v) for _, v in spec.parts]
    if sum(sizes) > num_speakers:
        raise SplitError(f"split of {spec.subset}: {dict(zip(names, sizes))} needs {sum(sizes)} speakers, "
                         f"the subset has {num_speakers}")
    return dict(zip(names, sizes))


def _order_key(seed: int, speaker: str) -> str:
    return hashlib.sha1(f"{seed}:{speaker}".encode()).hexdigest()


def assign_speakers(sexes: dict[str, str], sizes: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """``{part: [speakers]}``: each part takes its share of every sex; smallest parts pick first.

    ``sexes`` maps every speaker to its sex (any label; unknown ones share one group).
    """
    groups: dict[str, list[str]] = {}
    for spk in sorted(sexes, key=lambda s: _order_key(seed, s)):
        groups.setdefault(sexes[spk], []).append(spk)
    labels = sorted(groups)
    out: dict[str, list[str]] = {}
    order = sorted(sizes, key=lambda n: (sizes[n], list(sizes).index(n)))
    for name in order:
        remaining = [len(groups[g]) for g in labels]
        quota = _largest_remainder(sizes[name], [float(r) for r in remaining], caps=remaining)
        picked: list[str] = []
        for g, q in zip(labels, quota):
            picked += groups[g][:q]
            groups[g] = groups[g][q:]
        out[name] = sorted(picked)
    return {n: out[n] for n in sizes}


def split_subset(data_dir: str | os.PathLike, spec: SplitSpec,
                 speakers_table: dict[str, dict] | None = None) -> dict[str, Path]:
    """Write ``data_dir/<part>/manifest.jsonl`` for each part of ``spec`` from ``data_dir/<subset>``.

    ``speakers_table``: SPEAKERS.TXT as ``read_speakers`` returns it (for the sex balance and each
    part's ``speakers.json``). Returns ``{part: manifest path}``.
    """
    data_dir = Path(data_dir)
    src = data_dir / spec.subset / "manifest.jsonl"
    utts = read_manifest(src)
    table = speakers_table or {}
    speakers = sorted({u.speaker for u in utts})
    sexes = {s: table.get(s, {}).get("sex", "?") for s in speakers}
    sizes = part_sizes(spec, len(speakers))
    parts = assign_speakers(sexes, sizes, spec.seed)
    summary: dict = {"subset": spec.subset, "seed": spec.seed, "parts": {}}
    out: dict[str, Path] = {}
    for name, spks in parts.items():
        chosen = set(spks)
        part_utts = [u for u in utts if u.speaker in chosen]
        d = data_dir / name
        (d / ".done").unlink(missing_ok=True)
        write_manifest(d / "manifest.jsonl", part_utts)
        atomic_write_json(d / "speakers.json", {s: table[s] for s in spks if s in table})
        hours = sum(u.duration for u in part_utts) / 3600
        info = {"from": spec.subset, "speakers": spks, "num_utts": len(part_utts), "hours": round(hours, 4),
                "sexes": {g: sum(sexes[s] == g for s in spks) for g in sorted(set(sexes.values()))}}
        mark_done(d, info)
        summary["parts"][name] = info
        out[name] = d / "manifest.jsonl"
        log.info("%s: %d speakers (%s), %d utterances, %.2f h from %s", name, len(spks),
                 ", ".join(f"{k} {v}" for k, v in info["sexes"].items()), len(part_utts), hours, spec.subset)
    unused = sorted(set(speakers) - {s for v in parts.values() for s in v})
    summary["unused_speakers"] = unused
    if unused:
        log.info("%s: %d speaker(s) in no part: %s", spec.subset, len(unused), " ".join(unused))
    atomic_write_json(data_dir / spec.subset / "split.json", summary)
    return out
