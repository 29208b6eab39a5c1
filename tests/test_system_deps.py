"""The system programs the project needs are installed: a missing one fails here (and in the
tests that use it), never skips, so CI cannot pass without them."""

from __future__ import annotations

import subprocess

import pytest
from conftest import SYSTEM_TOOLS, require_tool


@pytest.mark.parametrize("program", sorted(SYSTEM_TOOLS))
def test_system_program_is_installed(program: str) -> None:
    path = require_tool(program)
    assert path.endswith(program)


def test_a_missing_program_fails_with_the_install_hint(monkeypatch) -> None:
    import conftest

    monkeypatch.setattr(conftest.shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception) as e:
        require_tool("espeak-ng")
    msg = str(e.value)
    assert "espeak-ng is not installed" in msg and "apt-get install espeak-ng" in msg and "scripts/setup.sh" in msg


def test_espeak_ng_speaks() -> None:
    """espeak-ng is there and synthesises (the GMM tests' corpus and the mini corpus need it)."""
    r = subprocess.run([require_tool("espeak-ng"), "--stdout", "test"], capture_output=True)
    assert r.returncode == 0 and r.stdout[:4] == b"RIFF"
