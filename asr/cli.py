"""The ``asr`` console script: one subcommand per pipeline step.

Each step module defines ``add_cli(subparsers)``, which adds its subcommand and sets ``func`` to a
function taking the parsed arguments. The CLI only parses options and calls the library.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, in pipeline order.
COMMAND_MODULES = [
    "data_prep.librispeech",
    "data_prep.mini_corpus",
    "asr.lexicon",
    "asr.features",
    "asr.lang",
    "asr.lm",
    "asr.graph",
    "asr.gmm",
    "asr.train",
    "asr.ensemble",
    "asr.distill",
    "asr.decode",
    "asr.systems",
    "asr.report",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # step not written yet
                continue
            raise
        if hasattr(module, "add_cli"):
            module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Kaldi's HMM bindings must be imported before kaldifst (DESIGN.md section 4).
    import kaldi_hmm_gmm  # noqa: F401

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("asr").info("asr %s", " ".join(sys.argv[1:] if argv is None else argv))
    log = logging.getLogger("asr")
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume")
        return 130
    except (ValueError, KeyError, FileNotFoundError) as e:
        # Bad input or configuration: the message names the file and the problem; a traceback
        # would only hide it. --verbose keeps the traceback for debugging.
        if args.verbose:
            raise
        log.error("%s: %s", type(e).__name__, e.args[0] if e.args else e)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
