"""asr.step: the skip / run / rebuild decision and the stamp, in process (the toy recipes of
test_recipes.py and test_robustness.py check the same behaviour through stage.sh)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from asr.step import Step, decide, list_files, missing_outputs, run_step, step_key


def _sh(script: str) -> tuple[str, ...]:
    return ("bash", "-c", script)


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_key_covers_command_config_bytes_upstream_stamp_and_tree(cwd: Path) -> None:
    (cwd / "c.yaml").write_text("a: 1\n")
    (cwd / "up").mkdir()
    (cwd / "up" / ".stamp").write_text("k1\n")
    (cwd / "src").mkdir()
    (cwd / "src" / "x.txt").write_text("x")
    inputs = ["c.yaml", "up", "tree:src"]
    k = step_key(["cmd", "1"], inputs)
    assert k == step_key(["cmd", "1"], inputs) and len(k) == 16
    assert step_key(["cmd", "2"], inputs) != k
    (cwd / "c.yaml").write_text("a: 2\n")
    k2 = step_key(["cmd", "1"], inputs)
    assert k2 != k
    (cwd / "up" / ".stamp").write_text("k2\n")
    k3 = step_key(["cmd", "1"], inputs)
    assert k3 != k2
    (cwd / "src" / "y.txt").write_text("y")
    assert step_key(["cmd", "1"], inputs) != k3
    # A missing input is part of the key too (it is not silently ignored).
    assert step_key(["cmd"], ["nope"]) != step_key(["cmd"], [])


def test_list_files_leaves_out_logs_stamps_copies_and_nested_steps(cwd: Path) -> None:
    d = cwd / "out"
    for rel in ["f", "log/l", "n/g", "x.old/h", "y.partial/h", "s/t/u", "s/log/kept"]:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(rel)
    (d / "n" / ".stamp").write_text("nested")
    (d / ".stamp.tmp").write_text("t")
    (d / ".target").write_text("t")
    assert list_files("out") == [(1, "f"), (10, "s/log/kept"), (5, "s/t/u")]
    assert list_files("out/f") == [(1, "")]
    assert list_files("absent") == []


def test_run_then_skip_then_rebuild_on_changed_input(cwd: Path, capsys: pytest.CaptureFixture) -> None:
    (cwd / "c.yaml").write_text("v: 1\n")
    step = Step("out", _sh("mkdir -p out && cat c.yaml >> out/o && echo ran >> ran"), ("c.yaml",))
    assert decide(step, step_key(step.command, step.inputs)).action == "run"
    assert run_step(step) == 0
    stamp = (cwd / "out" / ".stamp").read_text().splitlines()
    assert stamp[0] == step_key(step.command, step.inputs) and stamp[1].startswith("# built ")
    assert stamp[2:] == ["I\t5\to"]
    assert "# bash -c" in (cwd / "out" / "log" / "out.log").read_text()
    assert run_step(step) == 0
    assert "skip out: done and up to date" in capsys.readouterr().out
    assert (cwd / "ran").read_text() == "ran\n"
    (cwd / "c.yaml").write_text("v: 2\n")
    assert run_step(step) == 0
    assert (cwd / "ran").read_text() == "ran\nran\n"
    assert (cwd / "out" / "o").read_text() == "v: 2\n", "the rebuild starts from an empty folder"
    assert (cwd / "out.old" / "o").read_text() == "v: 1\n"


def test_deleted_or_truncated_output_rebuilds(cwd: Path) -> None:
    step = Step("out", _sh("mkdir -p out elsewhere && echo abc > out/o && echo de > elsewhere/e"),
                outputs=("elsewhere/e",))
    assert run_step(step) == 0
    assert missing_outputs(step) == []
    (cwd / "elsewhere" / "e").write_text("d\n")
    assert missing_outputs(step) == ["elsewhere/e (size 2, was 3)"]
    key = step_key(step.command, step.inputs)
    assert decide(step, key).action == "rebuild"
    (cwd / "out" / "o").unlink()
    assert missing_outputs(step)[0] == "out/o (missing)"
    assert run_step(step) == 0
    assert missing_outputs(step) == [] and decide(step, key).action == "skip"


def test_killed_step_resumes_in_place(cwd: Path) -> None:
    (cwd / "out").mkdir()
    (cwd / "out" / "part1").write_text("done before the kill")
    step = Step("out", _sh("test -f out/part1 && echo 2 > out/part2"))
    assert decide(step, step_key(step.command, step.inputs)).action == "run"
    assert run_step(step) == 0
    assert (cwd / "out" / "part1").read_text() == "done before the kill"
    assert [rel for _, rel in list_files("out")] == ["part1", "part2"]


def test_failed_rebuild_restores_the_old_output_and_the_next_try_resumes_it(cwd: Path) -> None:
    assert run_step(Step("out", _sh("mkdir -p out && echo good > out/o"))) == 0
    good = (cwd / "out" / ".stamp").read_text()
    failing = Step("out", _sh("mkdir -p out && echo half > out/half && exit 3"), ("c.yaml",))
    assert run_step(failing) == 3
    assert (cwd / "out" / ".stamp").read_text() == good and (cwd / "out" / "o").read_text() == "good\n"
    assert (cwd / "out.partial" / "half").is_file() and not (cwd / "out.old").exists()
    # The same failing options again: the rebuild starts from out.partial (its .target matches).
    fixed = Step("out", _sh("test -f out/half && echo new > out/o"), ("c.yaml",))
    assert run_step(failing) == 3
    (cwd / "out.partial" / ".target").write_text(step_key(fixed.command, fixed.inputs) + "\n")
    assert run_step(fixed) == 0
    assert (cwd / "out" / "o").read_text() == "new\n" and (cwd / "out" / "half").is_file()


def test_declared_output_not_written_is_a_failure(cwd: Path, capsys: pytest.CaptureFixture) -> None:
    step = Step("out", _sh("mkdir -p out"), outputs=("elsewhere/x",))
    assert run_step(step) == 1
    assert "did not write elsewhere/x" in capsys.readouterr().out
    assert not (cwd / "out" / ".stamp").exists()


def test_cli_runs_the_command_after_double_dash(cwd: Path) -> None:
    from asr.cli import main

    rc = main(["step", "--out", "o", "--inputs", "", "--", sys.executable, "-c",
               "import os; os.makedirs('o', exist_ok=True); open('o/x', 'w').write('1')"])
    assert rc == 0 and (cwd / "o" / ".stamp").is_file() and (cwd / "o" / "x").read_text() == "1"
    assert main(["step", "--out", "o2", "--", "no-such-command-xyz"]) == 127
    assert os.path.isdir(cwd / "o2") and not (cwd / "o2" / ".stamp").exists()
