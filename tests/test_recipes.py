"""Recipe mechanics: option parsing, stage boundaries, no-op reruns, resumption, config changes;
the LibriSpeech recipe's stages 1-2 on a LibriSpeech-layout fixture; the mini recipe end to end at
smoke size (slow)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_librispeech

ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "recipes" / "common"


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


# A toy recipe with three stages, each appending to a log so the test can see what ran.
TOY = r"""#!/usr/bin/env bash
set -euo pipefail
stage=0
stop_stage=100
work=work
fail_at=""          # stage B fails half-way when set to "b"
param=1
. {common}/parse_options.sh
. {common}/stage.sh
if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  echo "$param" > $work.conf_a
  run_step "$work/a" "$work.conf_a" -- bash -c "mkdir -p $work/a && echo a >> $work/ran && echo A > $work/a/out"
fi
if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  run_step "$work/b" "$work/a" -- bash -c '
    mkdir -p '"$work"'/b; echo b >> '"$work"'/ran
    [ -f '"$work"'/b/part1 ] || { echo part1 > '"$work"'/b/part1; echo resumed-part1-written >> '"$work"'/ran; }
    [ "'"$fail_at"'" = b ] && exit 3
    echo part2 > '"$work"'/b/part2'
fi
if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  run_step "$work/c" "$work/b" -- bash -c "mkdir -p $work/c && echo c >> $work/ran"
fi
"""


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    script = tmp_path / "run.sh"
    script.write_text(TOY.replace("{common}", str(COMMON)))
    return script


def _run_toy(script: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=script.parent, capture_output=True, text=True,
                          check=check)


def _ran(script: Path) -> list[str]:
    f = script.parent / "work" / "ran"
    return f.read_text().split() if f.exists() else []


def test_unknown_option_fails(toy: Path) -> None:
    r = _run_toy(toy, "--no-such-option", "1", check=False)
    assert r.returncode != 0
    assert "unknown option --no-such-option" in r.stderr


def test_stage_boundaries(toy: Path) -> None:
    _run_toy(toy, "--stage", "2", "--stop-stage", "2")
    assert _ran(toy) == ["b", "resumed-part1-written"]
    _run_toy(toy, "--stop-stage", "1")
    assert _ran(toy)[2:] == ["a"]


def test_rerun_is_noop_and_config_change_reruns_downstream(toy: Path) -> None:
    _run_toy(toy)
    first = _ran(toy)
    assert first == ["a", "b", "resumed-part1-written", "c"]
    r = _run_toy(toy)
    assert _ran(toy) == first, "a rerun must do nothing"
    assert r.stdout.count("skip ") == 3
    _run_toy(toy, "--param", "2")           # stage a's config changes: a, b and c rerun
    assert _ran(toy)[len(first):] == ["a", "b", "resumed-part1-written", "c"]
    assert (toy.parent / "work" / "a.old").is_dir(), "the outdated output is kept aside"


def test_interrupted_stage_resumes(toy: Path) -> None:
    r = _run_toy(toy, "--fail-at", "b", check=False)
    assert r.returncode != 0
    assert not (toy.parent / "work" / "b" / ".stamp").exists()
    _run_toy(toy)
    # The second attempt reuses part1 (no second "resumed-part1-written") and completes b and c.
    assert _ran(toy) == ["a", "b", "resumed-part1-written", "b", "c"]
    assert (toy.parent / "work" / "b" / "part2").is_file()


LIBRISPEECH_SETS = ["train-clean-100", "dev-clean", "dev-other", "test-clean", "test-other"]


def test_librispeech_recipe_stages_1_2_on_fixture(tmp_path: Path) -> None:
    corpus = tmp_path / "LibriSpeech"
    for i, subset in enumerate(LIBRISPEECH_SETS):
        reader = str(100 + i)
        make_librispeech(corpus, subset, {reader: {"10": ["HELLO WORLD", "THE QUICK BROWN FOX", "IT'S A TEST"]}})
    speakers = corpus / "SPEAKERS.TXT"
    speakers.write_text(speakers.read_text() + "".join(
        f"{100 + i:<5}| F | {s:<16} | 0.05 | Reader {i}\n" for i, s in enumerate(LIBRISPEECH_SETS)))
    exp = tmp_path / "exp"
    cmd = [str(ROOT / "recipes" / "librispeech" / "run.sh"), "--corpus-dir", str(corpus), "--exp", str(exp),
           "--stop-stage", "2", "--nj", "1", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for s in LIBRISPEECH_SETS:
        rows = [json.loads(line) for line in (exp / "data" / s / "manifest.jsonl").read_text().splitlines()]
        assert [row["text"] for row in rows] == ["HELLO WORLD", "THE QUICK BROWN FOX", "IT'S A TEST"]
        index = [json.loads(line) for line in (exp / "feats" / s / "index.jsonl").read_text().splitlines()]
        assert len(index) == 3 and all(row["num_frames"] > 0 for row in index)
    assert (exp / "data" / "local" / "lexicon.txt").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert again.returncode == 0
    assert "run " not in again.stdout, "a rerun must skip every finished step"


def _fixture_corpus(corpus: Path, sets: list[str], readers_per_set: int = 1) -> Path:
    lines = []
    for i, subset in enumerate(sets):
        for j in range(readers_per_set):
            reader = str(100 + 10 * i + j)
            make_librispeech(corpus, subset, {reader: {"10": ["HELLO WORLD", "THE QUICK BROWN FOX", "IT'S A TEST"]}})
            lines.append(f"{reader:<5}| {'FM'[j % 2]} | {subset:<16} | 0.05 | Reader {reader}\n")
    speakers = corpus / "SPEAKERS.TXT"
    speakers.write_text(speakers.read_text() + "".join(lines))
    return corpus


def test_librispeech_recipe_takes_any_dev_test_lists(tmp_path: Path) -> None:
    # A copy without dev-other / test-other: the recipe must not ask for them.
    corpus = _fixture_corpus(tmp_path / "LibriSpeech", ["train-clean-100", "dev-clean", "test-clean"])
    exp = tmp_path / "exp"
    cmd = [str(ROOT / "recipes" / "librispeech" / "run.sh"), "--corpus-dir", str(corpus), "--exp", str(exp),
           "--stop-stage", "1", "--nj", "1", "--device", "cpu", "--dev-sets", "dev-clean", "--test-sets", "test-clean"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.parent.name for p in (exp / "data").glob("*/manifest.jsonl")) == \
        ["dev-clean", "test-clean", "train-clean-100"]
    assert (exp / "data" / "test-clean" / "oov.json").is_file()
    r = subprocess.run(cmd[:-4] + ["--test-sets", ""], capture_output=True, text=True, env=_env())
    assert r.returncode != 0 and "--test-sets" in r.stderr


def test_mini_librispeech_recipe_splits_train_clean_5(tmp_path: Path) -> None:
    """Stages 1-2 on a train-clean-5-only copy: split by speaker, features per split set, no-op rerun."""
    corpus = _fixture_corpus(tmp_path / "LibriSpeech", ["train-clean-5"], readers_per_set=4)
    exp = tmp_path / "exp"
    cmd = [str(ROOT / "recipes" / "mini_librispeech" / "run.sh"), "--corpus-dir", str(corpus), "--exp", str(exp),
           "--stop-stage", "2", "--nj", "1", "--split", "train-clean-5:train=2,dev=1,test=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    speakers = {}
    for s in ("train", "dev", "test"):
        rows = [json.loads(line) for line in (exp / "data" / s / "manifest.jsonl").read_text().splitlines()]
        speakers[s] = {row["speaker"] for row in rows}
        assert (exp / "feats" / s / "index.jsonl").is_file()
    assert [len(v) for v in speakers.values()] == [2, 1, 1]
    assert len(set().union(*speakers.values())) == 4
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert again.returncode == 0 and "run " not in again.stdout, "a rerun must skip every finished step"


REQUIRED_KINDS = {"gmm", "member", "member-mean", "ensemble", "distilled"}


@pytest.mark.slow
def test_mini_recipe_smoke(tmp_path: Path) -> None:
    """The whole mini recipe at smoke size: tens of utterances, 2 members, 1 epoch; its default
    labels are tied triphone states."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "recipes" / "mini" / "conf", conf)
    (conf / "lm.yaml").write_text("prune_threshold: 1.0e-4\n")   # a small graph
    (conf / "gmm.yaml").write_text("num_iters: 8\ntotal_gauss: 300\n")
    (conf / "train.yaml").write_text("arch: small\nepochs: 1\nthreads: 1\n")
    (conf / "distill.yaml").write_text("temperatures: [1, 2]\nsoft_targets: online\nmixup: 0.2\n")
    exp = tmp_path / "exp"
    cmd = [str(ROOT / "recipes" / "mini" / "run.sh"), "--exp", str(exp), "--conf", str(conf),
           "--num-utts", "60", "--transfer-utts", "20", "--members", "2", "--ensemble-sizes", "1,2",
           "--gmm-acwt-grid", "0.1", "--nn-acwt-grid", "0.2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    results = json.loads((exp / "results.json").read_text())
    sets = ["dev-clean", "test-clean", "test-other"]
    assert results["sets"] == sets
    by_name = {s["name"]: s for s in results["systems"]}
    choice = json.loads((exp / "distill" / "choice.json").read_text())
    reported = f"distilled-{choice['best_dir']}"
    expected = {"gmm-mono", "gmm-tri", "member-seed1", "member-seed2", "member-mean", "ensemble-2", reported,
                "distilled-paper-T2"}
    assert expected <= set(by_name), sorted(by_name)
    assert {s["kind"] for s in results["systems"]} >= REQUIRED_KINDS
    for name in expected:
        row = by_name[name]
        for s in sets:
            assert math.isfinite(row["wer"][s]) and row["wer"][s] >= 0, (name, s)
            assert 0 <= row["frame_acc"][s] <= 100, (name, s)
    assert by_name["member-seed2"]["seed"] == 2
    assert results["distilled"] == reported and set(choice["per_temperature"]) == {"1", "2"}
    assert by_name["distilled-paper-T2"]["temperature"] == 2 and by_name["distilled-paper-T2"]["hard_weight"] == 0.5
    # the ablation table (paper's recipe first), the diagnostics, posterior-prior tuning
    assert [r["variant"] for r in results["ablation"]] == ["distill_paper", "distill"]
    assert results["diagnostics"]["dev"]["students"] and results["diagnostics"]["train"]["frames"] > 0
    tune = json.loads((exp / "decode" / "member-seed1" / "tune.json").read_text())
    assert set(tune["by_priors"]) == {"count", "posterior"} and tune["priors"] in tune["by_priors"]
    assert (exp / "feats" / "train-unlabeled" / "index.jsonl").is_file()
    mean = by_name["member-mean"]["frame_acc"]["test-clean"]
    members = [by_name[f"member-seed{i}"]["frame_acc"]["test-clean"] for i in (1, 2)]
    assert mean == pytest.approx(sum(members) / 2, abs=1e-6)
    assert "test-clean" in (exp / "RESULTS.md").read_text()
    assert "member-mean" in r.stdout or "baseline" in r.stdout.lower(), "the table is printed at the end"
    # A deleted result is noticed by the rerun, which rebuilds just that (issue 12).
    lost = exp / "decode" / "member-seed2" / "test-clean" / "wer.json"
    before = json.loads(lost.read_text())["wer"]
    lost.unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-5000:]
    assert "missing" in again.stdout and "run members" in again.stdout
    assert json.loads(lost.read_text())["wer"] == before, "the same inputs give the same result"
    assert "run distill" not in again.stdout and "run member-seed1" not in again.stdout


@pytest.mark.slow
def test_mini_recipe_smoke_tied_states(tmp_path: Path) -> None:
    """The default (tied triphone states) against --labels mono, at smoke size: with tri, stage 4
    grows the tree and the triphone GMM, the networks train on its tied states and stage 8
    decodes gmm-mono on its own graph and labels beside gmm-tri; with mono, the networks train on
    the monophone pdfs and there is no triphone system."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "recipes" / "mini" / "conf", conf)
    (conf / "lm.yaml").write_text("prune_threshold: 1.0e-4\n")
    (conf / "gmm.yaml").write_text("num_iters: 8\ntotal_gauss: 300\n")
    (conf / "train.yaml").write_text("arch: small\nepochs: 1\nthreads: 1\n")
    base = [str(ROOT / "recipes" / "mini" / "run.sh"), "--conf", str(conf),
            "--num-utts", "60", "--transfer-utts", "20", "--members", "2", "--ensemble-sizes", "1,2",
            "--gmm-acwt-grid", "0.1", "--nn-acwt-grid", "0.2", "--students", "distill"]
    rows = {}
    for labels in ("tri", "mono"):
        exp = tmp_path / f"exp_{labels}"
        r = subprocess.run(base + ["--exp", str(exp), "--labels", labels], capture_output=True, text=True, env=_env())
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
        rows[labels] = {s["name"]: s for s in json.loads((exp / "results.json").read_text())["systems"]}
        for name in ("gmm-mono", "member-seed1"):
            assert all(math.isfinite(rows[labels][name]["wer"][s]) for s in ("dev-clean", "test-clean"))
    tri_exp = tmp_path / "exp_tri"
    tied = json.loads((tri_exp / "ali" / "train-clean" / "info.json").read_text())["num_pdfs"]
    mono = json.loads((tri_exp / "ali_mono" / "train-clean" / "info.json").read_text())["num_pdfs"]
    assert rows["tri"]["gmm-mono"]["num_pdfs"] == mono == rows["mono"]["gmm-mono"]["num_pdfs"]
    assert rows["tri"]["gmm-tri"]["num_pdfs"] == tied != mono
    assert rows["tri"]["member-seed1"]["num_pdfs"] == tied
    assert rows["mono"]["member-seed1"]["num_pdfs"] == mono and "gmm-tri" not in rows["mono"]
    assert all(math.isfinite(rows["tri"]["gmm-tri"]["wer"][s]) for s in ("dev-clean", "test-clean"))
    # One row of README's distillation ablation on these members: a variant with an override, which
    # leaves the recipe's own student as it was.
    reported = (tri_exp / "distill" / "choice.json").read_bytes()
    variant = [str(ROOT / "recipes" / "mini" / "local" / "distill_variant.sh"), "--exp", str(tri_exp),
               "--conf", str(conf), "v_lr", "lr=0.0005"]
    r = subprocess.run(variant, capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
    got = re.search(r"v_lr \(T1\): frame accuracy dev-clean ([0-9.]+) %, test-clean ([0-9.]+) %", r.stdout)
    assert got, r.stdout[-2000:]
    choice = json.loads((tri_exp / "v_lr" / "choice.json").read_text())
    assert float(got.group(1)) == pytest.approx(choice["per_temperature"]["1"], abs=0.005)
    assert 0 <= float(got.group(2)) <= 100
    assert yaml.safe_load((tri_exp / "v_lr" / "config.yaml").read_text())["lr"] == 0.0005
    assert (tri_exp / "distill" / "choice.json").read_bytes() == reported
