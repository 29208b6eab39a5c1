"""The results report on a fabricated exp dir: schema, computed rows, honesty, plots, CLI."""

from __future__ import annotations

import csv
import json
import shutil
import statistics

import numpy as np
import pytest

from asr.io import atomic_write_json
from asr.report import KINDS, ReportError, build_report, build_results, format_table
from asr.scoring import score_decode

SETS = ["dev-clean", "test-clean"]
VOCAB = [f"W{i}" for i in range(30)]
PDFS = 10


def _refs(rng: np.random.Generator, n: int = 60) -> dict[str, str]:
    return {f"spk-ch-{i:04d}": " ".join(rng.choice(VOCAB, size=rng.integers(4, 12))) for i in range(n)}


def _hyps(refs: dict[str, str], p_err: float, rng: np.random.Generator) -> dict[str, str]:
    out = {}
    for u, r in refs.items():
        words = [w if rng.random() > p_err else rng.choice(VOCAB) for w in r.split()]
        if rng.random() < p_err / 3:
            words.append("INS")
        out[u] = " ".join(words)
    return out


def _log_post(labels: np.ndarray, acc: float, rng: np.random.Generator) -> np.ndarray:
    n = labels.shape[0]
    pred = np.where(rng.random(n) < acc, labels, (labels + rng.integers(1, PDFS, n)) % PDFS)
    z = rng.normal(size=(n, PDFS))
    z[np.arange(n), pred] += 10.0
    return (z - np.log(np.exp(z).sum(1, keepdims=True))).astype(np.float16)


# name -> (system.json, word error prob, frame accuracy)
SYSTEMS = {
    "gmm-mono": ({"kind": "gmm", "params": 5000}, 0.40, 0.40),
    "member-seed1": ({"kind": "member", "seed": 1, "params": 1000}, 0.25, 0.60),
    "member-seed2": ({"kind": "member", "seed": 2, "params": 1000}, 0.28, 0.58),
    "member-seed3": ({"kind": "member", "seed": 3, "params": 1000}, 0.22, 0.62),
    "ensemble-2": ({"kind": "ensemble", "members": 2, "params": 2000}, 0.20, 0.63),
    "ensemble-3": ({"kind": "ensemble", "members": 3, "params": 3000}, 0.15, 0.68),
    "distilled-T1": ({"kind": "distilled", "temperature": 1.0, "hard_weight": 0.5, "params": 1000}, 0.21, 0.63),
    "distilled-T2": ({"kind": "distilled", "temperature": 2.0, "hard_weight": 0.5, "params": 1000}, 0.18, 0.66),
}


def _fabricate(exp, systems=SYSTEMS, seed=0) -> dict:
    """Decode results made by the real scoring code; returns the expected numbers per system/set."""
    rng = np.random.default_rng(seed)
    expected: dict = {}
    data = {s: (_refs(rng), rng.integers(0, PDFS, size=3000)) for s in SETS}
    for name, (info, p_err, acc) in systems.items():
        atomic_write_json(exp / "decode" / name / "system.json", {"name": name, **info})
        atomic_write_json(exp / "decode" / name / "tune.json", {"acwt": 0.1 * (1 + len(name) % 3), "lm_weight": 8})
        for s, (refs, labels) in data.items():
            res = score_decode(exp / "decode" / name / s, refs, _hyps(refs, p_err, rng),
                               log_post=_log_post(labels, acc, rng), labels=labels)
            expected[(name, s)] = (res["frame_acc"], res["wer"])
    atomic_write_json(exp / "distill" / "choice.json", {"criterion": "dev frame accuracy", "dev_set": "dev-clean",
                                                        "per_temperature": {"1": 62.0, "2": 65.0},
                                                        "best_temperature": 2.0, "hard_weight": 0.5})
    for d in ["members/seed1", "members/seed2", "distill/T1", "distill/T2"]:
        (exp / d).mkdir(parents=True, exist_ok=True)
        with open(exp / d / "train_log.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "lr", "train_loss", "train_acc", "dev_loss", "dev_acc", "active", "seconds"])
            for e in range(1, 4):
                w.writerow([e, 1e-3, 2.0 / e, 0.4 + 0.05 * e, 2.2 / e, 0.35 + 0.05 * e, 1, 1.0])
    return expected


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    exp = tmp_path_factory.mktemp("exp") / "mini"
    expected = _fabricate(exp)
    # What a recipe leaves beside the systems: an outdated copy kept by a rebuild, and step stamps.
    shutil.copytree(exp / "decode" / "member-seed1", exp / "decode" / "member-seed1.old")
    (exp / "decode" / ".steps" / "members" / "log").mkdir(parents=True)
    md, js = build_report(exp, "mini", SETS, bootstrap_samples=300)
    return exp, expected, md, json.loads(js.read_text())


def test_schema(report):
    _, _, _, res = report
    assert res["corpus"] == "mini" and res["sets"] == SETS
    names = [s["name"] for s in res["systems"]]
    assert names == ["gmm-mono", "member-seed1", "member-seed2", "member-seed3", "member-mean", "ensemble-2",
                     "ensemble-3", "distilled-T1", "distilled-T2"]
    for s in res["systems"]:
        assert s["kind"] in KINDS and "params" in s
        assert set(s["frame_acc"]) == set(SETS) and set(s["wer"]) == set(SETS)
        if s["kind"] == "member":
            assert isinstance(s["seed"], int)
        if s["kind"] == "member-mean":
            assert set(s["frame_acc_std"]) == set(SETS) and set(s["wer_std"]) == set(SETS)
        if s["kind"] == "ensemble":
            assert "members" in s
        if s["kind"] == "distilled":
            assert s["temperature"] in (1.0, 2.0) and s["hard_weight"] == 0.5


def test_values_come_from_the_scored_inputs(report):
    _, expected, _, res = report
    rows = {s["name"]: s for s in res["systems"]}
    for (name, s), (fa, wer) in expected.items():
        assert rows[name]["frame_acc"][s] == pytest.approx(fa)
        assert rows[name]["wer"][s] == pytest.approx(wer)
    mm = rows["member-mean"]
    for s in SETS:
        fas = [rows[f"member-seed{i}"]["frame_acc"][s] for i in (1, 2, 3)]
        wers = [rows[f"member-seed{i}"]["wer"][s] for i in (1, 2, 3)]
        assert mm["frame_acc"][s] == pytest.approx(statistics.fmean(fas))
        assert mm["wer"][s] == pytest.approx(statistics.fmean(wers))
        assert mm["frame_acc_std"][s] == pytest.approx(statistics.pstdev(fas))
        assert mm["wer_std"][s] == pytest.approx(statistics.pstdev(wers))
        assert mm["frame_acc_std"][s] > 0


def test_choices_gain_and_significance(report):
    _, _, _, res = report
    rows = {s["name"]: s for s in res["systems"]}
    assert res["baseline"] == "member-mean" and res["ensemble"] == "ensemble-3"
    assert res["distilled"] == "distilled-T2"  # from distill/choice.json
    for s in SETS:
        b, e, d = (rows[n]["frame_acc"][s] for n in ("member-mean", "ensemble-3", "distilled-T2"))
        assert res["gain_kept"][s]["frame_acc"] == pytest.approx((d - b) / (e - b))
        wers = {f"member-seed{i}": rows[f"member-seed{i}"]["wer"][s] for i in (1, 2, 3)}
        median = sorted(wers, key=wers.get)[1]
        assert res["bootstrap_baseline_member"][s] == median
        sig = [x for x in res["significance"] if x["set"] == s]
        assert [(x["a"], x["b"]) for x in sig] == [(median, "ensemble-3"), (median, "distilled-T2"),
                                                   ("ensemble-3", "distilled-T2")]
        for x in sig:
            assert x["delta"] == pytest.approx(rows[x["b"]]["wer"][s] - rows[x["a"]]["wer"][s])
            assert x["ci_low"] <= x["delta"] <= x["ci_high"]
    assert res["tuning"]["ensemble-3"]["lm_weight"] == 8


def test_results_md_and_plots(report):
    exp, _, md, res = report
    text = md.read_text()
    for s in SETS:
        assert f"## {s}" in text
    assert "3-member ensemble (ensemble-3)" in text and "Distilled single model (distilled-T2)" in text
    assert "keeps" in text and "Paired bootstrap" in text and "median" in text
    assert "does NOT" not in text  # the fabricated ensemble does beat its members
    assert "T = 2.0" in text
    for name in ("ensemble_size.png", "temperature.png", "training_curves.png"):
        p = exp / "plots" / name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        assert f"plots/{name}" in res["plots"]


def test_honesty_when_the_ensemble_loses(tmp_path):
    systems = {k: v for k, v in SYSTEMS.items() if k.startswith(("member", "distilled"))}
    systems["ensemble-3"] = ({"kind": "ensemble", "members": 3, "params": 3000}, 0.45, 0.30)
    exp = tmp_path / "worse"
    _fabricate(exp, systems, seed=1)
    md, js = build_report(exp, None, None, bootstrap_samples=100)
    text = md.read_text()
    assert "does NOT beat the members on frame accuracy" in text
    assert "does NOT lower the WER" in text
    res = json.loads(js.read_text())
    assert res["corpus"] == "worse" and res["sets"] == SETS  # defaults: dir name, discovered sets
    assert all(res["gain_kept"][s]["frame_acc"] is None for s in SETS)
    assert "no gain to keep" in format_table(res)


def test_without_choice_file_picks_best_dev_student(tmp_path):
    exp = tmp_path / "x"
    expected = _fabricate(exp)
    (exp / "distill" / "choice.json").unlink()
    res = build_results(exp, "x", SETS, bootstrap_samples=50)
    dev = {t: expected[(f"distilled-T{t}", "dev-clean")][0] for t in (1, 2)}
    assert res["distilled"] == f"distilled-T{max(dev, key=dev.get)}"


def test_bad_system_json(tmp_path):
    atomic_write_json(tmp_path / "decode" / "foo" / "system.json", {"kind": "rnn"})
    with pytest.raises(ReportError, match="kind 'rnn'"):
        build_results(tmp_path, "c", SETS)
    with pytest.raises(ReportError, match="does not exist"):
        build_results(tmp_path / "nothing", "c", SETS)


def test_cli_prints_table(tmp_path, capsys):
    from asr.cli import main

    exp = tmp_path / "mini"
    _fabricate(exp, {k: v for k, v in SYSTEMS.items() if k != "gmm-mono"}, seed=2)
    assert main(["report", "--exp-dir", str(exp), "--bootstrap-samples", "50"]) == 0
    out = capsys.readouterr().out
    assert "dev-clean:" in out and "test-clean:" in out and "3-member ensemble" in out
    assert (exp / "RESULTS.md").is_file() and (exp / "results.json").is_file()


def test_data_checks_counts_drops_oov_and_silence(tmp_path):
    """The real-speech section: dropped utterances with their reasons, OOV rates, alignment figures."""
    from asr.report import data_checks, data_checks_md

    exp = tmp_path / "exp"
    for s, n in (("train-clean-5", 4), ("dev", 2)):
        d = exp / "data" / s
        d.mkdir(parents=True)
        (d / "manifest.jsonl").write_text("".join(json.dumps({"id": f"u{i}"}) + "\n" for i in range(n)))
    (exp / "data" / "dev" / ".done").write_text(json.dumps({"from": "train-clean-5"}))
    (exp / "data" / "train-clean-5" / "bad_utts.txt").write_text(
        "1-2-0003\t/c/1/2/1-2.trans.txt: empty transcript\n1-2-0004\t/c/1/2/1-2.trans.txt: empty transcript\n")
    (exp / "data" / "dev" / "oov.json").write_text(json.dumps({"oov_rate": 0.05, "oov_utt_rate": 0.5}))
    (exp / "ali" / "dev").mkdir(parents=True)
    (exp / "ali" / "dev" / "info.json").write_text(json.dumps({"num_failed": 1, "num_utts": 2, "silence_share": 0.25}))
    (exp / "ali" / "dev" / "failed.txt").write_text("u1\talignment failed (beam 100, retry beam 400)\n")
    (exp / "lm").mkdir()
    (exp / "lm" / "ppl.json").write_text(json.dumps({"dev": {"oov_rate": 12.5, "ppl": 300.0}}))
    c = data_checks(exp)
    assert set(c) == {"train-clean-5", "dev"}
    dev = c["dev"]
    assert dev["num_utts"] == 2 and dev["split_from"] == "train-clean-5"
    assert dev["oov_rate_lexicon"] == pytest.approx(5.0) and dev["oov_rate_lm"] == 12.5
    assert dev["ali_failed"] == 1 and dev["silence_share"] == pytest.approx(25.0)
    assert dev["dropped"] == {"data preparation of train-clean-5: empty transcript": 2,
                              "alignment: alignment failed (beam 100, retry beam 400)": 1}
    md = "\n".join(data_checks_md(c))
    assert "| dev (from train-clean-5) | 2 | 5.00 / 50.0 | 12.50 | 300.0 | 1 of 2 | 25.0 |" in md
    assert data_checks_md({}) == []
