"""Results are never destroyed and never silently wrong (issue 12).

Recipe mechanics on a toy recipe (stamps check outputs, options are validated before anything
moves, option parsing never evaluates user text); `asr decode` keeps other sets' results; named
errors for corrupt checkpoints; the report refuses an incomplete family; data preparation picks up
a fixed corpus file and reports silent audio.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
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


# ---- problem 1: `asr decode` of one set keeps the other sets' results

DECODE_LEXICON = "THE DH AH\nA AH\nCAT K AE T\nSAT S AE T\nON AA N\nMAT M AE T\nDOG D AO G\nRAN R AE N\n<UNK> SPN\n"
DECODE_LM = ["THE CAT SAT ON THE MAT", "A DOG RAN", "THE DOG SAT ON A MAT", "A CAT RAN", "THE DOG RAN"] * 3
DECODE_SETS = ["dev-clean", "test-clean", "test-other"]


@pytest.fixture(scope="module")
def decode_exp(tmp_path_factory):
    """A tiny experiment dir: lang, LM, graph, 3 sets of 2 utterances (manifest + features),
    priors, and one member (model.pt + random posteriors per set)."""
    import numpy as np
    from conftest import make_librispeech

    import kaldi_hmm_gmm  # noqa: F401  (before kaldifst)
    from asr.features import FeatureConfig, FeatureStore, make_features
    from asr.graph import make_graph
    from asr.lang import load_lang, prepare_lang
    from asr.lm import LmConfig, train_lm
    from asr.models import build_stack, get_arch, save_model
    from data_prep.librispeech import prepare_librispeech

    exp = tmp_path_factory.mktemp("exp")
    (exp / "lexicon.txt").write_text(DECODE_LEXICON)
    prepare_lang(exp / "lexicon.txt", exp / "lang")
    (exp / "lm.txt").write_text("\n".join(DECODE_LM) + "\n")
    train_lm(exp / "lm.txt", exp / "lang", exp / "lm", LmConfig())
    make_graph(exp / "lang", exp / "lm", exp / "graph")
    num_pdfs = load_lang(exp / "lang").num_pdfs
    corpus = exp / "corpus"
    for i, s in enumerate(DECODE_SETS):
        make_librispeech(corpus, s, {str(100 + i): {"1": ["THE CAT SAT", "A DOG RAN"]}})
    prepare_librispeech(corpus, DECODE_SETS, exp / "data")
    member = exp / "members" / "seed2"
    save_model(build_stack(get_arch("small"), 40, num_pdfs, [2]), member / "model.pt")
    rng = np.random.default_rng(0)
    for s in DECODE_SETS:
        make_features(exp / "data" / s / "manifest.jsonl", exp / "feats" / s, FeatureConfig())
        n = FeatureStore(exp / "feats" / s).num_frames_total
        logits = rng.standard_normal((n, num_pdfs))
        post = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        (member / "post").mkdir(parents=True, exist_ok=True)
        np.save(member / "post" / f"{s}.npy", post.astype(np.float16))
    (exp / "ali" / "train").mkdir(parents=True)
    np.save(exp / "ali" / "train" / "priors.npy", np.full(num_pdfs, 1.0 / num_pdfs))
    return exp


def _decode(exp: Path, *args: str) -> int:
    from asr.cli import main

    return main(["decode", "--exp-dir", str(exp), "--train-set", "train", "--system", str(exp / "members" / "seed2"),
                 *args])


def test_decoding_another_set_keeps_the_other_sets_results(decode_exp: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(decode_exp, exp)
    assert _decode(exp, "--sets", "dev-clean", "test-other", "--tune-set", "dev-clean", "--acwt-grid", "0.1,0.2") == 0
    out = exp / "decode" / "member-seed2"
    kept = {s: (out / s / "wer.json").read_text() for s in ("dev-clean", "test-other")}
    mtimes = {s: (out / s / "wer.json").stat().st_mtime_ns for s in kept}
    # The README's example: a new set, the acwt from a tune.json.
    assert _decode(exp, "--sets", "test-clean", "--acwt-from", str(out / "tune.json")) == 0
    for s in kept:
        assert (out / s / "wer.json").read_text() == kept[s], f"{s} was removed or rewritten"
        assert (out / s / "wer.json").stat().st_mtime_ns == mtimes[s]
    assert (out / "test-clean" / ".done").is_file()
    # New posteriors for one set make only that set stale; it is replaced, the others stay.
    post = exp / "members" / "seed2" / "post" / "test-other.npy"
    arr = np.load(post)
    np.save(post, arr[:, ::-1].copy())
    assert _decode(exp, "--sets", "dev-clean", "test-other", "test-clean", "--tune-set", "dev-clean",
                   "--acwt-grid", "0.1,0.2") == 0
    assert (out / "dev-clean" / "wer.json").stat().st_mtime_ns == mtimes["dev-clean"], "tune.json was reused"
    assert (out / "test-other" / "wer.json").stat().st_mtime_ns != mtimes["test-other"]
    assert not list(out.glob(".*.new")) and not list(out.glob(".*.stale"))


def test_truncated_graph_is_a_named_error_and_keeps_results(decode_exp: Path, tmp_path: Path, caplog) -> None:
    exp = tmp_path / "exp"
    shutil.copytree(decode_exp, exp)
    assert _decode(exp, "--sets", "dev-clean", "--acwt-from", str(_tune(exp))) == 0
    out = exp / "decode" / "member-seed2"
    before = sorted(p.relative_to(out) for p in out.rglob("*") if "log" not in p.parts)
    hclg = exp / "graph" / "HCLG.fst"
    hclg.write_bytes(hclg.read_bytes()[:200])
    caplog.clear()
    assert _decode(exp, "--sets", "dev-clean", "test-clean", "--acwt-from", str(_tune(exp))) == 2
    assert "HCLG.fst" in caplog.text and "make-graph" in caplog.text
    assert sorted(p.relative_to(out) for p in out.rglob("*") if "log" not in p.parts) == before


def _tune(exp: Path) -> Path:
    t = exp / "given_tune.json"
    t.write_text(json.dumps({"acwt": 0.2, "word_ins_penalty": 0.0}))
    return t


# ---- problem 4: one error path, named errors, never torch's weights_only advice


def test_corrupt_checkpoint_is_a_named_error_without_weights_only_advice(tmp_path: Path, caplog) -> None:
    import numpy as np

    from asr.cli import main
    from asr.io import CheckpointError, safe_torch_load

    bad = tmp_path / "model.pt"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError) as e:
        safe_torch_load(bad)
    assert str(bad) in str(e.value) and "weights_only" not in str(e.value)
    good = tmp_path / "good.pt"
    import torch

    torch.save({"x": torch.zeros(3)}, good)
    good.write_bytes(good.read_bytes()[:100])               # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        safe_torch_load(good)
    caplog.clear()
    rc = main(["posteriors", "--model", str(bad), "--feats-dir", str(tmp_path), "--out", str(tmp_path / "p.npy")])
    assert rc == 2
    assert "CheckpointError" in caplog.text and str(bad) in caplog.text
    assert "weights_only" not in caplog.text and "Traceback" not in caplog.text


def test_read_only_folder_and_missing_gpu_are_named_errors(decode_exp: Path, tmp_path: Path, caplog,
                                                           monkeypatch) -> None:
    import errno
    import os

    import torch

    import asr.decode
    from asr.cli import main

    exp = tmp_path / "exp"
    shutil.copytree(decode_exp, exp)
    if os.geteuid() == 0:       # root writes into read-only folders: the refusal is simulated
        def refuse(path, *a, **k):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        monkeypatch.setattr(asr.decode, "atomic_write_json", refuse)
    else:
        (exp / "decode" / "member-seed2").mkdir(parents=True)
        os.chmod(exp / "decode" / "member-seed2", 0o555)
    caplog.clear()
    assert _decode(exp, "--sets", "dev-clean", "--acwt-from", str(_tune(exp))) == 2
    assert "PermissionError" in caplog.text and "writable" in caplog.text and "Traceback" not in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.clear()
    rc = main(["posteriors", "--model", "x.pt", "--feats-dir", str(tmp_path), "--out", "p.npy", "--device", "cuda"])
    assert rc == 2 and "no CUDA GPU" in caplog.text and "--device cpu" in caplog.text


# ---- problem 1/2 in the report: an incomplete member family is refused, or listed loudly


def test_report_refuses_an_incomplete_member_family(tmp_path: Path, capsys) -> None:
    from test_report import SETS, _fabricate

    from asr.cli import main
    from asr.io import atomic_write_json
    from asr.report import ReportError, build_results

    exp = tmp_path / "mini"
    _fabricate(exp)
    atomic_write_json(exp / "members" / "members.json", [{"name": f"seed{i}", "seed": i} for i in (1, 2, 3)])
    build_results(exp, "mini", SETS)                      # complete: fine
    (exp / "decode" / "member-seed2" / "test-clean" / "wer.json").unlink()
    shutil.rmtree(exp / "decode" / "member-seed3")
    with pytest.raises(ReportError, match=r"member-seed2 \(no test-clean\); member-seed3 \(not decoded\)"):
        build_results(exp, "mini", SETS)
    assert main(["report", "--exp-dir", str(exp), "--sets", *SETS]) == 2
    assert main(["report", "--exp-dir", str(exp), "--sets", *SETS, "--allow-incomplete"]) == 0
    out = capsys.readouterr().out
    assert "INCOMPLETE MEMBER FAMILY" in out and "member-seed3 (not decoded)" in out
    assert "incomplete member family" in (exp / "RESULTS.md").read_text()
    assert json.loads((exp / "results.json").read_text())["incomplete"] == [
        "member-seed2 (no test-clean)", "member-seed3 (not decoded)"]


# ---- problem 5: data preparation sees a fixed corpus file, and reports silent audio


def _silence(path: Path, seconds: float = 0.4) -> None:
    import soundfile as sf

    sf.write(str(path), np.zeros(int(16000 * seconds), np.float32), 16000, format="FLAC", subtype="PCM_16")


def test_silent_utterance_is_reported(tiny_librispeech: Path, tmp_path: Path) -> None:
    from data_prep.librispeech import CorpusError, prepare_librispeech

    bad = tiny_librispeech / "dev-clean" / "19" / "198" / "19-198-0001.flac"
    _silence(bad)
    with pytest.raises(CorpusError, match=r"19-198-0001.flac: silent or near-silent audio \(digital silence"):
        prepare_librispeech(tiny_librispeech, ["dev-clean"], tmp_path / "data")
    prepare_librispeech(tiny_librispeech, ["dev-clean"], tmp_path / "data", skip_bad=True)
    listed = (tmp_path / "data" / "dev-clean" / "bad_utts.txt").read_text()
    assert listed.startswith("19-198-0001\t") and "silent" in listed
    ids = [json.loads(x)["id"] for x in (tmp_path / "data" / "dev-clean" / "manifest.jsonl").read_text().splitlines()]
    assert "19-198-0001" not in ids and len(ids) == 5
    # The threshold is configurable: at -200 dBFS only digital silence is left out; quiet audio passes.
    import soundfile as sf

    sf.write(str(bad), (1e-4 * np.sin(np.arange(6400) / 5)).astype(np.float32), 16000, format="FLAC")
    prepare_librispeech(tiny_librispeech, ["dev-clean"], tmp_path / "data2", min_rms_db=-200)
    assert not (tmp_path / "data2" / "dev-clean" / "bad_utts.txt").exists()


def test_fixed_corpus_file_is_picked_up_by_a_rerun(tiny_librispeech: Path, tmp_path: Path) -> None:
    from conftest import write_flac

    from data_prep.librispeech import prepare_librispeech

    bad = tiny_librispeech / "dev-clean" / "19" / "198" / "19-198-0001.flac"
    _silence(bad)
    out = tmp_path / "data"
    prepare_librispeech(tiny_librispeech, ["dev-clean"], out, skip_bad=True)
    assert "19-198-0001" in (out / "dev-clean" / "bad_utts.txt").read_text()
    write_flac(bad, seconds=0.4, seed=7)                  # the user fixes the file
    prepare_librispeech(tiny_librispeech, ["dev-clean"], out, skip_bad=True)
    ids = [json.loads(x)["id"] for x in (out / "dev-clean" / "manifest.jsonl").read_text().splitlines()]
    assert "19-198-0001" in ids and not (out / "dev-clean" / "bad_utts.txt").exists()


def test_recipe_stage_1_picks_up_a_fixed_transcript(tmp_path: Path) -> None:
    """Through the recipe: the manifests step's stamp covers the corpus files."""
    import os
    import sys

    from conftest import make_librispeech

    corpus = tmp_path / "LibriSpeech"
    sets = ["train-clean-100", "dev-clean", "dev-other", "test-clean", "test-other"]
    for i, subset in enumerate(sets):
        make_librispeech(corpus, subset, {str(100 + i): {"10": ["HELLO WORLD", "THE QUICK BROWN FOX"]}})
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = [str(ROOT / "recipes" / "librispeech" / "run.sh"), "--corpus-dir", str(corpus), "--exp", str(tmp_path / "exp"),
           "--stage", "1", "--stop-stage", "1", "--nj", "1", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trans = corpus / "dev-clean" / "101" / "10" / "101-10.trans.txt"
    trans.write_text(trans.read_text().replace("HELLO WORLD", "HELLO THERE WORLD"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    texts = [json.loads(x)["text"] for x in (tmp_path / "exp" / "data" / "dev-clean" / "manifest.jsonl").read_text().splitlines()]
    assert "HELLO THERE WORLD" in texts


@pytest.mark.parametrize("recipe", ["mini", "librispeech"])
@pytest.mark.parametrize("args,msg", [
    (("--nj", "0"), "--nj must be >= 1"), (("--members", "0"), "--members must be >= 1"),
    (("--students", "distill;touch x"), "--students: 'distill;touch' must be distill or distill_<name>"),
    (("--students", "distill_nope"), "--students: no"),
    (("--stage", "abc"), "--stage must be a whole number"), (("--stage", "99"), "--stage must be <= 9"),
    (("--stage", "5", "--stop-stage", "3"), "--stop-stage (3) must be >= --stage (5)"),
    (("--ensemble-sizes", "1,20"), "--ensemble-sizes: every value must be <= 10"),
])
def test_recipes_reject_bad_options_before_any_step(tmp_path: Path, recipe: str, args: tuple[str, ...],
                                                     msg: str) -> None:
    import os
    import sys

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    exp = tmp_path / "exp"
    r = subprocess.run([str(ROOT / "recipes" / recipe / "run.sh"), "--exp", str(exp), "--corpus-dir" if recipe ==
                        "librispeech" else "--seed", str(tmp_path) if recipe == "librispeech" else "1", *args],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert msg in r.stderr
    assert not exp.exists(), "nothing was written"
