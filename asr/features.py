"""Log-mel filterbank features, CMVN statistics and the memory-mapped feature store.

Features are Kaldi-compatible fbanks (``torchaudio.compliance.kaldi.fbank``: povey window,
pre-emphasis, DC removal, log floor at float epsilon, samples scaled to the 16-bit range), so that
numbers and frame counts match what Kaldi recipes and kaldi-native-fbank produce. The on-disk layout
is the contract in docs/FORMATS.md ("Features"): float16 shards of raw fbank in id order, an index
from utterance id to shard / frame range / global offset, and float64 CMVN sums. Normalisation is
applied on read, so one feature directory serves per-speaker, global or no CMVN.

Work is split into shards of consecutive sorted ids; each shard is written atomically together with
a small sidecar (``shard-NNNNN.json``) written after it, so a killed run resumes by recomputing only
shards whose sidecar is missing or stale.

Example::

    asr make-feats --manifest exp/mini/data/train/manifest.jsonl --out-dir exp/mini/feats/train --nj 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from asr.audio import AudioError, read_audio
from asr.config import add_config_args, config_from_args, config_hash, write_config
from asr.io import (atomic_path, file_sha1, atomic_save_npy, atomic_write_json, atomic_write_text, is_done, mark_done,
                    read_json, read_jsonl, write_jsonl)
from asr.manifest import ManifestError, Utterance, read_manifest

__all__ = [
    "FeatureConfig",
    "FeatureError",
    "FeatureStore",
    "compute_fbank",
    "make_features",
    "add_cli",
    "CMVN_MODES",
]

logger = logging.getLogger(__name__)

CMVN_MODES = ("speaker", "global", "none")
_WINDOWS = ("povey", "hamming", "hanning", "rectangular", "blackman")
_VAR_FLOOR = 1e-10


class FeatureError(ValueError):
    """Features cannot be computed or a feature directory is unusable; the message names the file."""


@dataclass(frozen=True)
class FeatureConfig:
    num_mel_bins: int = 40            # 40 as in Hinton et al. (2015); 80 as an option
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    sample_rate: int = 16000          # audio at any other rate is bad input
    low_freq: float = 20.0            # Hz, lowest mel bin edge (Kaldi default)
    high_freq: float = 0.0            # Hz; 0 = Nyquist, negative = offset below Nyquist (Kaldi)
    preemphasis: float = 0.97
    remove_dc_offset: bool = True
    window_type: str = "povey"
    snip_edges: bool = True           # Kaldi frame count: 1 + (samples - window) // shift
    waveform_scale: float = 32768.0   # Kaldi computes on 16-bit sample values
    dither: float = 0.0               # > 0 adds Gaussian noise seeded by (seed, utterance id)
    seed: int = 0
    utts_per_shard: int = 500

    def __post_init__(self) -> None:
        if self.num_mel_bins <= 0:
            raise ValueError(f"num_mel_bins must be positive, got {self.num_mel_bins}")
        if self.frame_shift_ms <= 0 or self.frame_length_ms < self.frame_shift_ms:
            raise ValueError(f"need 0 < frame_shift_ms <= frame_length_ms, got "
                             f"{self.frame_shift_ms} / {self.frame_length_ms}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        if self.window_type not in _WINDOWS:
            raise ValueError(f"window_type must be one of {_WINDOWS}, got {self.window_type!r}")
        if self.dither < 0:
            raise ValueError(f"dither must be >= 0, got {self.dither}")
        if self.utts_per_shard <= 0:
            raise ValueError(f"utts_per_shard must be positive, got {self.utts_per_shard}")

    @property
    def window_samples(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)


def _utt_seed(seed: int, utt_id: str) -> int:
    # Python's hash() is salted per process; a digest keeps dither identical across runs and workers.
    digest = hashlib.sha256(f"{seed}\t{utt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def compute_fbank(samples: np.ndarray, sample_rate: int, cfg: FeatureConfig, utt_id: str = "") -> np.ndarray:
    """Log-mel filterbank of one utterance.

    ``samples``: float waveform ``(num_samples,)`` in [-1, 1]. Returns float32
    ``(num_frames, num_mel_bins)``. With ``cfg.dither > 0`` the noise comes from a generator seeded
    by ``(cfg.seed, utt_id)`` (added to the whole signal rather than per frame as Kaldi does), so the
    result never depends on global RNG state or on which worker computed it.
    """
    import torch
    import torchaudio.compliance.kaldi as kaldi

    if sample_rate != cfg.sample_rate:
        raise FeatureError(f"sample rate {sample_rate} Hz, expected {cfg.sample_rate} Hz")
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise FeatureError(f"expected mono samples of shape (num_samples,), got shape {samples.shape}")
    if not np.all(np.isfinite(samples)):
        raise FeatureError("samples contain NaN or infinity")
    if cfg.snip_edges and samples.shape[0] < cfg.window_samples:
        raise FeatureError(f"too short: {samples.shape[0]} samples, one frame needs {cfg.window_samples}")
    if samples.shape[0] == 0:
        raise FeatureError("no samples")
    wave = samples.astype(np.float64) * cfg.waveform_scale
    if cfg.dither > 0:
        rng = np.random.default_rng(_utt_seed(cfg.seed, utt_id))
        wave = wave + cfg.dither * rng.standard_normal(wave.shape[0])
    feats = kaldi.fbank(
        torch.from_numpy(wave.astype(np.float32))[None],  # (1, num_samples)
        num_mel_bins=cfg.num_mel_bins,
        frame_length=cfg.frame_length_ms,
        frame_shift=cfg.frame_shift_ms,
        sample_frequency=float(cfg.sample_rate),
        low_freq=cfg.low_freq,
        high_freq=cfg.high_freq,
        preemphasis_coefficient=cfg.preemphasis,
        remove_dc_offset=cfg.remove_dc_offset,
        window_type=cfg.window_type,
        snip_edges=cfg.snip_edges,
        dither=0.0,
        use_energy=False,
        use_log_fbank=True,
        use_power=True,
    )
    return feats.numpy().astype(np.float32, copy=False)  # (num_frames, num_mel_bins)


# ----------------------------------------------------------------------------------------------
# Computing a feature directory


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def _chunk_digest(utts: list[Utterance], cfg_hash: str) -> str:
    """What a shard was computed from: its manifest records and the config."""
    blob = json.dumps([u.to_dict() for u in utts] + [cfg_hash], sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()


_Result = tuple[str, "np.ndarray | None", "str | None"]  # (utt id, float16 feats, problem)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _compute_one(task: tuple[str, str, FeatureConfig]) -> _Result:
    """Worker: ``(utt id, float16 feats or None, problem or None)``; bad input is returned, not raised,
    so the parent decides between stopping and ``--skip-bad``."""
    utt_id, audio, cfg = task
    try:
        samples = read_audio(audio, expected_sample_rate=cfg.sample_rate)
        feats = compute_fbank(samples, cfg.sample_rate, cfg, utt_id=utt_id)
    except (AudioError, FeatureError) as e:
        msg = str(e)
        if not msg.startswith(str(audio)):
            msg = f"{audio}: {msg}"
        return utt_id, None, msg
    return utt_id, feats.astype(np.float16), None


def _shard_is_complete(out_dir: Path, i: int, digest: str) -> bool:
    sidecar = out_dir / f"{_shard_name(i)}.json"
    if not (sidecar.is_file() and (out_dir / f"{_shard_name(i)}.npy").is_file()):
        return False
    try:
        return read_json(sidecar).get("digest") == digest
    except (OSError, ValueError):
        return False


def _run_tasks(tasks: list[tuple[str, str, FeatureConfig]], nj: int) -> Iterator[_Result]:
    if nj <= 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield from map(_compute_one, tasks)
        finally:
            torch.set_num_threads(threads)
        return
    with multiprocessing.get_context().Pool(nj, initializer=_init_worker) as pool:
        yield from pool.imap(_compute_one, tasks, chunksize=max(1, min(16, len(tasks) // (8 * nj))))


def _read_utterances(manifest_path: Path) -> list[Utterance]:
    """The manifest's utterances sorted by id, so shards and index do not depend on the file's order;
    an empty manifest or a repeated id is an error here, before anything is written."""
    utts = sorted(read_manifest(manifest_path), key=lambda u: u.id)
    if not utts:
        raise ManifestError(f"{manifest_path}: no utterances")
    ids = [u.id for u in utts]
    dups = sorted({a for a, b in zip(ids, ids[1:]) if a == b})
    if dups:
        raise ManifestError(f"{manifest_path}: duplicate utterance ids {dups[:5]}")
    return utts


def _remove_leftovers(out_dir: Path, num_shards: int) -> None:
    """Temporary files of a killed run and shards beyond the current partition (a smaller manifest
    or a larger ``utts_per_shard``), so the directory holds only what the index will name."""
    for tmp in out_dir.glob(".*.tmp"):  # left by a killed run (asr.io.atomic_path)
        tmp.unlink()
    for stale in out_dir.glob("shard-*"):
        try:
            if int(stale.name[6:11]) >= num_shards:
                stale.unlink()
        except ValueError:
            continue


def _check_reused_shards(out_dir: Path, reused: Sequence[int]) -> None:
    """A reused shard may hold utterances that were skipped as bad; without --skip-bad that is an
    error, as it would have been had the shard been computed now."""
    for i in reused:
        bad = read_json(out_dir / f"{_shard_name(i)}.json")["bad"]
        if bad:
            raise FeatureError(f"{bad[0][0]}: {bad[0][1]} (use --skip-bad to leave bad utterances out)")


def _compute_shards(out_dir: Path, chunks: list[list[Utterance]], pending: list[int], digests: list[str],
                    cfg: FeatureConfig, nj: int, skip_bad: bool) -> None:
    """Compute the pending shards; each is written (array + sidecar with its digest) as soon as it is
    complete, so a crash loses at most the shard in progress."""
    from tqdm import tqdm

    tasks = [(u.id, u.audio, cfg) for i in pending for u in chunks[i]]
    results = _run_tasks(tasks, nj)
    try:
        with tqdm(total=len(tasks), desc=f"fbank {out_dir.name}", unit="utt") as bar:
            for i in pending:
                feats, kept, bad = [], [], []
                for u in chunks[i]:
                    utt_id, f, problem = next(results)
                    if utt_id != u.id:  # imap keeps order; anything else is a bug
                        raise RuntimeError(f"worker result for {utt_id} arrived in place of {u.id}")
                    bar.update(1)
                    if problem is not None:
                        if not skip_bad:
                            raise FeatureError(f"{u.id}: {problem} (use --skip-bad to leave bad utterances out)")
                        logger.warning("skipping %s: %s", u.id, problem)
                        bad.append([u.id, problem])
                        continue
                    feats.append(f)
                    kept.append([u.id, int(f.shape[0])])
                data = np.concatenate(feats) if feats else np.zeros((0, cfg.num_mel_bins), np.float16)
                atomic_save_npy(out_dir / f"{_shard_name(i)}.npy", data)  # (frames_in_shard, num_mel_bins)
                atomic_write_json(out_dir / f"{_shard_name(i)}.json", {"digest": digests[i], "utts": kept, "bad": bad})
    finally:
        results.close()  # stops the worker pool when a bad input ends the run


def _index_rows(out_dir: Path, chunks: list[list[Utterance]]) -> tuple[list[dict], list[list[str]]]:
    """Index rows (id, speaker, shard, start in the shard, frames, offset over the set) and the bad
    utterances, read back from every shard's sidecar: computed now or reused, they count alike."""
    rows, bad_all, offset = [], [], 0
    for i, chunk in enumerate(chunks):
        side = read_json(out_dir / f"{_shard_name(i)}.json")
        spk = {u.id: u.speaker for u in chunk}
        start = 0
        for utt_id, nf in side["utts"]:
            rows.append({"id": utt_id, "speaker": spk[utt_id], "shard": i, "start": start,
                         "num_frames": nf, "offset": offset})
            start += nf
            offset += nf
        bad_all.extend(side["bad"])
    return rows, bad_all


def _write_bad_list(out_dir: Path, bad_all: list[list[str]]) -> None:
    """``bad_utts.txt`` lists the utterances left out; a list from an earlier run is removed when
    nothing is bad now."""
    if bad_all:
        atomic_write_text(out_dir / "bad_utts.txt", "".join(f"{u}\t{p}\n" for u, p in bad_all))
        logger.warning("%d bad utterance(s) left out; listed in %s", len(bad_all), out_dir / "bad_utts.txt")
    elif (out_dir / "bad_utts.txt").exists():
        (out_dir / "bad_utts.txt").unlink()


def make_features(manifest_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: FeatureConfig,
                  nj: int = 1, skip_bad: bool = False) -> Path:
    """Compute fbank shards, index and CMVN statistics for one manifest into ``out_dir``.

    Bad audio stops the run with an error naming the file, unless ``skip_bad``: then the utterance
    is listed in ``bad_utts.txt`` and left out of shards and index. Finished shards are kept, so a
    rerun after a crash or an error only computes what is missing. Returns ``out_dir``.
    """
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    if nj < 1:
        raise ValueError(f"nj must be >= 1, got {nj}")
    utts = _read_utterances(manifest_path)
    cfg_hash = config_hash(cfg)
    manifest_sha1 = file_sha1(manifest_path)
    (out_dir / ".done").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    n = cfg.utts_per_shard
    chunks = [utts[i:i + n] for i in range(0, len(utts), n)]
    digests = [_chunk_digest(c, cfg_hash) for c in chunks]
    pending = [i for i, d in enumerate(digests) if not _shard_is_complete(out_dir, i, d)]
    _remove_leftovers(out_dir, len(chunks))
    logger.info("%d utterances in %d shards; %d shard(s) to compute with nj=%d",
                len(utts), len(chunks), len(pending), nj)
    if not skip_bad:
        _check_reused_shards(out_dir, sorted(set(range(len(chunks))) - set(pending)))
    _compute_shards(out_dir, chunks, pending, digests, cfg, nj, skip_bad)

    rows, bad_all = _index_rows(out_dir, chunks)
    if not rows:
        raise FeatureError(f"{manifest_path}: every utterance was bad; see {out_dir / 'bad_utts.txt'}")
    _write_bad_list(out_dir, bad_all)
    write_jsonl(out_dir / "index.jsonl", rows)
    _write_cmvn(out_dir, rows, len(chunks), cfg.num_mel_bins)
    write_config(cfg, out_dir)
    num_frames = sum(r["num_frames"] for r in rows)
    mark_done(out_dir, {"config_hash": cfg_hash, "manifest_sha1": manifest_sha1, "num_utts": len(rows),
                        "num_frames": num_frames, "num_bad": len(bad_all)})
    logger.info("%s: %d utterances, %d frames, %d bad", out_dir, len(rows), num_frames, len(bad_all))
    return out_dir


def _write_cmvn(out_dir: Path, rows: list[dict], num_shards: int, dim: int) -> None:
    """Per-speaker and global sums of the stored (float16-rounded) values, so that normalising what
    the store returns is exact."""
    speakers = sorted({r["speaker"] for r in rows})
    spk_idx = {s: k for k, s in enumerate(speakers)}
    count = np.zeros(len(speakers), np.float64)
    total = np.zeros((len(speakers), dim), np.float64)
    sumsq = np.zeros((len(speakers), dim), np.float64)
    by_shard: dict[int, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    for i in range(num_shards):
        shard_rows = by_shard.get(i, [])
        if not shard_rows:
            continue
        data = np.load(out_dir / f"{_shard_name(i)}.npy", mmap_mode="r")
        for r in shard_rows:
            x = np.asarray(data[r["start"]:r["start"] + r["num_frames"]], dtype=np.float64)
            k = spk_idx[r["speaker"]]
            count[k] += x.shape[0]
            total[k] += x.sum(axis=0)
            sumsq[k] += np.square(x).sum(axis=0)
    with atomic_path(out_dir / "cmvn.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, speakers=np.array(speakers, dtype=str), spk_count=count, spk_sum=total, spk_sumsq=sumsq,
                 global_count=np.float64(count.sum()), global_sum=total.sum(axis=0),
                 global_sumsq=sumsq.sum(axis=0))


# ----------------------------------------------------------------------------------------------
# Reading a feature directory


class FeatureStore:
    """Read-only view of a feature directory: memory-mapped shards plus index and CMVN statistics.

    Frames are addressed per utterance (``utt``) or in the set's global frame order (``offsets``,
    ``load_all``), the order that labels and posteriors use.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        d = self.dir
        if not d.is_dir():
            raise FeatureError(f"feature dir {d} does not exist (run make-feats first)")
        if not is_done(d):
            raise FeatureError(f"feature dir {d} is incomplete (no .done); rerun make-feats to finish it")
        for name in ("index.jsonl", "cmvn.npz"):
            if not (d / name).is_file():
                raise FeatureError(f"feature dir {d}: {name} is missing")
        rows = read_jsonl(d / "index.jsonl")
        if not rows:
            raise FeatureError(f"feature dir {d}: index.jsonl is empty")
        try:
            self.ids: list[str] = [str(r["id"]) for r in rows]
            self.speakers: list[str] = [str(r["speaker"]) for r in rows]
            self._shard = np.array([r["shard"] for r in rows], np.int64)
            self._start = np.array([r["start"] for r in rows], np.int64)
            self.lengths: np.ndarray = np.array([r["num_frames"] for r in rows], np.int64)
            self.offsets: np.ndarray = np.array([r["offset"] for r in rows], np.int64)
        except KeyError as e:
            raise FeatureError(f"feature dir {d}: index.jsonl row lacks field {e}") from None
        self._pos = {u: k for k, u in enumerate(self.ids)}
        self._validate_index()
        self._shards = self._open_shards()
        self.dim: int = int(self._shards[0].shape[1]) if self._shards else 0
        self.num_frames_total: int = int(self.lengths.sum())
        self._load_cmvn()

    def _validate_index(self) -> None:
        d = self.dir
        if len(self._pos) != len(self.ids) or self.ids != sorted(self.ids):
            raise FeatureError(f"feature dir {d}: index.jsonl ids are not unique and sorted")
        if np.any(self.lengths <= 0) or np.any(self._start < 0) or np.any(self._shard < 0):
            raise FeatureError(f"feature dir {d}: index.jsonl has empty utterances or negative positions")
        expected = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        if not np.array_equal(self.offsets, expected):
            k = int(np.nonzero(self.offsets != expected)[0][0])
            raise FeatureError(f"feature dir {d}: offset of {self.ids[k]} is {self.offsets[k]}, expected {expected[k]}")
        if np.any(np.diff(self._shard) < 0):
            raise FeatureError(f"feature dir {d}: shards in index.jsonl are not in order")

    def _open_shards(self) -> list[np.ndarray]:
        d = self.dir
        shards = []
        for i in range(int(self._shard.max()) + 1):
            path = d / f"{_shard_name(i)}.npy"
            if not path.is_file():
                raise FeatureError(f"feature dir {d}: {path.name} is missing")
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.ndim != 2 or arr.dtype != np.float16:
                raise FeatureError(f"feature dir {d}: {path.name} is {arr.dtype} {arr.shape}, expected float16 2-D")
            if shards and arr.shape[1] != shards[0].shape[1]:
                raise FeatureError(f"feature dir {d}: {path.name} has dim {arr.shape[1]}, "
                                   f"{_shard_name(0)}.npy has {shards[0].shape[1]}")
            sel = self._shard == i
            starts, lens = self._start[sel], self.lengths[sel]
            expect = np.concatenate([[0], np.cumsum(lens)[:-1]]) if lens.size else lens
            if not np.array_equal(starts, expect) or int(lens.sum()) != arr.shape[0]:
                raise FeatureError(f"feature dir {d}: {path.name} has {arr.shape[0]} frames, but index.jsonl "
                                   f"places {int(lens.sum())} frames in it (or its start frames are not contiguous)")
            shards.append(arr)
        return shards

    def _load_cmvn(self) -> None:
        path = self.dir / "cmvn.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                spk = [str(s) for s in z["speakers"]]
                count, total, sumsq = z["spk_count"], z["spk_sum"], z["spk_sumsq"]
                g = (z["global_count"], z["global_sum"], z["global_sumsq"])
        except (KeyError, ValueError, OSError) as e:
            raise FeatureError(f"feature dir {self.dir}: cannot read cmvn.npz ({e})") from None
        missing = sorted(set(self.speakers) - set(spk))
        if missing or total.shape != (len(spk), self.dim):
            raise FeatureError(f"feature dir {self.dir}: cmvn.npz does not match the index "
                               f"(speakers missing: {missing[:5]}, shape {total.shape})")
        self._spk_index = {s: k for k, s in enumerate(spk)}
        mean, inv_std = _mean_inv_std(count[:, None], total, sumsq)
        self._spk_mean, self._spk_inv_std = mean.astype(np.float32), inv_std.astype(np.float32)
        gm, gi = _mean_inv_std(g[0], g[1], g[2])
        self._glob_mean, self._glob_inv_std = gm.astype(np.float32), gi.astype(np.float32)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, utt_id: object) -> bool:
        return utt_id in self._pos

    def _k(self, utt_id: str) -> int:
        try:
            return self._pos[utt_id]
        except KeyError:
            raise KeyError(f"utterance {utt_id!r} is not in feature dir {self.dir}") from None

    def utt(self, utt_id: str) -> np.ndarray:
        """Raw fbank of one utterance, float32 ``(num_frames, dim)``."""
        k = self._k(utt_id)
        s = self._start[k]
        return np.asarray(self._shards[self._shard[k]][s:s + self.lengths[k]], dtype=np.float32)

    def _stats(self, speaker: str, mode: str) -> tuple[np.ndarray, np.ndarray] | None:
        if mode == "none":
            return None
        if mode == "global":
            return self._glob_mean, self._glob_inv_std
        if mode == "speaker":
            if speaker not in self._spk_index:
                raise KeyError(f"speaker {speaker!r} has no CMVN statistics in {self.dir}")
            k = self._spk_index[speaker]
            return self._spk_mean[k], self._spk_inv_std[k]
        raise ValueError(f"CMVN mode must be one of {CMVN_MODES}, got {mode!r}")

    def apply_cmvn(self, feats: np.ndarray, speaker: str, mode: str = "speaker") -> np.ndarray:
        """Mean and variance normalisation of ``feats`` ``(frames, dim)`` with the statistics of
        ``speaker`` (mode "speaker"), of the whole set ("global"), or none. Returns float32."""
        feats = np.asarray(feats, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected feats of shape (frames, {self.dim}), got {feats.shape}")
        stats = self._stats(speaker, mode)
        if stats is None:
            return feats.copy()
        return (feats - stats[0]) * stats[1]

    def utt_normalised(self, utt_id: str, mode: str = "speaker") -> np.ndarray:
        """CMVN-normalised fbank of one utterance, float32 ``(num_frames, dim)``."""
        return self.apply_cmvn(self.utt(utt_id), self.speakers[self._k(utt_id)], mode)

    def load_all(self, cmvn: str = "speaker") -> np.ndarray:
        """All frames in global frame order, normalised, float32 ``(num_frames_total, dim)``."""
        if cmvn not in CMVN_MODES:
            raise ValueError(f"CMVN mode must be one of {CMVN_MODES}, got {cmvn!r}")
        out = np.empty((self.num_frames_total, self.dim), np.float32)
        spk_of_utt = np.array([self._spk_index[s] for s in self.speakers], np.int64)
        pos = 0
        for i, shard in enumerate(self._shards):
            sel = np.nonzero(self._shard == i)[0]
            n = int(shard.shape[0])
            block = out[pos:pos + n]
            block[:] = shard
            if cmvn == "speaker":
                rows = np.repeat(spk_of_utt[sel], self.lengths[sel])  # (n,) speaker index per frame
                block -= self._spk_mean[rows]
                block *= self._spk_inv_std[rows]
            elif cmvn == "global":
                block -= self._glob_mean
                block *= self._glob_inv_std
            pos += n
        return out


def _mean_inv_std(count, total, sumsq) -> tuple[np.ndarray, np.ndarray]:
    count = np.maximum(np.asarray(count, np.float64), 1.0)
    mean = total / count
    var = np.maximum(sumsq / count - mean ** 2, _VAR_FLOOR)
    return mean, 1.0 / np.sqrt(var)


# ----------------------------------------------------------------------------------------------
# Command line


def _cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(FeatureConfig, args)
    make_features(args.manifest, args.out_dir, cfg, nj=args.nj, skip_bad=args.skip_bad)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-feats", help="log-mel fbank shards, index and CMVN statistics for a manifest",
                       description="Compute log-mel fbank features for data/<set>/manifest.jsonl into "
                                   "feats/<set>/. Example: asr make-feats --manifest data/train/manifest.jsonl "
                                   "--out-dir feats/train --nj 2 --set num_mel_bins=80")
    p.add_argument("--manifest", required=True, type=Path, help="data/<set>/manifest.jsonl")
    p.add_argument("--out-dir", required=True, type=Path, help="feats/<set>")
    add_config_args(p)
    p.add_argument("--nj", type=int, default=1, help="worker processes")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable audio out (listed in <out-dir>/bad_utts.txt) instead of stopping")
    p.set_defaults(func=_cli)
