"""The pieces fit() is made of (lit_gpt.trainer: setup / optimizer_step / stop_reason / validate / save / resume /
RunLog / summarize), each on its own, on CPU. The whole loop is tested in test_pretrain.py."""
from __future__ import annotations

import copy
import csv
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_helpers import make_packed, tiny_run  # noqa: E402

from lit_gpt.checkpoint import load_checkpoint  # noqa: E402
from lit_gpt.evaluate import sink_on_probe  # noqa: E402
from lit_gpt.run_config import from_dict  # noqa: E402
from lit_gpt.trainer import (PreflightError, RunLog, TrainState, lr_at, optimizer_step, preflight,  # noqa: E402
                             resume, save, setup, stop_reason, summarize, validate, validation_loss)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("data"), block_size=32)


def new_run(packed, out: Path, **train):
    cfg = from_dict(tiny_run(packed, out, **train))
    return setup(cfg, preflight(cfg))


def take(run, n):
    return [run.loader.next_batch() for _ in range(n)]


def feeder(batches):
    it = iter(batches)
    return lambda: next(it)


# ---------------------------------------------------------------------------- setup
def test_setup_builds_a_seeded_model_loader_and_optimizer(packed, tmp_path):
    a = new_run(packed, tmp_path / "a")
    b = new_run(packed, tmp_path / "b")
    c = new_run(packed, tmp_path / "c", seed=7)
    assert a.accum == 2 and a.state == TrainState() and a.resumed_from is None    # 4 = 2 micro x 1 rank x 2
    assert a.loader.micro_batch_size == 2 and a.headline == "mean"
    g = a.optimizer.param_groups[0]
    assert g["betas"] == (0.9, 0.95) and g["weight_decay"] == 0.1 and g["lr"] == 3e-3
    wa, wb, wc = (r.raw.state_dict() for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)                  # train.seed decides the initialisation
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    cfg = from_dict(tiny_run(packed, tmp_path / "d", micro_batch_size=4))
    plan = preflight(cfg)
    cfg.train.micro_batch_size = 3      # run_config refuses 4 % 3 itself; setup checks micro x world (DDP) again
    with pytest.raises(PreflightError, match=r"train.global_batch_size=4 is invalid; allowed: a multiple of "
                                             r"micro_batch_size x devices x nodes = 3 x 1 = 3"):
        setup(cfg, plan)


# ---------------------------------------------------------------------------- optimizer_step
def reference_adamw_steps(model, steps, lr, b1, b2, eps, wd, clip, skip):
    """Full-batch mean cross-entropy, global-norm clipping and AdamW written out from their formulas.
    ``steps``: one list of micro-batches per optimizer step. Returns (losses, gradient norms)."""
    params = [p for p in model.parameters()]
    m = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    v = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    losses, norms = [], []
    for t, micro in enumerate(steps, start=1):
        batch = torch.cat(micro)                        # the micro-batches are equal: their mean = the batch mean
        logits = model(batch[:, :-1])[:, skip:]
        targets = batch[:, 1 + skip:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        model.zero_grad()
        loss.backward()
        grads = [p.grad.double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64) for p in params]
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        coef = min(1.0, clip / (norm + 1e-6))
        with torch.no_grad():
            for i, p in enumerate(params):
                g = grads[i] * coef
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                mhat, vhat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
                new = p.double() * (1 - lr[t - 1] * wd) - lr[t - 1] * mhat / (vhat.sqrt() + eps)
                p.copy_(new.to(p.dtype))
        losses.append(float(loss.detach()))
        norms.append(norm)
    return losses, norms


@pytest.mark.parametrize("skip", [0, 3])
def test_optimizer_step_is_accumulated_clipped_adamw(packed, tmp_path, skip):
    # adam_eps 1e-6: float32 rounding in a near-zero gradient g moves lr * g / (|g| + eps) by up to lr * dg / eps
    run = new_run(packed, tmp_path / "run", loss_skip_first=skip, grad_clip=0.5, adam_eps=1e-6)
    assert run.plan.skip == skip and run.accum == 2
    ref = copy.deepcopy(run.raw)
    steps = [take(run, 2), take(run, 2)]
    t = run.cfg.train
    lrs = [lr_at(0, run.cfg), lr_at(1, run.cfg)]
    got_loss, got_norm = [], []
    for s, micro in enumerate(steps):
        for g in run.optimizer.param_groups:
            g["lr"] = lrs[s]
        loss_sum, grad_norm = optimizer_step(run, feeder(micro))
        got_loss.append(float(loss_sum) / run.accum)
        got_norm.append(float(grad_norm))
    ref_loss, ref_norm = reference_adamw_steps(ref, steps, lrs, t.beta1, t.beta2, t.adam_eps, t.weight_decay,
                                               t.grad_clip, skip)
    assert got_loss == pytest.approx(ref_loss, rel=1e-5)
    assert got_norm == pytest.approx(ref_norm, rel=1e-4)
    assert max(ref_norm) > t.grad_clip                   # clipping was in play
    a, b = run.raw.state_dict(), ref.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(p.grad is None for p in run.raw.parameters())     # gradients are released after the step


# ---------------------------------------------------------------------------- stop_reason
def test_stop_reason(packed, tmp_path):
    run = new_run(packed, tmp_path / "run", stop_at_step=3, max_steps=6)
    now = time.perf_counter()
    run.state.step = 2
    assert stop_reason(run, now) is None
    run.state.step = 3
    assert stop_reason(run, now) == "train.stop_at_step=3"
    run.state.step = 6                                    # the last step is never an early stop
    assert stop_reason(run, now) is None
    run = new_run(packed, tmp_path / "run2", max_time_s=60.0)
    run.state.step = 1
    assert stop_reason(run, now) is None
    assert stop_reason(run, now - 61.0) == "train.max_time_s=60.0"


# ---------------------------------------------------------------------------- validate
def test_validate_returns_the_validation_losses_and_the_probe_sink(packed, tmp_path):
    run = new_run(packed, tmp_path / "run")
    m = validate(run)
    vs = run.plan.data.valid_set
    direct = validation_loss(run.fabric, run.model, vs, run.cfg.data.valid, 2, 0, "mean")
    assert {k: m[k] for k in direct} == direct
    assert set(direct) == {"val_loss/valid_alpha", "val_loss/valid_beta", "val_loss", "val_loss_mean"}
    result, ploss = sink_on_probe(run.raw, run.plan.probe, eps=0.3, k_max=4, batch_size=4)
    assert m["_result"].sink == result.sink and m["probe_loss"] == ploss
    assert [m[f"sink_{k}"] for k in range(1, 5)] == [result.sink[k] for k in range(1, 5)]
    assert set(validate(run, do_val=False)) == {"sink_1", "sink_2", "sink_3", "sink_4", "probe_loss", "_result"}
    assert set(validate(run, do_sink=False)) == set(direct)
    assert run.model.training                             # validation hands the model back in training mode


# ---------------------------------------------------------------------------- save / resume
def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def test_save_then_resume_restores_weights_optimizer_data_and_rng(packed, tmp_path):
    out = tmp_path / "run"
    a = new_run(packed, out)
    for _ in range(2):
        optimizer_step(a, a.loader.next_batch)
    a.state = TrainState(step=2, tokens_seen=2 * 4 * 32, train_seconds=1.5)
    path = save(a, "step-0000002")
    after_save = draws()
    next_a = a.loader.next_batch()

    b = new_run(packed, out)                              # resume: auto finds the checkpoint
    assert b.plan.resume_from == [path]
    assert resume(b) == path and b.resumed_from == path
    assert draws() == after_save                          # torch, numpy and python RNG continue where they were
    assert torch.equal(b.loader.next_batch(), next_a)     # so does the data stream
    assert b.state == TrainState(step=2, tokens_seen=256, train_seconds=1.5)
    wa, wb = a.raw.state_dict(), b.raw.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"] and sorted(oa["state"]) == sorted(ob["state"])
    assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for i in oa["state"] for k in oa["state"][i])
    payload = load_checkpoint(path)
    assert payload["scheduler"] == {"kind": "cosine", "next_lr": lr_at(2, a.cfg)}
    assert payload["run_config"] == a.cfg.to_dict()


def test_resume_with_nothing_or_nothing_readable(packed, tmp_path):
    run = new_run(packed, tmp_path / "fresh")
    assert resume(run) is None and run.state == TrainState()
    out = tmp_path / "torn"
    out.mkdir()
    (out / "step-0000004").mkdir()
    (out / "step-0000004" / "model.safetensors").write_bytes(b"torn")        # no checkpoint.json
    run = new_run(packed, out)
    with pytest.raises(PreflightError, match=r"no readable checkpoint among \['step-0000004'\]"):
        resume(run)


def test_save_keeps_the_newest_step_checkpoints_and_final(packed, tmp_path):
    run = new_run(packed, tmp_path / "run", keep_last=2)
    for step in (1, 2, 3):
        run.state.step = step
        save(run, f"step-{step:07d}")
    save(run, "final")
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == \
        ["final", "step-0000002", "step-0000003"]


# ---------------------------------------------------------------------------- RunLog / summarize
def test_run_log_and_summary(packed, tmp_path):
    out = tmp_path / "run"
    run = new_run(packed, out)
    log = RunLog(run)
    assert (out / "run_config.yaml").is_file()
    log.report(0, validate(run, do_val=False))
    log.report(1, {"train_loss": 5.0, "grad_norm": None, "tokens_per_s": 10.0})
    log.speeds += [10.0, 30.0, 50.0]
    run.state = TrainState(step=1, tokens_seen=128, train_seconds=0.5)
    summary = summarize(run, log, "train.stop_at_step=1")
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "1"] and rows[1]["train_loss"] == "5.0" and rows[1]["grad_norm"] == ""
    assert rows[0]["sink_1"] != "" and "_result" not in rows[0]
    assert summary["sink_1_curve"] == [(0, float(rows[0]["sink_1"]))]
    assert summary["tokens_per_s_median"] == 40.0                     # the first interval (start-up) left out
    assert summary["final"]["train_loss"] == 5.0 and summary["stopped_early"] == "train.stop_at_step=1"
    assert json.loads((out / "summary.json").read_text())["tokens_seen"] == 128
    # a resumed run keeps the rows up to its checkpoint's step and drops the later ones
    run.resumed_from, run.state = out / "step-0000000", TrainState(step=0)
    RunLog(run).close()
    with open(out / "metrics.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["0"]
