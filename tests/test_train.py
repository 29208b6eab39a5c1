"""Training loop: objective, optimiser, determinism, stacked = alone, resume after a kill, DDP, outputs."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from asr.frames import FrameBatch, FrameData
from asr.models import load_model
from asr.posteriors import add_cli as add_posteriors_cli
from asr.posteriors import compute_log_posteriors, save_posteriors
from asr.train import (CrossEntropyObjective, StackedOptimizer, TrainConfig, TrainError, add_cli, evaluate,
                       train_seeds, train_stack)

torch.set_num_threads(1)

P, D = 6, 8


def _synth(n_utts: int, seed: int) -> FrameData:
    """Gaussian classes with piecewise-constant labels: learnable, not trivially separable."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(123).normal(0, 1, (P, D))
    lengths = rng.integers(15, 40, n_utts)
    labels = np.concatenate([np.repeat(rng.integers(0, P, L // 4 + 1), 4)[:L] for L in lengths])
    feats = means[labels] + rng.normal(0, 1.2, (len(labels), D))
    return FrameData.from_arrays(feats.astype(np.float32), lengths, labels, num_pdfs=P)


TRAIN = _synth(60, 1)
DEV = _synth(15, 2)
CFG = TrainConfig(arch="small", left=2, right=2, window_step=1, hidden_layers=2, hidden_dim=24, epochs=3,
                  batch_size=64, lr=3e-3, lr_schedule="constant", patience=10, tensorboard=False,
                  progress=False, checkpoint_every_steps=0)


def _weights(path):
    return load_model(path)[0].state_dict()


def _last_weights():
    store = {}

    def cb(step, model):
        store["w"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        store["step"] = step
    return store, cb


def test_cross_entropy_objective_per_member_ignores_unlabelled():
    logits = torch.randn(3, 5, 4)
    labels = torch.tensor([0, -1, 3, 2, -1])
    got = CrossEntropyObjective()(logits, FrameBatch(torch.zeros(5, 1), labels, torch.arange(5)))
    keep = labels >= 0
    for m in range(3):
        ref = torch.nn.functional.cross_entropy(logits[m, keep], labels[keep])
        torch.testing.assert_close(got[m], ref)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_stacked_optimizer_matches_torch_and_freezes_inactive(opt):
    torch.manual_seed(0)
    w0 = torch.randn(2, 4, 3)
    cfg = dataclasses.replace(CFG, optimizer=opt, lr=0.05, weight_decay=0.01)
    p = torch.nn.Parameter(w0.clone())
    ref = torch.nn.Parameter(w0[0].clone())
    mine = StackedOptimizer([p], cfg, 2)
    theirs = (torch.optim.AdamW([ref], lr=0.05, weight_decay=0.01) if opt == "adam"
              else torch.optim.SGD([ref], lr=0.05, momentum=0.9, weight_decay=0.01))
    active = torch.tensor([True, False])
    for step in range(5):
        g = torch.randn(2, 4, 3)
        p.grad = g.clone()
        mine.step(active)
        ref.grad = g[0].clone()
        theirs.step()
    torch.testing.assert_close(p[0].detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(p[1].detach(), w0[1])           # inactive member untouched
    assert mine.steps.tolist() == [5, 0]


def test_training_learns_and_writes_outputs(tmp_path):
    paths = train_stack(dataclasses.replace(CFG, tensorboard=True), TRAIN, DEV, tmp_path, [1, 2])
    assert [p.parent.name for p in paths] == ["seed1", "seed2"]
    model, meta = load_model(paths[0])
    s = meta["summary"]
    assert s["seed"] == 1 and s["params"] == model.params_per_member and s["epochs_trained"] == 3
    assert s["best_dev_acc"] > 0.5                      # chance is 1/6
    rows = list(csv.DictReader(open(tmp_path / "seed1" / "train_log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert any((tmp_path / "seed1" / "tb").iterdir())
    assert (tmp_path / ".done").is_file() and not (tmp_path / "train_state.pt").exists()
    # posteriors: every frame, log-probabilities, accuracy equal to the logged best dev accuracy
    lp = compute_log_posteriors(model, DEV)
    assert lp.shape == (1, DEV.num_frames, P)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(1, DEV.num_frames))
    acc = (lp[0].argmax(-1) == DEV.labels).float().mean().item()
    assert abs(acc - s["best_dev_acc"]) < 1e-6
    out = save_posteriors(model, DEV, [tmp_path / "post" / "dev.npy"])
    arr = np.load(out[0], allow_pickle=False)
    assert arr.dtype == np.float16 and arr.shape == (DEV.num_frames, P)
    np.testing.assert_allclose(arr.astype(np.float32), lp[0].numpy(), atol=2e-2, rtol=1e-2)
    # done: a rerun skips without touching the checkpoints
    mtime = paths[0].stat().st_mtime_ns
    assert train_stack(CFG, TRAIN, DEV, tmp_path, [1, 2]) == paths
    assert paths[0].stat().st_mtime_ns == mtime


def test_same_seed_gives_bitwise_identical_checkpoint(tmp_path):
    a = train_stack(CFG, TRAIN, DEV, tmp_path / "a", [7])
    b = train_stack(CFG, TRAIN, DEV, tmp_path / "b", [7])
    c = train_stack(CFG, TRAIN, DEV, tmp_path / "c", [8])
    wa, wb, wc = _weights(a[0]), _weights(b[0]), _weights(c[0])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_stacked_member_equals_member_trained_alone(tmp_path):
    cfg = dataclasses.replace(CFG, data_order_seed=5)
    stack = train_stack(cfg, TRAIN, DEV, tmp_path / "stack", [1, 2, 3])
    alone = train_stack(cfg, TRAIN, DEV, tmp_path / "alone", [2])
    ws, wa = _weights(stack[1]), _weights(alone[0])
    for k in ws:
        torch.testing.assert_close(ws[k], wa[k], rtol=1e-4, atol=1e-5)
    # a lone member without data_order_seed uses its own seed for the order: different weights
    own = _weights(train_stack(CFG, TRAIN, DEV, tmp_path / "own", [2])[0])
    assert not all(torch.allclose(own[k], wa[k], atol=1e-3) for k in own)


class _Killed(RuntimeError):
    pass


@pytest.mark.parametrize("dropout", [None, 0.3])
def test_resume_after_kill_mid_epoch_gives_same_weights(tmp_path, dropout):
    """Also with dropout, whose masks come from the global RNG seeded per batch."""
    cfg = dataclasses.replace(CFG, checkpoint_every_steps=5, lr_schedule="newbob", newbob_start=0.05,
                              dropout=dropout)
    ref = train_stack(cfg, TRAIN, DEV, tmp_path / "ref", [1, 2])
    steps_per_epoch = -(-TRAIN.num_labelled // cfg.batch_size)
    kill_at = steps_per_epoch + 8                     # mid epoch 2, 3 steps after a checkpoint

    def killer(step, model):
        if step == kill_at:
            raise _Killed()
    with pytest.raises(_Killed):
        train_stack(cfg, TRAIN, DEV, tmp_path / "run", [1, 2], step_callback=killer)
    assert (tmp_path / "run" / "train_state.pt").is_file() and not (tmp_path / "run" / ".done").exists()
    seen = []
    got = train_stack(cfg, TRAIN, DEV, tmp_path / "run", [1, 2], step_callback=lambda s, m: seen.append(s))
    assert seen[0] == (kill_at // 5) * 5 + 1             # resumed from the last checkpoint
    for r, g in zip(ref, got):
        wr, wg = _weights(r), _weights(g)
        assert all(torch.equal(wr[k], wg[k]) for k in wr)
        assert (r.parent / "train_log.csv").read_text().split("\n")[1].split(",")[:6] == \
               (g.parent / "train_log.csv").read_text().split("\n")[1].split(",")[:6]
    # a state file of another run is refused
    with pytest.raises(_Killed):
        train_stack(cfg, TRAIN, DEV, tmp_path / "other", [1, 2], step_callback=killer)
    with pytest.raises(TrainError, match="different run"):
        train_stack(dataclasses.replace(cfg, lr=1e-2), TRAIN, DEV, tmp_path / "other", [1, 2])


class _MarkedEvalObjective(CrossEntropyObjective):
    """Cross-entropy for training; for dev a criterion that marks itself (loss 7 for every member)."""

    def for_evaluation(self):
        return lambda logits, batch: torch.full((logits.shape[0],), 7.0)


def test_dev_is_scored_with_the_objectives_evaluation_criterion(tmp_path):
    """The objective says what dev needs (``for_evaluation``); the global grad mode plays no part."""
    paths = train_stack(dataclasses.replace(CFG, epochs=1), TRAIN, DEV, tmp_path, [1], objective=_MarkedEvalObjective())
    rows = list(csv.DictReader(open(paths[0].parent / "train_log.csv")))
    assert float(rows[0]["dev_loss"]) == 7.0 and float(rows[0]["train_loss"]) != 7.0
    model = load_model(paths[0])[0]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            loss, acc, n = evaluate(model, DEV, CFG, _MarkedEvalObjective())
        assert loss.tolist() == [7.0] and n == DEV.num_labelled
        assert abs(float(acc[0]) - float(rows[0]["dev_acc"])) < 1e-6


def test_newbob_halves_then_stops_members(tmp_path):
    cfg = dataclasses.replace(CFG, epochs=6, lr_schedule="newbob", newbob_start=1.0, newbob_end=1.0)
    paths = train_stack(cfg, TRAIN, DEV, tmp_path, [1, 2])
    rows = list(csv.DictReader(open(tmp_path / "seed1" / "train_log.csv")))
    # epoch 1 sets the baseline; epoch 2 improves by less than 1.0: halve; epoch 3 while halving: stop
    assert [float(r["lr"]) for r in rows] == [cfg.lr, cfg.lr, cfg.lr / 2]
    assert [int(r["active"]) for r in rows] == [1, 1, 0]
    assert load_model(paths[1])[1]["summary"]["stop_reason"] == "newbob"


def test_tdnn_chunk_training_runs(tmp_path):
    cfg = dataclasses.replace(CFG, arch="tdnn_small", hidden_dim=16, chunk_len=8, batch_size=64, epochs=2,
                              hidden_layers=None, left=None, right=None, window_step=None)
    paths = train_stack(cfg, TRAIN, DEV, tmp_path, [1, 2])
    s = load_model(paths[0])[1]["summary"]
    assert s["best_dev_acc"] > 0.4
    with pytest.raises(TrainError, match="tdnn"):
        train_stack(dataclasses.replace(CFG, chunk_len=8), TRAIN, DEV, tmp_path / "x", [1])


DDP_CFG = dataclasses.replace(CFG, epochs=2, data_order_seed=3)
DDP_TIMEOUT_S = 240       # two spawned interpreters take ~20-60 s on 2 busy cores; a hang fails here


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Both modes in one process group: DDP over a stack of 2, then 3 members shared over 2 ranks."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        store, cb = _last_weights()
        train_stack(DDP_CFG, TRAIN, DEV, os.path.join(out, "data"), [1, 2], step_callback=cb)
        torch.save(store["w"], os.path.join(out, f"rank{rank}.pt"))
        train_seeds(dataclasses.replace(DDP_CFG, parallel="members", members=3), TRAIN, DEV,
                    os.path.join(out, "members"))
    finally:
        dist.destroy_process_group()


def _spawn(fn, nprocs: int, args: tuple, timeout_s: float) -> None:
    """``torch.multiprocessing`` spawn that fails (and ends its processes) instead of hanging."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(nprocs, *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"DDP workers still running after {timeout_s} s (a collective hangs?)")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _spawn(_ddp_worker, 2, (str(out / "init"), str(out)), DDP_TIMEOUT_S)
    return out


def _dev_acc(path: Path) -> float:
    return float(evaluate(load_model(path)[0], DEV, DDP_CFG)[1][0])


@pytest.mark.slow  # two spawned interpreters
def test_ddp_data_parallel_two_epochs_matches_single_process(ddp_runs, tmp_path):
    w0 = torch.load(ddp_runs / "rank0.pt", weights_only=True)
    w1 = torch.load(ddp_runs / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)       # ranks in lock-step
    store, cb = _last_weights()
    single = train_stack(DDP_CFG, TRAIN, DEV, tmp_path / "single", [1, 2], step_callback=cb)
    for k in w0:                                           # the same optimisation as one process
        torch.testing.assert_close(w0[k], store["w"][k], rtol=1e-4, atol=1e-5)
    frame = 1.0 / DEV.num_labelled
    for name, one in zip(("seed1", "seed2"), single):
        rows = list(csv.DictReader(open(ddp_runs / "data" / name / "train_log.csv")))
        ref = list(csv.DictReader(open(one.parent / "train_log.csv")))
        assert [int(r["epoch"]) for r in rows] == [1, 2]
        for r, q in zip(rows, ref):                        # dev scored on all of dev (halves all-reduced)
            assert abs(float(r["dev_acc"]) - float(q["dev_acc"])) <= frame + 1e-6
        s = json.loads((ddp_runs / "data" / name / "summary.json").read_text())
        assert abs(s["best_dev_acc"] - _dev_acc(ddp_runs / "data" / name / "model.pt")) <= frame + 1e-6


@pytest.mark.slow  # two spawned interpreters
def test_ddp_parallel_members_unequal_ranks_each_scored_on_all_of_dev(ddp_runs):
    """3 members over 2 ranks (rank 0: seeds 1 and 3, rank 1: seed 2) finish both epochs, and each
    member's dev accuracy is its own model's on the whole dev set, not a mix of ranks' halves."""
    for seed, rank in ((1, 0), (2, 1), (3, 0)):
        d = ddp_runs / "members" / f"seed{seed}"
        s = json.loads((d / "summary.json").read_text())
        assert s["complete"] and s["epochs_trained"] == 2 and s["seed"] == seed
        assert abs(s["best_dev_acc"] - _dev_acc(d / "model.pt")) < 1e-6
        assert (ddp_runs / "members" / "runs" / f"rank{rank}" / ".done").is_file()


class _FakeStore:
    def __init__(self, d):
        data = TRAIN if Path(d).name == "train" else DEV
        _, lengths = data.utterance_bounds()
        self.lengths = lengths.numpy()
        self.offsets = (np.cumsum(self.lengths) - self.lengths)
        self.num_frames_total = data.num_frames
        self.dim = D
        self._f = data.feats.numpy()

    def load_all(self, cmvn="speaker"):
        return self._f


def test_cli_train_members_and_posteriors(tmp_path, monkeypatch):
    mod = types.ModuleType("asr.features")
    mod.FeatureStore = _FakeStore
    monkeypatch.setitem(sys.modules, "asr.features", mod)
    for name, data in (("train", TRAIN), ("dev", DEV)):
        (tmp_path / "ali" / name).mkdir(parents=True)
        np.save(tmp_path / "ali" / name / "labels.npy", data.labels.numpy().astype(np.int32))
        (tmp_path / "ali" / name / "info.json").write_text(f'{{"num_pdfs": {P}}}')
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_cli(sub)
    add_posteriors_cli(sub)
    sets = ["--set", "hidden_dim=16", "--set", "hidden_layers=1", "--set", "epochs=1", "--set", "left=1",
            "--set", "right=1", "--set", "window_step=1", "--set", "tensorboard=false", "--set", "progress=false"]
    common = ["--feats-dir", str(tmp_path / "feats/train"), "--ali-dir", str(tmp_path / "ali/train"),
              "--dev-feats-dir", str(tmp_path / "feats/dev"), "--dev-ali-dir", str(tmp_path / "ali/dev")]
    for mode in ("--batched", "--sequential"):
        out = tmp_path / mode.strip("-")
        args = parser.parse_args(["train-members", *common, "--out-dir", str(out), "--members", "2", mode, *sets])
        assert args.func(args) == 0
        assert (out / ".done").is_file() and (out / "seed2" / "model.pt").is_file()
    # batched members share one order, sequential ones use their own seed: seed 1 differs
    wb, ws = _weights(tmp_path / "batched/seed1/model.pt"), _weights(tmp_path / "sequential/seed1/model.pt")
    assert not all(torch.allclose(wb[k], ws[k]) for k in wb)
    models = [str(tmp_path / "batched" / f"seed{i}" / "model.pt") for i in (1, 2)]
    outs = [str(tmp_path / "post" / f"seed{i}" / "dev.npy") for i in (1, 2)]
    args = parser.parse_args(["posteriors", "--model", *models, "--feats-dir", str(tmp_path / "feats/dev"),
                              "--out", *outs])
    assert args.func(args) == 0
    a = np.load(outs[1])
    ref = compute_log_posteriors(load_model(models[1])[0], DEV)[0].numpy()
    assert a.shape == (DEV.num_frames, P)
    np.testing.assert_allclose(a.astype(np.float32), ref, atol=2e-2, rtol=1e-2)


def test_bf16_autocast_on_cpu_learns_and_is_deterministic(tmp_path):
    """bf16 autocast (the mini recipe's members) trains on a CPU, repeats bit for bit, and reaches
    about the accuracy of fp32 on the toy task."""
    cfg = dataclasses.replace(CFG, dtype="bfloat16", epochs=3)
    a = train_stack(cfg, TRAIN, DEV, tmp_path / "a", [3])
    b = train_stack(cfg, TRAIN, DEV, tmp_path / "b", [3])
    f = train_stack(dataclasses.replace(cfg, dtype="float32"), TRAIN, DEV, tmp_path / "f", [3])
    wa, wb, wf = _weights(a[0]), _weights(b[0]), _weights(f[0])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wf[k]) for k in wa)          # it really ran in bf16
    acc = {n: json.loads((p[0].parent / "summary.json").read_text())["best_dev_acc"] for n, p in
           (("bf16", a), ("fp32", f))}
    assert acc["bf16"] > 1.5 / P and abs(acc["bf16"] - acc["fp32"]) < 0.05, acc
