"""The ``asr`` console script: one subcommand per pipeline step.

Each step module defines ``add_cli(subparsers)``, which adds its subcommand and sets ``func`` to a
function taking the parsed arguments. The CLI only parses options and calls the library.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

# Subcommand -> the module that defines it, in pipeline order. Only the module of the command
# being run is imported (importing torch and the Kaldi bindings for every command costs seconds).
COMMANDS = {
    "download-librispeech": "data_prep.librispeech",
    "prepare-librispeech": "data_prep.librispeech",
    "build-mini-corpus": "data_prep.mini_corpus",
    "prepare-lexicon": "asr.lexicon",
    "make-feats": "asr.features",
    "prepare-lang": "asr.lang",
    "train-lm": "asr.lm",
    "make-graph": "asr.graph",
    "train-gmm": "asr.gmm",
    "align": "asr.align",
    "build-tree": "asr.tree",
    "train-tri": "asr.tri",
    "train-members": "asr.train",
    "posteriors": "asr.posteriors",
    "ensemble": "asr.ensemble",
    "soft-targets": "asr.distill",
    "distill": "asr.distill",
    "decode-loglikes": "asr.decode",
    "decode": "asr.decode",
    "report": "asr.report",
    "step": "asr.step",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``command`` given) one holding just that command's module."""
    parser = argparse.ArgumentParser(prog="asr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).add_cli(sub)
    return parser


def _command_of(argv: list[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def main(argv: list[str] | None = None) -> int:
    # Kaldi's HMM bindings must be imported before kaldifst (docs/DESIGN.md section 4).
    import kaldi_hmm_gmm  # noqa: F401

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("asr").info("asr %s", " ".join(argv))
    log = logging.getLogger("asr")
    problem = _device_problem(getattr(args, "device", None))
    if problem:
        log.error("DeviceError: %s", problem)
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume")
        return 130
    except (ValueError, KeyError, OSError) as e:
        # Bad input, configuration or file system (missing, unreadable, read-only): the message
        # names the file and the problem; a traceback would only hide it. --verbose keeps it.
        if args.verbose:
            raise
        log.error("%s: %s", type(e).__name__, _message(e))
        return 2
    return int(rc or 0)


def _message(e: BaseException) -> str:
    """One line naming the file and the problem (OSErrors carry errno, strerror and filename)."""
    if isinstance(e, OSError) and e.filename is not None:
        hint = ""
        if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EROFS):
            hint = "; check that the folder is writable (or give another --out-dir / --exp)"
        elif e.errno == errno.ENOSPC:
            hint = "; free some disk space and rerun the same command to resume"
        return f"{e.filename}: {e.strerror}{hint}"
    return str(e.args[0]) if e.args else str(e)


def _device_problem(device: object) -> str | None:
    """Why ``--device`` cannot be used here (a GPU asked for on a machine without one), or None."""
    if not isinstance(device, str) or not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return f"--device {device}: no CUDA GPU is visible on this machine; use --device cpu"
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        return f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 ..)"
    return None


if __name__ == "__main__":
    sys.exit(main())
