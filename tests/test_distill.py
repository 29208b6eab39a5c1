"""Soft targets (on the fly and top-k cached), the distillation loss, and the distill stage."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from asr.distill import (
    DistillConfig,
    DistillError,
    DistillObjective,
    SoftTargetConfig,
    SoftTargetSource,
    TeacherEnsemble,
    TopKCache,
    TopKTargets,
    compute_topk_targets,
    dense_from_topk,
    distill,
    read_topk,
    soft_targets,
    temperature_name,
    topk_from_probs,
    write_soft_target_caches,
    write_topk,
)
from asr.frames import FrameBatch, FrameData, splice
from asr.models import build_stack, get_arch, load_model, save_model

torch.set_num_threads(1)

ARCH = get_arch("small", left=2, right=2, window_step=1, hidden_layers=1, hidden_dim=16)
FEAT, PDFS = 6, 9


def _data(n_utts: int = 12, seed: int = 0) -> FrameData:
    """Tiny frame task: the label is a noisy function of the current frame's features."""
    g = np.random.default_rng(seed)
    lengths = g.integers(20, 40, size=n_utts)
    feats = g.normal(size=(int(lengths.sum()), FEAT)).astype(np.float32)
    w = np.random.default_rng(123).normal(size=(FEAT, PDFS))
    labels = (feats @ w + g.normal(scale=1.0, size=(feats.shape[0], PDFS))).argmax(1)
    return FrameData.from_arrays(feats, lengths, labels, num_pdfs=PDFS)


def _batch(data: FrameData, idx: torch.Tensor) -> FrameBatch:
    x = splice(data.feats, idx, ARCH.left, ARCH.right, data.utt_start, data.utt_end)
    return FrameBatch(x=x, labels=data.labels[idx], frame_idx=idx)


# ---------------------------------------------------------------------------------------------
# Soft targets


@pytest.mark.parametrize("t", [1.0, 2.0, 5.0, 10.0])
def test_soft_targets_sum_to_one_and_match_hand_mean(t):
    logits = torch.randn(3, 11, PDFS) * 4
    q = soft_targets(logits, t)
    assert q.shape == (11, PDFS)
    torch.testing.assert_close(q.sum(1), torch.ones(11), atol=1e-6, rtol=0)
    e = np.exp(logits.numpy().astype(np.float64) / t)
    hand = (e / e.sum(-1, keepdims=True)).mean(0)
    np.testing.assert_allclose(q.numpy(), hand, atol=1e-6)


def test_higher_temperature_is_softer():
    logits = torch.randn(2, 20, PDFS) * 3
    ent = [float(-(q * q.log()).sum(1).mean()) for q in (soft_targets(logits, t) for t in (1, 2, 5, 10))]
    assert ent == sorted(ent) and ent[-1] > ent[0] + 0.1


def test_soft_targets_reject_bad_input():
    with pytest.raises(ValueError):
        soft_targets(torch.zeros(4, PDFS), 2.0)
    with pytest.raises(ValueError):
        soft_targets(torch.zeros(1, 4, PDFS), 0.0)


def test_teacher_ensemble_is_exact_no_grad_and_caches_the_batch():
    data = _data()
    model = build_stack(ARCH, FEAT, PDFS, [1, 2, 3]).train()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    teacher = TeacherEnsemble(model)
    assert isinstance(teacher, SoftTargetSource)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    batch = _batch(data, torch.arange(0, 64))
    q2 = teacher.targets(batch, 2.0)
    q5 = teacher.targets(batch, 5.0)
    assert len(calls) == 1  # one teacher pass for both temperatures
    with torch.no_grad():
        torch.testing.assert_close(q2, soft_targets(model(batch.x), 2.0))
    assert not q5.requires_grad
    assert len(calls) == 2  # (the check above ran the model once more)
    teacher.targets(_batch(data, torch.arange(64, 100)), 2.0)
    assert len(calls) == 3  # a new batch: a new teacher pass


# ---------------------------------------------------------------------------------------------
# Top-k caches


def _probs(rows: int = 40, pdfs: int = PDFS, t: float = 2.0) -> torch.Tensor:
    return soft_targets(torch.randn(3, rows, pdfs) * 3, t)


def test_topk_round_trip_identical(tmp_path):
    v, i, r = topk_from_probs(_probs(), 4)
    t = TopKTargets(v, i, r, temperature=2.0, k=4, num_pdfs=PDFS)
    write_topk(tmp_path / "c.npz", t)
    back = read_topk(tmp_path / "c.npz")
    for name in ("values", "indices", "rest"):
        a, b = getattr(t, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert (back.temperature, back.k, back.num_pdfs) == (2.0, 4, PDFS)
    assert back.values.dtype == np.float16 and back.indices.dtype == np.int16 and back.rest.dtype == np.float32
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:  # readable without pickle
        assert set(z.files) == {"values", "indices", "rest", "T", "k", "num_pdfs"}


def test_topk_with_all_pdfs_reproduces_dense_targets():
    q = _probs()
    v, i, r = topk_from_probs(q, PDFS)
    dense = dense_from_topk(torch.from_numpy(v), torch.from_numpy(i), torch.from_numpy(r), PDFS)
    torch.testing.assert_close(dense, q, atol=1e-3, rtol=0)
    assert float(torch.from_numpy(r).abs().max()) < 1e-2


def test_topk_spreads_rest_uniformly():
    q = _probs(rows=25)
    k = 3
    v, i, r = topk_from_probs(q, k)
    dense = dense_from_topk(torch.from_numpy(v), torch.from_numpy(i), torch.from_numpy(r), PDFS)
    torch.testing.assert_close(dense.sum(1), torch.ones(25), atol=1e-5, rtol=0)
    top = torch.topk(q, k, dim=1)
    torch.testing.assert_close(dense.gather(1, top.indices), top.values, atol=1e-3, rtol=0)
    mask = torch.ones_like(dense, dtype=torch.bool).scatter_(1, top.indices, False)
    outside = dense[mask].view(25, PDFS - k)
    expected = (1 - top.values.sum(1, keepdim=True)) / (PDFS - k)
    torch.testing.assert_close(outside, expected.expand_as(outside), atol=1e-3, rtol=0)


def test_index_dtype_widens_for_many_pdfs():
    q = _probs(rows=3, pdfs=40000)
    _, i, _ = topk_from_probs(q, 2)
    assert i.dtype == np.int32


def test_topk_cache_source():
    q2, q5 = _probs(rows=30, t=2.0), _probs(rows=30, t=5.0)
    cache = TopKCache([TopKTargets(*topk_from_probs(q, 4), temperature=t, k=4, num_pdfs=PDFS)
                       for q, t in ((q2, 2.0), (q5, 5.0))], tail="uniform")
    assert cache.temperatures == [2.0, 5.0]
    idx = torch.tensor([3, 0, 29, 3])
    batch = SimpleNamespace(frame_idx=idx)
    got = cache.targets(batch, 5.0)
    v, i, r = topk_from_probs(q5[idx], 4)
    torch.testing.assert_close(got, dense_from_topk(torch.from_numpy(v), torch.from_numpy(i),
                                                    torch.from_numpy(r), PDFS))
    with pytest.raises(DistillError, match="no top-k cache for T=1"):
        cache.targets(batch, 1.0)
    with pytest.raises(DistillError, match="outside the cache"):
        cache.targets(SimpleNamespace(frame_idx=torch.tensor([30])), 2.0)


def test_compute_topk_targets_matches_teacher():
    data = _data(n_utts=5)
    model = build_stack(ARCH, FEAT, PDFS, [1, 2])
    caches = compute_topk_targets(model, data, [1.0, 2.0], k=PDFS, batch_size=37)
    idx = torch.arange(data.num_frames)
    with torch.no_grad():
        logits = model.eval()(splice(data.feats, idx, 2, 2, data.utt_start, data.utt_end))
    for c, t in zip(caches, (1.0, 2.0)):
        assert c.num_frames == data.num_frames and c.temperature == t
        dense = dense_from_topk(*(torch.from_numpy(a) for a in (c.values, c.indices, c.rest)), PDFS)
        torch.testing.assert_close(dense, soft_targets(logits, t), atol=1e-3, rtol=0)


def test_write_soft_target_caches(tmp_path):
    data = _data(n_utts=4)
    paths = []
    for s in (1, 2):
        paths.append(save_model(build_stack(ARCH, FEAT, PDFS, [s]), tmp_path / f"seed{s}" / "model.pt"))
    cfg = SoftTargetConfig(temperatures=(2.0, 10.0), k=3, batch_size=50)
    out = write_soft_target_caches(paths, tmp_path / "unused", tmp_path / "st", cfg, data=data)
    assert [p.name for p in out] == ["topk_T2.npz", "topk_T10.npz"]
    info = json.loads((tmp_path / "st" / "info.json").read_text())
    assert info["dense_fp16_bytes"] == 2 * data.num_frames * PDFS
    assert info["caches"]["T2"]["bytes"] == out[0].stat().st_size
    assert info["caches"]["T2"]["array_bytes"] == data.num_frames * (3 * 2 + 3 * 2 + 4)
    # Softer targets put less mass into the top k.
    assert info["caches"]["T10"]["mean_topk_mass"] < info["caches"]["T2"]["mean_topk_mass"] <= 1.0
    mtime = out[0].stat().st_mtime_ns
    write_soft_target_caches(paths, tmp_path / "unused", tmp_path / "st", cfg, data=data)
    assert out[0].stat().st_mtime_ns == mtime  # done: skipped


# ---------------------------------------------------------------------------------------------
# The loss


class _FixedSource:
    def __init__(self, q: dict[float, torch.Tensor]) -> None:
        self.q = q
        self.asked: list[float] = []

    def targets(self, batch, temperature):
        self.asked.append(temperature)
        return self.q[temperature]


def test_distill_loss_equals_hand_computation():
    rows = 5
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, rows, 4, generator=g) * 2
    labels = torch.tensor([0, 3, -1, 2, 1])
    q = {t: soft_targets(torch.randn(2, rows, 4, generator=g), t) for t in (2.0, 5.0)}
    temps = [2.0, 5.0, 2.0]
    src = _FixedSource(q)
    obj = DistillObjective(temps, 0.5, src)
    got = obj(logits, SimpleNamespace(labels=labels, frame_idx=torch.arange(rows)))
    assert got.shape == (3,)
    assert sorted(src.asked) == [2.0, 5.0]  # one target computation per distinct T
    z = logits.double().numpy()
    for m, t in enumerate(temps):
        total = 0.0
        for r in range(rows):       # the soft term on every row, the hard term where there is a label
            zt = z[m, r] / t
            log_p_t = zt - math.log(np.exp(zt).sum())
            total += t * t * -float((q[t][r].double().numpy() * log_p_t).sum())
            if labels[r] >= 0:
                log_p = z[m, r] - math.log(np.exp(z[m, r]).sum())
                total += 0.5 * -log_p[int(labels[r])]
        assert float(got[m]) == pytest.approx(total / rows, rel=1e-5)


def test_distill_loss_gradient_and_eval_source():
    logits = torch.randn(2, 6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    train_src = _FixedSource({1.0: torch.full((6, 4), 0.25)})
    eval_src = _FixedSource({1.0: torch.eye(4)[labels]})
    obj = DistillObjective([1.0, 1.0], 0.0, train_src, eval_source=eval_src)
    obj(logits, SimpleNamespace(labels=labels)).sum().backward()
    assert logits.grad is not None and train_src.asked == [1.0] and eval_src.asked == []
    loss_eval = obj.for_evaluation()(logits.detach(), SimpleNamespace(labels=labels))
    assert eval_src.asked == [1.0]
    # With one-hot targets, T=1 and hard_weight 0 the loss is the plain cross-entropy.
    ce = torch.nn.functional.cross_entropy(logits.detach()[0], labels)
    assert float(loss_eval[0]) == pytest.approx(float(ce), rel=1e-5)


def test_distill_objective_validates():
    src = _FixedSource({})
    with pytest.raises(ValueError):
        DistillObjective([], 0.5, src)
    with pytest.raises(ValueError):
        DistillObjective([0.0], 0.5, src)
    with pytest.raises(ValueError, match="M=2"):
        DistillObjective([1.0, 2.0], 0.5, src)(torch.zeros(3, 2, 4), SimpleNamespace(labels=torch.zeros(2)))


def test_temperature_name():
    assert [temperature_name(t) for t in (1, 2.0, 0.5, 10)] == ["T1", "T2", "T0.5", "T10"]


# ---------------------------------------------------------------------------------------------
# The stage (tiny, both soft-target modes)


@pytest.fixture
def tiny_setup(tmp_path, monkeypatch):
    from asr.train import TrainConfig, train_stack

    sets = {"train": _data(30, seed=0), "dev": _data(8, seed=1), "test": _data(6, seed=2)}

    def fake_from_dirs(cls, feats_dir, ali_dir, cmvn="speaker", device="cpu", dtype=torch.float32):
        d = sets[str(feats_dir).rsplit("/", 1)[-1]]
        return d if ali_dir is not None else FrameData(d.feats, torch.full_like(d.labels, -1), d.utt_start,
                                                       d.utt_end, None)

    monkeypatch.setattr(FrameData, "from_dirs", classmethod(fake_from_dirs))
    tcfg = TrainConfig(arch="small", left=2, right=2, window_step=1, hidden_layers=1, hidden_dim=16, epochs=3,
                       batch_size=128, lr=3e-3, tensorboard=False, progress=False, lr_schedule="constant",
                       patience=5)
    teachers = train_stack(tcfg, sets["train"], sets["dev"], tmp_path / "members", seeds=[1, 2, 3])
    return tmp_path, teachers, sets


@pytest.mark.parametrize("mode", ["online", "cache"])
def test_distill_stage(tiny_setup, mode):
    tmp_path, teachers, sets = tiny_setup
    out = tmp_path / f"distill-{mode}"
    cfg = DistillConfig(temperatures=(1.0, 2.0), soft_targets=mode, topk=3, seed=7)
    paths = distill(cfg, tmp_path / "train", tmp_path / "ali", tmp_path / "dev", tmp_path / "ali-dev", teachers,
                    out, post_sets={"test": tmp_path / "test"})
    assert [p.parent.name for p in paths] == ["T1", "T2"]
    choice = json.loads((out / "choice.json").read_text())
    assert choice["criterion"] == "dev frame accuracy" and set(choice["per_temperature"]) == {"1", "2"}
    best = max(choice["per_temperature"], key=choice["per_temperature"].get)
    assert choice["best_temperature"] == float(best)
    for p, t in zip(paths, (1.0, 2.0)):
        model, meta = load_model(p)
        assert meta["temperature"] == t and meta["kind"] == "distilled" and meta["seed"] == 7
        assert meta["train_config"]["hidden_dim"] == 16  # the teachers' config was reused
        post = np.load(p.parent / "post" / "test.npy")
        assert post.dtype == np.float16 and post.shape == (sets["test"].num_frames, PDFS)
        np.testing.assert_allclose(np.exp(post.astype(np.float64)).sum(1), 1.0, atol=2e-2)
        assert (p.parent / "train_log.csv").is_file()
    assert (out / ".done").is_file()
    if mode == "cache":
        assert (out / "soft_targets" / "topk_T2.npz").is_file()
        assert json.loads((out / "soft_targets" / "info.json").read_text())["k"] == 3
    mtime = paths[0].stat().st_mtime_ns
    distill(cfg, tmp_path / "train", tmp_path / "ali", tmp_path / "dev", tmp_path / "ali-dev", teachers,
            out, post_sets={"test": tmp_path / "test"})
    assert paths[0].stat().st_mtime_ns == mtime


def test_distill_cli_parses(tiny_setup, monkeypatch):
    tmp_path, teachers, _ = tiny_setup
    import asr.distill as D
    from asr.cli import build_parser

    seen = {}
    monkeypatch.setattr(D, "distill", lambda cfg, *a, **k: seen.update(cfg=cfg, args=a, kw=k) or [])
    args = build_parser().parse_args([
        "distill", "--teachers", *map(str, teachers), "--train-feats", "tr", "--train-ali", "ta",
        "--dev-feats", "dv", "--dev-ali", "da", "--out-dir", str(tmp_path / "d"), "--temperatures", "2,5",
        "--soft-targets", "cache", "--post", "test=feats/test", "--train-set", "epochs=1"])
    assert args.func(args) == 0
    assert seen["cfg"].temperatures == (2.0, 5.0) and seen["cfg"].soft_targets == "cache"
    assert seen["kw"]["post_sets"] == {"test": "feats/test"}
    # --train-set overrides go on top of the teachers' own config (no --train-config file given)
    assert seen["kw"]["train_cfg"] is None and seen["kw"]["train_overrides"] == {"epochs": "1"}


def test_soft_targets_cli(tiny_setup, capsys):
    from asr.cli import main

    tmp_path, teachers, sets = tiny_setup
    out = tmp_path / "st"
    assert main(["soft-targets", "--teachers", *map(str, teachers), "--feats", str(tmp_path / "train"),
                 "--out-dir", str(out), "--temperatures", "2,5", "--k", "4"]) == 0
    c = read_topk(out / "topk_T5.npz")
    assert (c.k, c.temperature, c.num_frames) == (4, 5.0, sets["train"].num_frames)
    assert "dense fp16 would be" in capsys.readouterr().out


def test_student_config_overrides_apply_on_top_of_the_teachers():
    """--train-set overrides must not reset the student to TrainConfig() defaults (another arch)."""
    from asr.distill import _train_config_for

    cfg = _train_config_for({"train_config": {"arch": "medium", "epochs": 7, "lr": 0.01}}, None, {"epochs": "1"})
    assert (cfg.arch, cfg.epochs, cfg.lr) == ("medium", 1, 0.01)


# ---------------------------------------------------------------------------------------------
# Top-k without a flat tail, transfer rows, posterior priors, a quality floor


def test_cached_targets_match_online_at_t5_and_the_bucket_loss_is_exact():
    """T = 5 spreads mass far outside the top k: with every pdf cached the targets equal the online
    ones (fp16 rounding, atol 1e-3); with k < pdfs the bucket loss is the cross-entropy with the
    pdfs outside the top k merged into one class, while a uniform tail changes the loss."""
    from asr.distill import BucketTargets, soft_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, PDFS, generator=g) * 3
    online = soft_targets(logits, 5.0)
    full = TopKCache([TopKTargets(*topk_from_probs(online, PDFS), 5.0, PDFS, PDFS)])
    got = full.targets(SimpleNamespace(frame_idx=torch.arange(40)), 5.0)
    torch.testing.assert_close(got.probs, online, atol=1e-3, rtol=0)
    assert float(got.rest.max()) < 1e-3

    k = 3
    cache = TopKCache([TopKTargets(*topk_from_probs(online, k), 5.0, k, PDFS)], tail="bucket")
    q = cache.targets(SimpleNamespace(frame_idx=torch.arange(40)), 5.0)
    assert isinstance(q, BucketTargets) and int(q.support.sum(1).max()) == k
    log_p = torch.log_softmax(torch.randn(40, PDFS, generator=g), -1)
    support = q.support
    tail_p = (log_p.exp() * ~support).sum(1)
    hand = -(online * support * log_p).sum(1) - (online * ~support).sum(1) * tail_p.log()
    torch.testing.assert_close(soft_cross_entropy(q, log_p), hand, atol=2e-3, rtol=1e-3)
    uniform = TopKCache([TopKTargets(*topk_from_probs(online, k), 5.0, k, PDFS)], tail="uniform")
    flat = soft_cross_entropy(uniform.targets(SimpleNamespace(frame_idx=torch.arange(40)), 5.0), log_p)
    assert float((flat - hand).abs().max()) > 1e-2


def test_unlabelled_rows_get_the_soft_term_only():
    src = _FixedSource({1.0: torch.full((4, 3), 1 / 3)})
    obj = DistillObjective([1.0], 1.0, src)
    assert obj.needs_labels is False
    z = torch.randn(1, 4, 3)
    lab = obj(z, SimpleNamespace(labels=torch.tensor([0, 1, 2, 0])))
    unl = obj(z, SimpleNamespace(labels=torch.tensor([-1, -1, -1, -1])))
    soft = -(torch.full((4, 3), 1 / 3) * torch.log_softmax(z[0], -1)).sum(-1).mean()
    assert float(unl[0]) == pytest.approx(float(soft), rel=1e-6)
    assert float(lab[0]) > float(unl[0])


def test_posterior_priors_are_the_mean_posterior():
    from asr.posteriors import write_priors

    data = _data(5, seed=3)
    model = build_stack(ARCH, FEAT, PDFS, [4, 5])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        paths = write_priors(model, data, [Path(d) / "a.npy", Path(d) / "b.npy"], batch_size=17)
        got = [np.load(p) for p in paths]
    with torch.no_grad():
        x = splice(data.feats, torch.arange(data.num_frames), ARCH.left, ARCH.right, data.utt_start, data.utt_end)
        want = torch.softmax(model(x), -1).mean(1).double().numpy()
    for m in range(2):
        np.testing.assert_allclose(got[m], want[m], rtol=1e-5)
        assert got[m].sum() == pytest.approx(1.0)


def test_ensemble_beats_the_member_mean_on_a_fixed_task(tiny_setup):
    """A quality floor: on the tiny noisy task, the three members' arithmetic ensemble must beat
    their mean dev frame accuracy; it fails if averaging or the members break."""
    from asr.ensemble import ensemble_log_posteriors
    from asr.models import load_stack
    from asr.posteriors import compute_log_posteriors
    from asr.scoring import frame_accuracy

    _, teachers, sets = tiny_setup
    dev = sets["dev"]
    post = compute_log_posteriors(load_stack(teachers), dev, dtype="float32").numpy()
    labels = dev.labels.numpy()
    members = [frame_accuracy(post[m], labels)[0] for m in range(len(teachers))]
    ensemble, _ = frame_accuracy(ensemble_log_posteriors(list(post)), labels)
    assert ensemble > float(np.mean(members)) + 0.5, (ensemble, members)


def test_student_beats_the_member_mean_on_a_fixed_task(tiny_setup):
    """A quality floor: on the tiny noisy task, the distilled student (online targets, transfer
    frames) must beat the average member on dev frame accuracy; it fails if distillation breaks."""
    tmp_path, teachers, sets = tiny_setup
    members = [json.loads((p.parent / "summary.json").read_text())["best_dev_acc"] for p in teachers]
    sets["transfer"] = FrameData(_data(60, seed=9).feats, torch.full((_data(60, seed=9).num_frames,), -1,
                                                                      dtype=torch.int64),
                                 _data(60, seed=9).utt_start, _data(60, seed=9).utt_end, None)
    cfg = DistillConfig(temperatures=(2.0,), soft_targets="online", seed=7, epochs=8)
    paths = distill(cfg, tmp_path / "train", tmp_path / "ali", tmp_path / "dev", tmp_path / "ali-dev", teachers,
                    tmp_path / "student", transfer_feats_dirs=[tmp_path / "transfer"])
    student = json.loads((paths[0].parent / "summary.json").read_text())["best_dev_acc"]
    assert student > float(np.mean(members)) + 0.005, (student, members)
    diag = json.loads((tmp_path / "student" / "diagnostics.json").read_text())
    assert diag["dev"]["students"]["T2"]["agreement"] > 0.5
    assert (paths[0].parent / "priors.npy").is_file()
