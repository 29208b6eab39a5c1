"""Results are never destroyed and never silently wrong (issue 12).

Recipe mechanics on a toy recipe (stamps check outputs, options are validated before anything
moves, option parsing never evaluates user text); `asr decode` keeps other sets' results; named
errors for corrupt checkpoints; the report refuses an incomplete family; data preparation picks up
a fixed corpus file and reports silent audio.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "recipes" / "common"

# Three steps: a (its own dir), b (downstream of a, fails when asked), c writes outside its stamp
# dir and declares that output. Every step appends its name to work/ran.
TOY = r"""#!/usr/bin/env bash
set -euo pipefail
stage=0
stop_stage=3
work=work
count=2
temperatures=1,2
fail_b=false
. {common}/parse_options.sh
. {common}/stage.sh
check_stages 3
check_int count 1
check_positive_list temperatures
if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  run_step "$work/a" "" -- bash -c "mkdir -p $work/a && echo a >> $work/ran && seq $count > $work/a/out"
fi
if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  run_step "$work/b" "$work/a" -- bash -c "echo b >> $work/ran; [ $fail_b = false ] && cp $work/a/out $work/b/out"
fi
if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  run_step "$work/c" "$work/b" --outputs "$work/elsewhere/c.txt" -- \
    bash -c "mkdir -p $work/elsewhere && echo c >> $work/ran && cat $work/b/out > $work/elsewhere/c.txt"
fi
"""


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    script = tmp_path / "run.sh"
    script.write_text(TOY.replace("{common}", str(COMMON)))
    return script


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=script.parent, capture_output=True, text=True)


def _ran(script: Path) -> list[str]:
    f = script.parent / "work" / "ran"
    return f.read_text().split() if f.exists() else []


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout + r.stderr


# ---- problem 2: stamps are checked against the outputs they recorded


def test_deleted_output_reruns_the_step_and_downstream(toy: Path) -> None:
    _ok(_run(toy))
    assert _ran(toy) == ["a", "b", "c"]
    _ok(_run(toy))
    assert _ran(toy) == ["a", "b", "c"], "a rerun with everything in place does nothing"
    (toy.parent / "work" / "a" / "out").unlink()
    r = _run(toy)
    _ok(r)
    assert "missing" in r.stdout and "work/a/out" in r.stdout
    assert _ran(toy)[3:] == ["a", "b", "c"], "the step that made the file and everything after it rerun"
    assert (toy.parent / "work" / "a" / "out").read_text() == "1\n2\n"


def test_truncated_output_and_declared_output_outside_the_step_dir(toy: Path) -> None:
    _ok(_run(toy))
    (toy.parent / "work" / "b" / "out").write_text("1\n")          # same name, other size
    _ok(_run(toy))
    assert _ran(toy)[3:] == ["b", "c"]
    (toy.parent / "work" / "elsewhere" / "c.txt").unlink()          # written outside work/c
    _ok(_run(toy))
    assert _ran(toy)[5:] == ["c"]
    assert (toy.parent / "work" / "elsewhere" / "c.txt").read_text() == "1\n2\n"


# ---- problem 3: a rejected option or a failed rebuild leaves the finished output in place


@pytest.mark.parametrize("args", [("--count", "0"), ("--count", "-1"), ("--temperatures", "-1"),
                                  ("--temperatures", "1,0"), ("--temperatures", "1,,2"), ("--count", "two")])
def test_rejected_option_leaves_the_finished_output(toy: Path, args: tuple[str, str]) -> None:
    _ok(_run(toy))
    before = (toy.parent / "work" / "a" / ".stamp").read_text()
    r = _run(toy, *args)
    assert r.returncode != 0
    assert f"--{args[0][2:]}" in r.stderr
    assert _ran(toy) == ["a", "b", "c"], "nothing ran"
    assert not (toy.parent / "work" / "a.old").exists()
    assert (toy.parent / "work" / "a" / ".stamp").read_text() == before
    assert (toy.parent / "work" / "a" / "out").is_file()


def test_failed_rebuild_puts_the_previous_output_back_and_resumes(toy: Path) -> None:
    _ok(_run(toy))
    work = toy.parent / "work"
    good = (work / "b" / ".stamp").read_text()
    r = _run(toy, "--fail-b", "true")               # b's command changes and fails
    assert r.returncode != 0
    assert "previous output is back" in r.stdout
    assert (work / "b" / ".stamp").read_text() == good and (work / "b" / "out").is_file()
    assert (work / "b.partial").is_dir() and not (work / "b.old").exists()
    _ok(_run(toy))                                  # the old options: everything is up to date
    assert _ran(toy)[3:] == ["b"]
    assert "skip b" in _run(toy).stdout


# ---- problem 5: stage numbers, option names


@pytest.mark.parametrize("args,msg", [
    (("--stage", "abc"), "--stage must be a whole number"),
    (("--stage", "99"), "--stage must be <= 3"),
    (("--stop-stage", "-1"), "--stop-stage must be a whole number"),
    (("--stage", "2", "--stop-stage", "1"), "--stop-stage (1) must be >= --stage (2)"),
])
def test_bad_stage_numbers_fail(toy: Path, args: tuple[str, ...], msg: str) -> None:
    r = _run(toy, *args)
    assert r.returncode != 0
    assert msg in r.stderr
    assert _ran(toy) == []


@pytest.mark.parametrize("name", ["x;touch PWNED", "a$(touch PWNED)", "count`touch PWNED`", "Count",
                                  "count[0]", "-count", "path;touch PWNED;x"])
def test_option_names_with_shell_syntax_are_rejected_without_running_anything(toy: Path, name: str) -> None:
    r = _run(toy, f"--{name}", "1")
    assert r.returncode != 0
    assert "invalid option name" in r.stderr or "unknown option" in r.stderr
    assert not (toy.parent / "PWNED").exists()
    assert _ran(toy) == []


def test_values_and_config_files_are_never_evaluated(toy: Path) -> None:
    cfg = toy.parent / "opts.conf"
    cfg.write_text("# options\ncount=3\nwork=\"work\"\n")
    _ok(_run(toy, "--config", str(cfg), "--stop-stage", "1"))
    assert (toy.parent / "work" / "a" / "out").read_text() == "1\n2\n3\n"
    cfg.write_text("count=$(touch PWNED)\n")
    r = _run(toy, "--config", str(cfg))
    assert r.returncode != 0 and "--count must be a whole number" in r.stderr
    cfg.write_text("x;touch\tPWNED;y=1\n")
    r = _run(toy, "--config", str(cfg))
    assert r.returncode != 0 and "invalid option name" in r.stderr
    assert not (toy.parent / "PWNED").exists()


def test_temperature_dirs_match_temperature_name() -> None:
    from asr.distill import temperature_name

    temps = ["1", "2", "0.5", "10", "2.50", "1.0"]
    r = subprocess.run(["bash", "-c", f'. {COMMON}/stage.sh; temperature_dirs "$1"', "_", ",".join(temps)],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == [temperature_name(float(t)) for t in temps]
