"""results.json records what its figures depend on: versions, espeak-ng, threads, CPU, commit."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from conftest import require_tool

from asr.provenance import PACKAGES, cpu_model, git_commit, package_versions, provenance

REPO = Path(__file__).resolve().parents[1]


def test_package_versions_are_the_installed_ones_and_none_when_absent() -> None:
    got = package_versions(("numpy", "no-such-distribution-here"))
    assert got == {"numpy": metadata.version("numpy"), "no-such-distribution-here": None}
    for name in ("torch", "numpy", "kaldi-hmm-gmm", "kaldifst", "kaldilm", "kaldingram", "sentencepiece", "jiwer"):
        assert name in PACKAGES


def test_cpu_model_reads_proc_cpuinfo(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU @ 2.00GHz\n")
    assert cpu_model(info) == "Test CPU @ 2.00GHz"
    assert cpu_model(tmp_path / "missing") == (platform.processor() or platform.machine())


def test_git_commit_of_this_checkout_and_none_outside(tmp_path) -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        got = git_commit(REPO)
        assert got is not None and got["commit"] == head.stdout.strip() and isinstance(got["dirty"], bool)
    assert git_commit(tmp_path) is None


def test_provenance_holds_what_the_figures_depend_on() -> None:
    import torch

    p = provenance()
    assert p["python"] == platform.python_version()
    assert p["packages"]["torch"] == metadata.version("torch")
    assert p["packages"]["kaldi-hmm-gmm"] == metadata.version("kaldi-hmm-gmm")
    assert p["torch_threads"] == torch.get_num_threads()
    assert p["cpu"] and p["platform"]
    espeak = require_tool("espeak-ng")
    want = subprocess.run([espeak, "--version"], capture_output=True, text=True).stdout.strip()
    assert p["espeak_ng"] == want and "espeak" in want.lower()
    json.dumps(p)   # JSON-ready


def test_report_writes_provenance_into_results_json(tmp_path) -> None:
    from test_report import SYSTEMS, _fabricate

    from asr.report import build_report

    exp = tmp_path / "mini"
    _fabricate(exp, {k: v for k, v in SYSTEMS.items() if k != "gmm-mono"}, seed=2)
    _, json_path = build_report(exp, bootstrap_samples=20)
    res = json.loads(json_path.read_text())
    assert set(res["provenance"]) == {"python", "packages", "espeak_ng", "torch_threads", "cpu", "platform", "git"}
    assert res["provenance"]["packages"]["numpy"] == metadata.version("numpy")
    for key in ("corpus", "sets", "systems", "gain_kept", "significance", "tuning"):   # the schema stays
        assert key in res


