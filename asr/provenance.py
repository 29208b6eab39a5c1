"""Where a set of results came from: the package versions, engines, threads, CPU and commit.

Results are bit-identical only on the same machine with the same packages: the TTS engine that
synthesises the mini corpus (espeak-ng), the numeric libraries (torch, numpy, the Kaldi bindings),
the torch thread count and the CPU's instruction set all change the figures. ``results.json``
records them under ``provenance`` so two runs that differ can be told apart.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "provenance", "package_versions", "espeak_version", "cpu_model", "git_commit"]

# The Python distributions whose versions change the figures (by their registry names).
PACKAGES = ("torch", "torchaudio", "numpy", "kaldi-hmm-gmm", "kaldifst", "kaldi-decoder", "kaldilm", "kaldingram",
            "sentencepiece", "jiwer")

_REPO = Path(__file__).resolve().parents[1]


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution; None where it is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    """A command's stripped stdout, or None when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def espeak_version() -> str | None:
    """``espeak-ng --version`` as it prints it (the mini corpus's voices depend on it)."""
    return _run(["espeak-ng", "--version"])


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(repo: Path = _REPO) -> dict[str, Any] | None:
    """``{commit, dirty}`` of the checkout the code runs from; None outside a git checkout."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd=repo)
    if not commit:
        return None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    return {"commit": commit, "dirty": bool(status)}


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return int(torch.get_num_threads())


def provenance() -> dict[str, Any]:
    """Everything above, as one JSON-ready dict."""
    return {
        "python": platform.python_version(),
        "packages": package_versions(),
        "espeak_ng": espeak_version(),
        "torch_threads": _torch_threads(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "git": git_commit(),
    }
