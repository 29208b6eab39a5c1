"""How a step decides to skip: the one place that decides "skip / run / rebuild" for a recipe step.

A step is a command, its inputs, its output folder and the stamp it leaves there. Recipes call it
through ``run_step`` in ``recipes/common/stage.sh`` (a thin wrapper around ``asr step``)::

    asr step --out exp/feats/dev --inputs "exp/data/manifests conf/fbank.yaml" -- asr make-feats ...

The decision, in order:

- **skip** when ``OUT/.stamp`` exists, its first line equals the step's key (a hash of the command
  line and of every input: a config file's bytes, an upstream step's ``.stamp``, or for
  ``tree:DIR`` the names, sizes and mtimes of a folder's files), and every file the stamp recorded
  is still there with the size it had when the step finished;
- **rebuild** when a stamp exists but the key differs or a recorded output is gone or changed
  size: the finished output moves to ``OUT.old`` first and comes back if the rebuild fails (the
  failed attempt is kept as ``OUT.partial`` and resumed by the next run with the same key);
- **run** when there is no stamp: a new step, or one killed half-way, which resumes in place from
  what it already wrote (the commands resume partial work -- feature shards, training checkpoints
  -- but never decide on their own that a whole step is done).

The stamp: the key, a ``# built`` line (its time, so that a rebuilt upstream step always changes
the keys downstream), then one line per output file, ``I<TAB>size<TAB>path under OUT`` or
``O<TAB>size<TAB>path`` for a declared ``--outputs`` path outside OUT. Files not recorded: ``log/``,
stamps, ``.old`` / ``.partial`` copies and the folders of nested steps (those with their own
``.stamp`` or ``.target``). ``OUT/.target`` holds the key of the run in progress. The command's
output goes to ``OUT/log/<name>.log`` and to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from asr.io import atomic_write_text

__all__ = ["Step", "Decision", "step_key", "list_files", "missing_outputs", "decide", "run_step", "add_cli"]

STAMP = ".stamp"
TARGET = ".target"


@dataclasses.dataclass(frozen=True)
class Step:
    """One recipe step. ``out`` and ``outputs`` are kept as given (relative to the working
    directory), because the stamp records them that way."""

    out: str
    command: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return os.path.basename(self.out.rstrip("/"))

    @property
    def stamp_path(self) -> Path:
        return Path(self.out) / STAMP


@dataclasses.dataclass(frozen=True)
class Decision:
    action: str          # "skip" | "run" | "rebuild"
    reason: str


def _tree_listing(directory: str) -> bytes:
    """``name size mtime`` of every file under a source folder (sorted bytewise): a changed, added
    or removed corpus file changes the key without reading gigabytes of audio."""
    if not os.path.isdir(directory):
        return f"missing:{directory}\n".encode()
    lines = []
    for root, _dirs, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):       # as find -type f: symbolic links do not count
                continue
            ns = st.st_mtime_ns
            rel = os.path.relpath(p, directory)
            lines.append(f"{rel} {st.st_size} {ns // 10**9}.{ns % 10**9:09d}0".encode())
    return b"".join(line + b"\n" for line in sorted(lines))


def _input_text(x: str) -> bytes:
    if x.startswith("tree:"):
        return _tree_listing(x[len("tree:"):])
    if os.path.isdir(x):
        stamp = os.path.join(x, STAMP)
        return Path(stamp).read_bytes() if os.path.isfile(stamp) else f"missing-stamp:{x}\n".encode()
    if os.path.isfile(x):
        return Path(x).read_bytes()
    return f"missing:{x}\n".encode()


def step_key(command: Sequence[str], inputs: Sequence[str]) -> str:
    """The key of a step: SHA-1 (16 hex digits) of its command line and its inputs' contents."""
    h = hashlib.sha1((" ".join(command) + "\n").encode())
    for x in inputs:
        h.update(_input_text(x))
    return h.hexdigest()[:16]


def _is_nested_step(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, STAMP)) or os.path.isfile(os.path.join(directory, TARGET))


def list_files(path: str) -> list[tuple[int, str]]:
    """(size, path relative to ``path``) of the files a step wrote there; ``(size, "")`` for a file."""
    if os.path.isfile(path):
        return [(os.lstat(path).st_size, "")]
    if not os.path.isdir(path):
        return []
    found = []
    for root, dirs, files in os.walk(path):
        rel_root = os.path.relpath(root, path)
        if rel_root != "." and _is_nested_step(root):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.endswith((".old", ".partial")) and not (rel_root == "." and d == "log")]
        for f in files:
            p = os.path.join(root, f)
            if f.startswith(STAMP) or f == TARGET or (rel_root == "." and f == "log") or os.path.islink(p):
                continue
            found.append((os.lstat(p).st_size, os.path.relpath(p, path)))
    return sorted(found, key=lambda t: t[1])


def _record_lines(step: Step) -> list[str]:
    lines = [f"I\t{size}\t{rel}" for size, rel in list_files(step.out)]
    for d in step.outputs:
        lines += [f"O\t{size}\t{d + ('/' + rel if rel else '')}" for size, rel in list_files(d)]
    return lines


def _recorded(stamp_text: str, out: str) -> list[tuple[int, str]]:
    """(size, path) of every output a stamp recorded."""
    recorded = []
    for line in stamp_text.splitlines()[1:]:
        kind, _, rest = line.partition("\t")
        size, _, path = rest.partition("\t")
        if kind in ("I", "O") and size.isdigit():
            recorded.append((int(size), f"{out}/{path}" if kind == "I" else path))
    return recorded


def missing_outputs(step: Step) -> list[str]:
    """``path (why)`` for each output the stamp recorded that is gone or changed size."""
    if not step.stamp_path.is_file():
        return []
    problems = []
    for size, path in _recorded(step.stamp_path.read_text(encoding="utf-8"), step.out):
        try:
            have = os.lstat(path).st_size
        except FileNotFoundError:
            problems.append(f"{path} (missing)")
            continue
        if have != size:
            problems.append(f"{path} (size {have}, was {size})")
    return problems


def decide(step: Step, key: str) -> Decision:
    """Skip, run or rebuild ``step``, whose key is ``key``; the reason is what the log says."""
    if not step.stamp_path.is_file():
        return Decision("run", "no stamp" + (" (resuming what a killed run wrote)" if os.path.isdir(step.out) else ""))
    if step.stamp_path.read_text(encoding="utf-8").split("\n", 1)[0] != key:
        return Decision("rebuild", "config or inputs changed")
    missing = missing_outputs(step)
    if missing:
        return Decision("rebuild", f"{len(missing)} output(s) missing or changed since it finished "
                                   f"({','.join(missing[:3])})")
    return Decision("skip", "done and up to date")


def _say(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} (step) {msg}", flush=True)


def _move_aside(out: str, key: str) -> None:
    """The finished ``out`` goes to ``out.old``; a failed rebuild with the same key (``out.partial``)
    is resumed instead of starting over."""
    old, partial = out + ".old", out + ".partial"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    if os.path.isdir(partial):
        target = Path(partial) / TARGET
        if target.is_file() and target.read_text(encoding="utf-8").strip() == key:
            _say(f"{os.path.basename(out)}: resuming the earlier failed rebuild ({partial})")
            os.replace(partial, out)
        else:
            shutil.rmtree(partial)


def _put_back(out: str) -> None:
    """A failed rebuild: the attempt becomes ``out.partial``, the previous output comes back."""
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.replace(out, partial)
    os.replace(out + ".old", out)


def _run_logged(command: Sequence[str], log_path: Path) -> int:
    """Run ``command``, its stdout and stderr going both to stdout and to ``log_path``."""
    with open(log_path, "ab") as logf:
        logf.write(f"# {' '.join(command)}\n# started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        logf.flush()
        try:
            proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except OSError as e:
            msg = f"{command[0]}: cannot run ({e.strerror})\n".encode()
            logf.write(msg)
            sys.stdout.buffer.write(msg)
            return 127
        assert proc.stdout is not None
        try:
            while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                logf.write(chunk)
                logf.flush()
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        finally:
            rc = proc.wait()
    return rc


def _write_stamp(step: Step, key: str, seconds: float) -> None:
    with open(Path(step.out) / "log" / f"{step.name}.log", "a", encoding="utf-8") as logf:
        logf.write(f"# finished {time.strftime('%Y-%m-%d %H:%M:%S')} after {seconds:.0f} s\n")
    (Path(step.out) / TARGET).unlink(missing_ok=True)
    ns = time.time_ns()
    built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns // 10**9)) + f".{ns % 10**9:09d}"
    atomic_write_text(step.stamp_path, "\n".join([key, f"# built {built}", *_record_lines(step)]) + "\n")


def run_step(step: Step) -> int:
    """Decide, then skip, run or rebuild ``step``; returns the exit status (0: done and stamped)."""
    key = step_key(step.command, step.inputs)
    decision = decide(step, key)
    if decision.action == "skip":
        _say(f"skip {step.name}: {decision.reason} ({step.out})")
        return 0
    rebuilt = decision.action == "rebuild"
    if rebuilt:
        _say(f"{step.name}: {decision.reason}; rebuilding {step.out} (old copy in {step.out}.old)")
        _move_aside(step.out, key)
    log_path = Path(step.out) / "log" / f"{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(step.out) / TARGET, key + "\n")
    _say(f"run {step.name} -> {step.out} (log: {log_path})")
    t0 = time.time()
    rc = _run_logged(step.command, log_path)
    absent = [d for d in step.outputs if not os.path.exists(d)] if rc == 0 else []
    if rc == 0 and not absent:
        _write_stamp(step, key, time.time() - t0)
        return 0
    why = f"finished but did not write {', '.join(absent)}" if absent else f"exit status {rc}"
    if rebuilt and os.path.isdir(step.out + ".old"):
        _put_back(step.out)
        _say(f"FAILED: {step.name} ({why}; see {step.out}.partial/log/{step.name}.log); the previous output "
             f"is back in {step.out}. Fix the problem and rerun the same command: the rebuild resumes from "
             f"{step.out}.partial")
    else:
        _say(f"FAILED: {step.name} ({why}; see {log_path}); rerun the same command to resume")
    return rc or 1


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("step", help="run a recipe step unless its output is complete and up to date",
                       description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the step's output folder (holds .stamp and log/)")
    p.add_argument("--inputs", default="", help="space-separated: config files, upstream step folders, tree:DIR")
    p.add_argument("--outputs", default="", help="space-separated paths the step writes outside --out")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ValueError("asr step: no command given (asr step --out DIR [--inputs ...] -- COMMAND ...)")
    return run_step(Step(out=args.out, command=tuple(command), inputs=tuple(args.inputs.split()),
                         outputs=tuple(args.outputs.split())))
