"""No function in ``asr/`` is longer than 80 lines, so each can be read in one screen: a long step
is a driver that calls named pieces. Length is ``end_lineno - lineno + 1`` of the ``def`` (its
decorators not counted), nested functions and methods included."""

from __future__ import annotations

import ast
from pathlib import Path

MAX_LINES = 80
ASR = Path(__file__).resolve().parents[1] / "asr"


def function_lengths(source: str) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, length)`` of every function and method in ``source``."""
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                out.append((name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def test_the_measure_counts_lines_of_functions_and_methods() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    src = f"@decorator\ndef long():\n{body}\n\nclass C:\n    def short(self):\n        return 1\n"
    got = {name: (line, n) for name, line, n in function_lengths(src)}
    assert got == {"long": (2, MAX_LINES + 1), "C.short": (MAX_LINES + 5, 2)}


def test_no_function_in_asr_is_longer_than_80_lines() -> None:
    files = sorted(ASR.glob("*.py"))
    assert len(files) > 10, f"no asr modules found under {ASR}"
    too_long = [f"{p.name}:{line} {name} ({n} lines)"
                for p in files for name, line, n in function_lengths(p.read_text(encoding="utf-8"))
                if n > MAX_LINES]
    assert not too_long, f"functions over {MAX_LINES} lines (split them into named steps): {too_long}"
