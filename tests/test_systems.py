"""asr.systems and asr.decode: recognising system folders; per-set fingerprints; stale sets replaced,
never emptied."""

from __future__ import annotations

import numpy as np
import pytest

from asr.io import atomic_write_json
from asr.decode import _replace_dir, _set_fingerprint
from asr.systems import SetPaths, System, SystemDirError, open_system


def test_a_stale_set_is_replaced_only_by_a_complete_one(tmp_path):
    out = tmp_path / "decode" / "member-seed2"
    (out / "dev-clean").mkdir(parents=True)
    (out / "dev-clean" / "wer.json").write_text('{"wer": 1}')
    (out / "test-clean").mkdir()
    (out / "test-clean" / "wer.json").write_text('{"wer": 2}')
    new = out / ".dev-clean.new"
    new.mkdir()
    (new / "wer.json").write_text('{"wer": 3}')
    _replace_dir(new, out / "dev-clean")
    assert (out / "dev-clean" / "wer.json").read_text() == '{"wer": 3}'
    assert (out / "test-clean" / "wer.json").read_text() == '{"wer": 2}', "other sets are never touched"
    assert sorted(p.name for p in out.iterdir()) == ["dev-clean", "test-clean"]


def test_set_fingerprint_depends_on_that_sets_inputs_only(tmp_path):
    from asr.decode import DecodeConfig

    sysdir = tmp_path / "members" / "seed2"
    (sysdir / "post").mkdir(parents=True)
    for s in ("dev-clean", "test-clean"):
        np.save(sysdir / "post" / f"{s}.npy", np.zeros((3, 7), np.float16))
    system = System({"name": "member-seed2", "kind": "member", "seed": 2, "params": 1}, sysdir)
    dev, test = (SetPaths.from_exp(tmp_path, s) for s in ("dev-clean", "test-clean"))
    graph = tmp_path / "graph"
    fp = _set_fingerprint(system, dev, graph, None, DecodeConfig())
    assert fp == _set_fingerprint(system, dev, graph, None, DecodeConfig())
    np.save(sysdir / "post" / "test-clean.npy", np.zeros((4, 7), np.float16))     # another set changes
    assert fp == _set_fingerprint(system, dev, graph, None, DecodeConfig())
    assert fp != _set_fingerprint(system, dev, graph, None, DecodeConfig(acwt=0.5))
    np.save(sysdir / "post" / "dev-clean.npy", np.ones((4, 7), np.float16))       # its own posteriors
    assert fp != _set_fingerprint(system, dev, graph, None, DecodeConfig())


def test_open_system_ensemble_and_unknown(tmp_path):
    from asr.models import build_stack, get_arch, save_model

    members = []
    for seed in (1, 2):
        d = tmp_path / "members" / f"seed{seed}"
        stack = build_stack(get_arch("small"), 40, 7, [seed])
        save_model(stack, d / "model.pt")
        members.append(str(d))
    ens = tmp_path / "ensemble" / "post_2"
    ens.mkdir(parents=True)
    atomic_write_json(ens / "members.json", {"k": 2, "mode": "arithmetic", "members": members})
    np.save(ens / "dev-clean.npy", np.zeros((3, 7), np.float16))
    sysm = open_system(ens)
    assert (sysm.name, sysm.kind, sysm.info["members"]) == ("ensemble-2", "ensemble", 2)
    one = open_system(members[1])
    assert (one.name, one.kind, one.info["seed"]) == ("member-seed2", "member", 2)
    assert sysm.info["params"] == 2 * one.info["params"]
    with pytest.raises(SystemDirError, match="not a system directory"):
        open_system(tmp_path)
