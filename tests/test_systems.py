"""asr.systems: recognising system folders and discarding decode results made from other inputs."""

from __future__ import annotations

import numpy as np
import pytest

from asr.io import atomic_write_json
from asr.systems import SystemDirError, _clear_if_stale, open_system


def test_stale_results_are_cleared_but_logs_kept(tmp_path):
    out = tmp_path / "decode" / "member-seed2"
    _clear_if_stale(out, "aaaa")
    (out / "dev-clean").mkdir()
    (out / "dev-clean" / "wer.json").write_text("{}")
    (out / "tune.json").write_text("{}")
    (out / "log").mkdir()
    (out / "log" / "decode.log").write_text("# asr decode ...")
    _clear_if_stale(out, "aaaa")                      # same inputs: results kept
    assert (out / "dev-clean" / "wer.json").is_file() and (out / "tune.json").is_file()
    _clear_if_stale(out, "bbbb")                      # new inputs: results dropped, log kept
    assert sorted(p.name for p in out.iterdir()) == ["inputs.sha1", "log"]
    assert (out / "inputs.sha1").read_text().strip() == "bbbb"


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
