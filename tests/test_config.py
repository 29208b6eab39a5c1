"""Config files that say something, and ``--print-config`` on every step that takes ``--config``."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest
import yaml

from asr.cli import COMMANDS, build_parser, main
from asr.config import config_to_dict, load_config
from asr.features import FeatureConfig

REPO = Path(__file__).resolve().parents[1]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def test_every_step_with_a_config_prints_it() -> None:
    subs = _subparsers()
    assert set(subs) == set(COMMANDS)
    with_config = [name for name, p in subs.items() if "--config" in _options(p)]
    assert len(with_config) >= 12, with_config
    missing = [name for name in with_config if "--print-config" not in _options(subs[name])]
    assert not missing, f"steps with --config but no --print-config: {missing}"


def test_print_config_resolves_defaults_file_and_set_and_writes_nothing(tmp_path, capsys) -> None:
    conf = tmp_path / "fbank.yaml"
    conf.write_text("num_mel_bins: 23\ndither: 0.5\n")
    out = tmp_path / "feats"
    with pytest.raises(SystemExit) as e:
        main(["make-feats", "--manifest", str(tmp_path / "none.jsonl"), "--out-dir", str(out),
              "--config", str(conf), "--set", "dither=0.25", "--print-config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    want = config_to_dict(load_config(FeatureConfig, conf, {"dither": "0.25"}))
    assert printed == want
    assert printed["num_mel_bins"] == 23 and printed["dither"] == 0.25       # file, then --set
    assert printed["frame_shift_ms"] == FeatureConfig().frame_shift_ms         # the rest: defaults
    assert not out.exists(), "--print-config must not run the step"


def test_print_config_without_a_file_is_the_defaults(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["make-feats", "--manifest", "m.jsonl", "--out-dir", str(tmp_path / "f"), "--print-config"])
    assert e.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out) == config_to_dict(FeatureConfig())


@pytest.mark.parametrize("argv", [
    ["prepare-lexicon", "--out", "OUT", "top_oov=3", "--print-config"],
    ["build-mini-corpus", "--out-dir", "OUT", "--num-utts", "7", "--print-config"],
    ["prepare-lang", "--lexicon", "lex.txt", "--out-dir", "OUT", "--print-config"],
    ["decode", "--exp-dir", "OUT", "--system", "s", "--sets", "dev", "--set", "beam=9", "--print-config"],
])
def test_print_config_of_steps_with_their_own_options(argv, tmp_path, capsys) -> None:
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert isinstance(printed, dict) and printed
    if "top_oov=3" in argv:
        assert printed["top_oov"] == 3
    if "--num-utts" in argv:
        assert printed["num_utts"] == 7
    if "beam=9" in argv:
        assert printed["beam"] == 9.0
    assert not (tmp_path / "out").exists()


def test_recipe_conf_files_say_something() -> None:
    files = sorted(REPO.glob("recipes/*/conf/*.yaml"))
    assert files
    empty = [str(f.relative_to(REPO)) for f in files if not yaml.safe_load(f.read_text())]
    assert not empty, f"conf files that override nothing (delete them: defaults apply): {empty}"


def test_pipeline_passes_a_conf_file_only_where_it_exists(tmp_path) -> None:
    """conf_opts / conf_input of recipes/common/pipeline.sh: no file, no --config and no stamp input;
    a file added later shows up in both (so the step's stamp changes and it reruns)."""
    conf = tmp_path / "conf"
    conf.mkdir()
    script = f"""
        set -eu
        stage=99; stop_stage=0; exp={tmp_path}/exp; conf={conf}; members=1; students=""
        train_set=t; dev_sets=d; test_sets=e; transfer_sets=""; train_overrides=""; ngpu=1
        . recipes/common/stage.sh
        . recipes/common/pipeline.sh
        conf_opts lang; echo "opts[${{#CONF[@]}}]=${{CONF[*]:-}} input=$(conf_input lang)"
        echo "beam: 9" > "$conf/lang.yaml"
        conf_opts lang; echo "opts[${{#CONF[@]}}]=${{CONF[*]:-}} input=$(conf_input lang)"
    """
    r = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("opts")]
    assert lines == ["opts[0]= input=", f"opts[2]=--config {conf}/lang.yaml input={conf}/lang.yaml"]
