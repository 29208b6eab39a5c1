"""LibriSpeech: resumable, checksum-verified download and preparation of per-subset manifests.

The layout read here is LibriSpeech's own (and the synthetic mini corpus's)::

    <corpus>/<subset>/<reader>/<chapter>/<reader>-<chapter>-<NNNN>.flac
    <corpus>/<subset>/<reader>/<chapter>/<reader>-<chapter>.trans.txt
    <corpus>/SPEAKERS.TXT            (';' comment header, then ID | SEX | SUBSET | MINUTES | NAME)

Every audio file must have exactly one transcript line and every line an audio file; every file is
decoded once (over ``nj`` processes) so a corrupt or truncated FLAC is caught here and not in the
middle of feature extraction. Problems stop the stage with an error naming each file, unless
``skip_bad`` is set, in which case they are listed in ``bad_utts.txt`` beside the manifest.

Example::

    asr download-librispeech --target-dir /data --subsets dev-clean,test-clean
    asr prepare-librispeech --corpus-dir /data/LibriSpeech --subsets dev-clean,test-clean \\
        --out-dir exp/librispeech/data --nj 2
    # a copy with train-clean-5 only: split it by speaker (data_prep/speaker_split.py)
    asr prepare-librispeech --corpus-dir /data/LibriSpeech --split train-clean-5:train=20,dev=4,test=4 \\
        --out-dir exp/mini_librispeech/data
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import hashlib
import http.client
import logging
import multiprocessing
import os
import re
import socket
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from asr.audio import AudioError, read_audio
from asr.config import config_hash, load_config, write_config
from asr.io import atomic_write_json, atomic_write_text, is_done, mark_done, read_json
from asr.manifest import Utterance, write_manifest

__all__ = [
    "SLR12_URL",
    "SLR11_URL",
    "SLR31_URL",
    "LIBRISPEECH_MD5",
    "MINI_LIBRISPEECH_MD5",
    "LM_FILES",
    "CorpusError",
    "DownloadError",
    "PrepConfig",
    "download_file",
    "download_librispeech",
    "find_subsets",
    "read_speakers",
    "scan_subset",
    "prepare_subset",
    "prepare_librispeech",
    "add_cli",
]

log = logging.getLogger(__name__)

SLR12_URL = "https://www.openslr.org/resources/12"
SLR11_URL = "https://www.openslr.org/resources/11"
SLR31_URL = "https://www.openslr.org/resources/31"

# md5 of the OpenSLR SLR12 archives (<subset>.tar.gz).
LIBRISPEECH_MD5: dict[str, str] = {
    "dev-clean": "42e2234ba48799c1f50f24a7926300a1",
    "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
    "test-clean": "32fa31d27d2e1cad72775fee3f4849a9",
    "test-other": "fb5a50374b501bb3bac4815ee91d3135",
    "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
    "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
    "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
}

# md5 of the OpenSLR SLR31 (mini-LibriSpeech) archives, as published with the resource and used by
# other toolkits' mini_librispeech downloaders; fetched from SLR31_URL, not SLR12_URL.
MINI_LIBRISPEECH_MD5: dict[str, str] = {
    "train-clean-5": "5df7d4e78065366204ca6845bb08f490",
    "dev-clean-2": "6d7ab67ac6a1d2c993d050e16d61080d",
}

# Resource 11 files fetched with ``with_lm`` (those Kaldi's egs/librispeech/s5 uses).
LM_FILES: tuple[str, ...] = (
    "librispeech-lexicon.txt",
    "librispeech-vocab.txt",
    "3-gram.pruned.3e-7.arpa.gz",
    "3-gram.pruned.1e-7.arpa.gz",
    "3-gram.arpa.gz",
    "4-gram.arpa.gz",
)

SAMPLE_RATE = 16000
_CHUNK = 1 << 20
_TEXT_OK = re.compile(r"^[A-Z']+( [A-Z']+)*$")


class CorpusError(ValueError):
    """The corpus on disk is inconsistent or holds unusable files; the message names each one."""


class DownloadError(RuntimeError):
    """A download failed or its checksum does not match; the message names the file."""


# --------------------------------------------------------------------------------------------
# Download


def _md5_of(path: Path, h: "hashlib._Hash | None" = None) -> "hashlib._Hash":
    h = h or hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h


def _verified_marker(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.md5ok")


def download_file(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    backoff_s: float = 1.0,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial file with HTTP Range.

    A completed file is only renamed to ``dest`` after its md5 (when given) matches; on a mismatch
    the partial file is removed (a rerun starts afresh) and ``DownloadError`` says what was expected.
    Network errors are retried ``retries`` times, each resuming where the last one stopped. A file
    already verified (marker ``.<name>.md5ok`` with the same size and md5) is not read again.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    marker = _verified_marker(dest)
    if dest.is_file():
        if md5 is None:
            return dest
        if marker.is_file() and marker.read_text().split() == [md5, str(dest.stat().st_size)]:
            return dest
        got = _md5_of(dest).hexdigest()
        if got == md5:
            atomic_write_text(marker, f"{md5} {dest.stat().st_size}\n")
            return dest
        raise DownloadError(f"{dest}: md5 {got} does not match the expected {md5}; "
                            f"delete the file and rerun to download it again")
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _fetch_into(url, part, timeout, progress)
            break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, OSError) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code != 416 and 400 <= e.code < 500:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                raise DownloadError(f"{url}: download interrupted after {have} bytes ({e}); "
                                    f"rerun to resume from {part}") from None
            log.warning("%s: %s; retry %d/%d from byte %d", url, e, attempt, retries, have)
            time.sleep(min(backoff_s * 2.0 ** (attempt - 1), 30.0))
    if md5 is not None:
        got = _md5_of(part).hexdigest()
        if got != md5:
            part.unlink()
            raise DownloadError(f"{dest.name}: md5 {got} does not match the expected {md5} "
                                f"(downloaded from {url}); the partial file was removed, rerun to retry")
    os.replace(part, dest)
    if md5 is not None:
        atomic_write_text(marker, f"{md5} {dest.stat().st_size}\n")
    return dest


def _fetch_into(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (which may already hold a prefix)."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the part file is complete
            return
        raise
    with resp:
        if have and resp.status != 206:
            log.warning("%s: server ignored the range request; downloading from the start", url)
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], leave=False)
        try:
            with open(part, mode) as f:
                while True:
                    block = resp.read(_CHUNK)
                    if not block:
                        break
                    f.write(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
    size = part.stat().st_size
    if total is not None and size < total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def _extract(archive: Path, target_dir: Path) -> None:
    """Unpack a tar archive safely (no absolute paths, links or devices outside ``target_dir``)."""
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(target_dir, filter="data")
        except TypeError:  # Python without extraction filters
            root = target_dir.resolve()
            for m in tar.getmembers():
                if not (root / m.name).resolve().is_relative_to(root) or m.issym() or m.islnk():
                    raise DownloadError(f"{archive}: unsafe member {m.name!r}") from None
            tar.extractall(target_dir)


def _read_md5sum(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def download_librispeech(
    target_dir: str | os.PathLike,
    subsets: Sequence[str],
    with_lm: bool = True,
    base_url: str = SLR12_URL,
    lm_base_url: str = SLR11_URL,
    lm_files: Sequence[str] = LM_FILES,
    mini_base_url: str = SLR31_URL,
    md5s: dict[str, str] | None = None,
    extract: bool = True,
    keep_archives: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Download (and unpack) LibriSpeech subsets into ``target_dir``; return ``target_dir/LibriSpeech``.

    Archives are verified against ``md5s`` (default: the known SLR12 and SLR31 checksums; the
    mini-LibriSpeech subsets ``train-clean-5`` / ``dev-clean-2`` come from ``mini_base_url``). Resource-11 files
    (lexicon, ARPA LMs) go to ``target_dir/lm`` and are verified against the resource's own
    ``md5sum.txt``, fetched first. Every step is resumable: partial files continue with HTTP Range,
    finished archives are not fetched again, unpacked subsets are marked ``.<subset>.extracted``.
    """
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    known = dict({**LIBRISPEECH_MD5, **MINI_LIBRISPEECH_MD5} if md5s is None else md5s)
    unknown = [s for s in subsets if s not in known]
    if unknown:
        raise DownloadError(f"unknown LibriSpeech subset(s) {unknown}; known: {', '.join(sorted(known))}")
    for subset in subsets:
        marker = target_dir / f".{subset}.extracted"
        if marker.is_file():
            log.info("%s: already downloaded and unpacked", subset)
            continue
        url = mini_base_url if subset in MINI_LIBRISPEECH_MD5 else base_url
        archive = download_file(f"{url.rstrip('/')}/{subset}.tar.gz", target_dir / f"{subset}.tar.gz",
                                md5=known[subset], retries=retries, timeout=timeout)
        if extract:
            log.info("unpacking %s", archive)
            _extract(archive, target_dir)
            atomic_write_text(marker, known[subset] + "\n")
            if not keep_archives:
                archive.unlink()
    if with_lm:
        lm_dir = target_dir / "lm"
        sums_path = lm_dir / "md5sum.txt"
        sums: dict[str, str] = {}
        try:
            sums_path.unlink(missing_ok=True)  # always fetch the current list
            download_file(f"{lm_base_url.rstrip('/')}/md5sum.txt", sums_path, retries=retries,
                          timeout=timeout, progress=False)
            sums = _read_md5sum(sums_path)
        except DownloadError as e:
            log.warning("no md5sum.txt for the LM files (%s); they are checked for completeness only", e)
        for name in lm_files:
            if sums and name not in sums:
                log.warning("%s is not listed in md5sum.txt; not verified", name)
            download_file(f"{lm_base_url.rstrip('/')}/{name}", lm_dir / name, md5=sums.get(name),
                          retries=retries, timeout=timeout)
    return target_dir / "LibriSpeech"


# --------------------------------------------------------------------------------------------
# Parsing the layout


def _looks_like_subset(d: Path) -> bool:
    for reader in d.iterdir():
        if reader.is_dir() and not reader.name.startswith("."):
            for chapter in reader.iterdir():
                if chapter.is_dir() and any(chapter.glob("*.trans.txt")):
                    return True
    return False


def _resolve_corpus_dir(corpus_dir: Path) -> Path:
    """Accept either the ``LibriSpeech`` folder or the folder that holds it."""
    inner = corpus_dir / "LibriSpeech"
    if inner.is_dir() and not any(_looks_like_subset(d) for d in corpus_dir.iterdir()
                                  if d.is_dir() and d.name != "LibriSpeech" and not d.name.startswith(".")):
        return inner
    return corpus_dir


def find_subsets(corpus_dir: str | os.PathLike) -> list[str]:
    """Names of the subset folders (any name: ``dev-clean``, ``train-clean``, ...) in a corpus."""
    root = _resolve_corpus_dir(Path(corpus_dir))
    if not root.is_dir():
        raise CorpusError(f"{corpus_dir}: corpus directory does not exist")
    return sorted(d.name for d in root.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and _looks_like_subset(d))


def read_speakers(path: str | os.PathLike) -> dict[str, dict]:
    """Parse SPEAKERS.TXT: ``{id: {"sex", "subset", "minutes", "name"}}``.

    Lines starting with ';' are comments; names may themselves contain '|' (LibriSpeech has one).
    """
    out: dict[str, dict] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        parts = [p.strip() for p in line.split("|", 4)]
        if len(parts) != 5:
            raise CorpusError(f"{path}: line {n}: expected 'ID | SEX | SUBSET | MINUTES | NAME', got {line!r}")
        spk, sex, subset, minutes, name = parts
        try:
            mins = float(minutes)
        except ValueError:
            raise CorpusError(f"{path}: line {n}: bad minutes {minutes!r}") from None
        out[spk] = {"sex": sex, "subset": subset, "minutes": mins, "name": name}
    return out


@dataclass(frozen=True)
class _Entry:
    id: str
    speaker: str
    chapter: str
    audio: str | None
    text: str | None


def _check_text(text: str) -> str | None:
    if not text:
        return "empty transcript"
    try:
        text.encode("ascii")
    except UnicodeEncodeError:
        bad = sorted({c for c in text if ord(c) > 127})
        return f"non-ASCII character(s) {''.join(bad)!r} in the transcript"
    if text != text.upper():
        return "lower-case letters in the transcript (expected upper-case words)"
    if not _TEXT_OK.match(text):
        bad = sorted({c for c in text if not (c.isupper() or c in "' ")})
        return (f"unexpected character(s) {''.join(bad)!r} in the transcript" if bad
                else "extra spaces in the transcript")
    return None


def scan_subset(subset_dir: str | os.PathLike) -> tuple[list[_Entry], list[tuple[str, str]]]:
    """Pair audio files with transcript lines; return ``(entries, problems)``.

    ``problems`` are ``(file or utterance id, problem)`` pairs: audio without a transcript line,
    lines without audio, duplicate lines, misnamed files, unusable text.
    """
    subset_dir = Path(subset_dir)
    entries: list[_Entry] = []
    problems: list[tuple[str, str]] = []
    for reader in sorted(p for p in subset_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for chapter in sorted(p for p in reader.iterdir() if p.is_dir() and not p.name.startswith(".")):
            prefix = f"{reader.name}-{chapter.name}"
            audio = {p.name[:-5]: p for p in chapter.glob("*.flac")}
            texts: dict[str, str] = {}
            trans = chapter / f"{prefix}.trans.txt"
            for t in chapter.glob("*.trans.txt"):
                if t != trans:
                    problems.append((str(t), f"transcript file name does not match its folder (expected {trans.name})"))
            if trans.is_file():
                raw = trans.read_bytes()
                try:
                    lines = raw.decode("utf-8").splitlines()
                except UnicodeDecodeError as e:
                    problems.append((str(trans), f"not valid UTF-8 text ({e})"))
                    lines = raw.decode("utf-8", errors="replace").splitlines()
                for n, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    uid, _, text = line.strip().partition(" ")
                    where = f"{trans}:{n}"
                    if not uid.startswith(prefix + "-"):
                        problems.append((uid, f"{where}: utterance id does not start with {prefix}-"))
                        continue
                    if uid in texts:
                        problems.append((uid, f"{where}: second transcript line for the same utterance"))
                        continue
                    texts[uid] = text.strip()
            for uid, path in sorted(audio.items()):
                if not uid.startswith(prefix + "-"):
                    problems.append((str(path), f"audio file name does not start with {prefix}-"))
                elif uid not in texts:
                    problems.append((uid, f"{path}: audio file has no transcript line in {trans.name}"))
            for uid, text in sorted(texts.items()):
                if uid not in audio:
                    problems.append((uid, f"{trans}: transcript line has no audio file {uid}.flac"))
                    continue
                bad = _check_text(text)
                if bad:
                    problems.append((uid, f"{trans}: {bad}: {text[:60]!r}"))
                    continue
                entries.append(_Entry(uid, reader.name, chapter.name, str(audio[uid].resolve()), text))
    return entries, problems


def _probe(path: str, min_rms_db: float) -> tuple[int, int] | str:
    """Decode one file; ``(num_samples, sample_rate)`` or the problem as text (no exception).

    Silent or near-silent audio (RMS below ``min_rms_db`` dB full scale) is a problem too: it has
    no speech to align, and its frames would only drag the CMVN statistics down.
    """
    try:
        x = read_audio(path, expected_sample_rate=SAMPLE_RATE)
    except AudioError as e:
        return str(e)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    if rms < 10.0 ** (min_rms_db / 20.0):
        level = "digital silence" if rms == 0 else f"RMS {20 * np.log10(rms):.1f} dBFS"
        return f"{path}: silent or near-silent audio ({level}, below {min_rms_db:g} dBFS; --min-rms-db sets the threshold)"
    return int(x.shape[0]), SAMPLE_RATE


def _probe_all(paths: list[str], nj: int, min_rms_db: float) -> list[tuple[int, int] | str]:
    from tqdm import tqdm

    probe = functools.partial(_probe, min_rms_db=min_rms_db)
    if nj <= 1 or len(paths) < 2:
        return [probe(p) for p in tqdm(paths, desc="decoding", unit="file", leave=False, mininterval=2)]
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=nj, mp_context=ctx) as pool:
        chunk = max(1, min(64, len(paths) // (4 * nj)))
        return list(tqdm(pool.map(probe, paths, chunksize=chunk), total=len(paths), desc="decoding",
                         unit="file", leave=False, mininterval=2))


def corpus_fingerprint(subset_dir: str | os.PathLike, extra: Sequence[Path] = ()) -> str:
    """Names, sizes and mtimes of every file of a subset (and ``extra`` files): a rerun after a
    corpus file was fixed, added or removed prepares the subset again instead of skipping it."""
    subset_dir = Path(subset_dir)
    h = hashlib.sha1()
    files = sorted(p for p in subset_dir.rglob("*") if p.is_file()) + [p for p in extra if p.is_file()]
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(subset_dir) if p.is_relative_to(subset_dir) else p}\t{st.st_size}\t"
                 f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Preparation


@dataclass(frozen=True)
class PrepConfig:
    corpus_dir: str = ""
    subset: str = ""
    sample_rate: int = SAMPLE_RATE
    skip_bad: bool = False
    min_rms_db: float = -60.0      # quieter audio (RMS, dB full scale) is reported as silent


def _format_problems(problems: list[tuple[str, str]], limit: int = 20) -> str:
    lines = [f"  {name}: {what}" for name, what in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def prepare_subset(corpus_dir: str | os.PathLike, subset: str, out_dir: str | os.PathLike,
                   nj: int = 1, skip_bad: bool = False, min_rms_db: float = PrepConfig.min_rms_db) -> Path:
    """Write ``out_dir/manifest.jsonl`` for one subset; see ``prepare_librispeech``."""
    root = _resolve_corpus_dir(Path(corpus_dir)).resolve()
    subset_dir = root / subset
    out_dir = Path(out_dir)
    cfg = PrepConfig(corpus_dir=str(root), subset=subset, skip_bad=skip_bad, min_rms_db=min_rms_db)
    manifest = out_dir / "manifest.jsonl"
    if not subset_dir.is_dir():
        raise CorpusError(f"{subset_dir}: subset folder does not exist (found: {', '.join(find_subsets(root)) or 'none'})")
    corpus = corpus_fingerprint(subset_dir, [root / "SPEAKERS.TXT"])
    if is_done(out_dir) and (out_dir / "config.yaml").is_file():
        if config_hash(load_config(PrepConfig, out_dir / "config.yaml")) == config_hash(cfg) \
                and read_json(out_dir / ".done").get("corpus") == corpus:
            log.info("%s: done; skipping", out_dir)
            return manifest
    entries, problems = scan_subset(subset_dir)
    results = _probe_all([e.audio for e in entries], nj, min_rms_db)  # type: ignore[misc]
    utts: list[Utterance] = []
    for e, r in zip(entries, results):
        if isinstance(r, str):
            problems.append((e.id, r))
        else:
            utts.append(Utterance(id=e.id, speaker=e.speaker, chapter=e.chapter, audio=e.audio,  # type: ignore[arg-type]
                                  num_samples=r[0], sample_rate=r[1], text=e.text))  # type: ignore[arg-type]
    problems.sort()
    if problems and not skip_bad:
        raise CorpusError(f"{subset_dir}: {len(problems)} problem(s) (rerun with --skip-bad to leave "
                          f"them out):\n{_format_problems(problems)}")
    if not utts:
        raise CorpusError(f"{subset_dir}: no usable utterances")
    (out_dir / ".done").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad_path = out_dir / "bad_utts.txt"
    if problems:
        log.warning("%s: %d bad input(s) left out, listed in %s:\n%s", subset, len(problems), bad_path,
                    _format_problems(problems, 5))
        atomic_write_text(bad_path, "".join(f"{n}\t{w}\n" for n, w in problems))
    elif bad_path.exists():
        bad_path.unlink()
    write_manifest(manifest, utts)
    spk_file = root / "SPEAKERS.TXT"
    if spk_file.is_file():
        table = read_speakers(spk_file)
        speakers = sorted({u.speaker for u in utts})
        missing = [s for s in speakers if s not in table]
        if missing:
            log.warning("%s: speaker(s) %s not in %s", subset, missing[:10], spk_file)
        atomic_write_json(out_dir / "speakers.json", {s: table[s] for s in speakers if s in table})
    write_config(cfg, out_dir)
    hours = sum(u.duration for u in utts) / 3600
    mark_done(out_dir, {"corpus": corpus, "num_utts": len(utts), "num_bad": len(problems), "hours": round(hours, 4),
                        "num_speakers": len({u.speaker for u in utts})})
    log.info("%s: %d utterances, %.2f h, %d speakers", subset, len(utts), hours, len({u.speaker for u in utts}))
    return manifest


def prepare_librispeech(corpus_dir: str | os.PathLike, subsets: Sequence[str] | None, out_dir: str | os.PathLike,
                        nj: int = 1, skip_bad: bool = False,
                        min_rms_db: float = PrepConfig.min_rms_db) -> dict[str, Path]:
    """Write ``out_dir/<subset>/manifest.jsonl`` for each subset (all found ones when ``None``).

    Each subset ends with its own ``.done``, so a rerun skips finished subsets. Every audio file is
    decoded (``nj`` processes). Bad input raises ``CorpusError`` naming each file and problem,
    before anything is written for that subset; with ``skip_bad`` the problems go to
    ``bad_utts.txt`` and the rest is kept. Speaker metadata from SPEAKERS.TXT goes to
    ``speakers.json``.
    """
    subsets = list(subsets) if subsets else find_subsets(corpus_dir)
    if not subsets:
        raise CorpusError(f"{corpus_dir}: no subsets found")
    return {s: prepare_subset(corpus_dir, s, Path(out_dir) / s, nj=nj, skip_bad=skip_bad, min_rms_db=min_rms_db)
            for s in subsets}


# --------------------------------------------------------------------------------------------
# CLI


def _split(s: str | None) -> list[str]:
    return [x for x in (s or "").split(",") if x]


def _cli_download(args: argparse.Namespace) -> int:
    lm_files = _split(args.lm_files) or LM_FILES
    download_librispeech(args.target_dir, _split(args.subsets), with_lm=not args.no_lm, base_url=args.base_url,
                         lm_base_url=args.lm_base_url, lm_files=lm_files, mini_base_url=args.mini_base_url,
                         keep_archives=not args.remove_archives)
    return 0


def combine_manifests(out_dir: str | os.PathLike, name: str, parts: Sequence[str]) -> Path:
    """Write ``out_dir/<name>/manifest.jsonl``, the union of the parts' manifests (e.g. the 460 h
    set ``train-clean-100+train-clean-360``), so later stages see one training set."""
    from asr.manifest import read_manifest, write_manifest

    out = Path(out_dir) / name
    utts = [u for part in parts for u in read_manifest(Path(out_dir) / part / "manifest.jsonl")]
    write_manifest(out / "manifest.jsonl", utts)
    mark_done(out, {"parts": list(parts), "num_utts": len(utts)})
    log.info("%s: %d utterances from %s", out, len(utts), ", ".join(parts))
    return out


def _cli_prepare(args: argparse.Namespace) -> int:
    from data_prep.speaker_split import parse_split, split_subset

    requested = _split(args.subsets)
    splits = [parse_split(x, seed=args.split_seed) for x in args.split]
    # "a+b" asks for the union of subsets a and b as one set; a split subset is prepared first.
    parts = list(dict.fromkeys([p for s in requested for p in s.split("+")] + [x.subset for x in splits]))
    prepare_librispeech(args.corpus_dir, parts or None, args.out_dir, nj=args.nj, skip_bad=args.skip_bad,
                        min_rms_db=args.min_rms_db)
    spk_file = _resolve_corpus_dir(Path(args.corpus_dir)) / "SPEAKERS.TXT"
    table = read_speakers(spk_file) if spk_file.is_file() else None
    if splits and table is None:
        log.warning("%s not found: the speaker split cannot balance the sexes", spk_file)
    for x in splits:
        split_subset(args.out_dir, x, table)
    for s in requested:
        if "+" in s:
            combine_manifests(args.out_dir, s, s.split("+"))
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("download-librispeech", help="resumable, md5-checked download of LibriSpeech (+ LM files)",
                              description="Download OpenSLR SLR12 subsets (and SLR11 LM/lexicon files).")
    p.add_argument("--target-dir", required=True, help="where archives go and are unpacked")
    p.add_argument("--subsets", default="dev-clean,dev-other,test-clean,test-other,train-clean-100",
                   help="comma-separated subset names")
    p.add_argument("--no-lm", action="store_true", help="skip the resource-11 LM and lexicon files")
    p.add_argument("--base-url", default=SLR12_URL)
    p.add_argument("--lm-base-url", default=SLR11_URL)
    p.add_argument("--mini-base-url", default=SLR31_URL, help="where train-clean-5 / dev-clean-2 come from")
    p.add_argument("--lm-files", default="", help=f"comma-separated resource-11 files (default: {','.join(LM_FILES)})")
    p.add_argument("--remove-archives", action="store_true", help="delete each archive once unpacked")
    p.set_defaults(func=_cli_download)

    p = subparsers.add_parser("prepare-librispeech", help="manifests of a LibriSpeech-layout corpus",
                              description="Write OUT_DIR/<subset>/manifest.jsonl for each subset.")
    p.add_argument("--corpus-dir", required=True, help="the LibriSpeech folder (or the one holding it)")
    p.add_argument("--subsets", default="",
                   help="comma-separated subsets (default: all found); a+b is the union of a and b as one set")
    p.add_argument("--out-dir", required=True, help="e.g. exp/librispeech/data")
    p.add_argument("--nj", type=int, default=1, help="processes for decoding the audio")
    p.add_argument("--skip-bad", action="store_true", help="list bad inputs in bad_utts.txt and go on")
    p.add_argument("--min-rms-db", type=float, default=PrepConfig.min_rms_db,
                   help="audio quieter than this RMS level (dB full scale) is reported as silent")
    p.add_argument("--split", action="append", default=[], metavar="SUBSET:NAME=N,...",
                   help="also split SUBSET by speaker into the named sets (counts, or fractions summing to <= 1), "
                        "balanced by sex from SPEAKERS.TXT; e.g. train-clean-5:train=20,dev=4,test=4 (repeatable)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the speaker order of --split")
    p.set_defaults(func=_cli_prepare)
