"""Reading audio for every stage, with errors that name the file and the problem.

torchaudio's loaders now need FFmpeg through torchcodec, so audio is read with soundfile (FLAC, WAV).
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf

__all__ = ["AudioError", "read_audio", "audio_info"]


class AudioError(ValueError):
    """The audio file cannot be used; the message names the file and the problem."""


def audio_info(path: str | os.PathLike) -> tuple[int, int]:
    """Return ``(num_samples, sample_rate)`` from the header, without decoding the samples."""
    if not os.path.exists(path):
        raise AudioError(f"{path}: audio file does not exist")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: zero-length file")
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError subclasses
        raise AudioError(f"{path}: unreadable audio ({e})") from None
    return int(info.frames), int(info.samplerate)


def read_audio(path: str | os.PathLike, expected_sample_rate: int | None = 16000) -> np.ndarray:
    """Decode a mono file to float32 samples in [-1, 1], shape ``(num_samples,)``.

    Raises ``AudioError`` for a missing, empty, corrupt or truncated file, a sample rate other
    than ``expected_sample_rate``, more than one channel, or no samples.
    """
    num_frames, sr = audio_info(path)
    if expected_sample_rate is not None and sr != expected_sample_rate:
        raise AudioError(f"{path}: sample rate {sr} Hz, expected {expected_sample_rate} Hz")
    try:
        data, _ = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: corrupt or truncated audio ({e})") from None
    if data.shape[1] != 1:
        raise AudioError(f"{path}: {data.shape[1]} channels, expected mono")
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no samples")
    if data.shape[0] < num_frames:
        raise AudioError(f"{path}: truncated: header says {num_frames} samples, decoded {data.shape[0]}")
    return data[:, 0]
