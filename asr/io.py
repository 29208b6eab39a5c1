"""Atomic file writes and the small serialisation helpers every stage shares.

Every output of a stage is written to a temporary file in the same directory and renamed into
place, so a killed run never leaves a half-written file behind that a rerun would trust.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_npy",
    "atomic_torch_save",
    "safe_torch_load",
    "CheckpointError",
    "read_jsonl",
    "write_jsonl",
    "read_json",
    "mark_done",
    "is_done",
    "file_sha1",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array as ``.npy`` (never pickled objects, so it is safe to share)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class CheckpointError(ValueError):
    """A checkpoint file cannot be loaded (corrupt, truncated, or not a plain-tensor checkpoint)."""


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``: tensors, numbers, strings and containers only.

    A corrupt, truncated or foreign file raises ``CheckpointError`` naming the file and the fix.
    torch's own message is not passed on: for such a file it advises ``weights_only=False``, i.e.
    running whatever code the file holds.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError, ValueError,
            IndexError, KeyError, UnicodeDecodeError) as e:
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(e).__name__}; {size} bytes: corrupt, truncated or "
            f"not written by asr); delete it and rerun the step that wrote it") from None


def _open_text(path: Path, mode: str):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, mode + "b"), encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file (gzipped when the name ends in ``.gz``)."""
    path = Path(path)
    with _open_text(path, "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write records as JSON lines, atomically (gzipped when the name ends in ``.gz``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".gz":
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")


def mark_done(directory: str | os.PathLike, info: dict | None = None) -> None:
    """Write the ``.done`` marker of a stage directory; it is always the last file a stage writes."""
    atomic_write_json(Path(directory) / ".done", info or {})


def is_done(directory: str | os.PathLike) -> bool:
    return (Path(directory) / ".done").is_file()


def file_sha1(path: str | os.PathLike, length: int = 16) -> str:
    """Shortened SHA-1 of a file's bytes: how a stage notices that an input file changed."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]
