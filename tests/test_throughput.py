"""The training loop's fast paths on CPU: the loss from ``model(x, targets=...)`` (fused or plain) is the loss of the
logits over the positions after ``loss_skip_first``; ``pretrain.py --profile`` reports phases and the bare step;
the SDPA backend choice is validated."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_helpers import make_packed, tiny_run, write_yaml  # noqa: E402

import pretrain  # noqa: E402
from lit_gpt import GPT  # noqa: E402
from lit_gpt.attention import set_sdpa_backend  # noqa: E402
from lit_gpt.data import MixtureLoader  # noqa: E402
from lit_gpt.run_config import RunConfigError, from_dict  # noqa: E402
from lit_gpt.throughput import PhaseTimer, PinnedBatches, compile_model  # noqa: E402
from lit_gpt.trainer import fit, preflight  # noqa: E402


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("data"), block_size=32)


def _first_step_losses(packed, tmp_path, impl):
    d = tiny_run(packed, tmp_path / impl, max_steps=2, global_batch_size=2, micro_batch_size=2, eval_interval=0,
                 sink_interval=0, save_interval=0, save_final=False, loss_impl=impl, loss_skip_first=5)
    seen = {}
    fit(from_dict(d), on_step_end=lambda step, last: seen.setdefault(step, last["train_loss"]))
    return d, seen


def test_logged_loss_is_the_cross_entropy_after_the_skipped_positions(packed, tmp_path):
    d, fused = _first_step_losses(packed, tmp_path, "fused")
    _, plain = _first_step_losses(packed, tmp_path, "plain")
    assert sorted(fused) == [1, 2] and all(abs(fused[s] - plain[s]) < 1e-5 for s in (1, 2))
    # step 1's loss by hand: the initial model on the loader's first batch, positions >= 5 only
    cfg = from_dict(d)
    plan = preflight(cfg)
    torch.manual_seed(cfg.train.seed)
    model = GPT(plan.mc)
    loader = MixtureLoader(plan.data.train, {k: w for k, w in cfg.data.train.items() if w > 0}, 2, cfg.data.seed,
                           0, 1, plan.data.transforms)
    batch = loader.next_batch()
    with torch.no_grad():
        logits = model(batch[:, :-1])[:, 5:]
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 6:].reshape(-1))
    assert abs(fused[1] - float(ref)) < 1e-5


def test_profile_mode_reports_phases_and_the_bare_step(packed, tmp_path, capsys):
    d = tiny_run(packed, tmp_path / "prof", eval_interval=2, sink_interval=2, save_interval=2, log_interval=2)
    cfg = write_yaml(tmp_path / "prof.yaml", d)
    assert pretrain.main(["--config", str(cfg), "--profile", "8"]) == 0
    out = capsys.readouterr().out
    assert "profile: bare optimizer step" in out and "forward + backward" in out
    prof = json.loads((tmp_path / "prof" / "profile.json").read_text())
    phases = {r["phase"]: r for r in prof["phases"]}
    assert set(phases) == {"data (load + copy)", "forward + backward", "clip + optimizer", "logging",
                           "evaluation + probes + checkpoints"}
    assert prof["steps"] == 3                       # steps 5..8 timed by phase, the first one skipped (warm-up)
    assert abs(sum(r["share_%"] for r in phases.values()) - 100) < 0.5
    assert prof["bare_step_tokens_per_s"] > 0 and prof["loop_over_bare_logged"] > 0
    from lit_gpt.checkpoint import list_checkpoints
    assert not list_checkpoints(tmp_path / "prof")             # a profile run writes no checkpoint
    summary = json.loads((tmp_path / "prof" / "summary.json").read_text())
    assert summary["step"] == 8 and summary["profile"]["bare_steps_timed"] >= 3


def test_bad_loss_impl_and_sdpa_backend_are_one_line_errors(packed, tmp_path):
    for key, value, allowed in (("loss_impl", "triton", "auto, fused, plain"),
                                ("sdpa_backend", "fa3", "auto, cudnn, flash, efficient, default"),
                                ("compile_scope", "graph", "auto, blocks, model")):
        d = tiny_run(packed, tmp_path / "bad", **{key: value})
        with pytest.raises(RunConfigError, match=f"train.{key}='{value}' is invalid; allowed: {allowed}"):
            from_dict(d)
    with pytest.raises(ValueError, match="sdpa_backend='fa3' is invalid"):
        set_sdpa_backend("fa3")


def test_sdpa_backend_order_and_cpu_helpers():
    get = getattr(torch._C, "_get_sdp_priority_order", None)
    if get is None:
        pytest.skip("this torch has no SDPA priority order")
    default = list(get())
    assert set_sdpa_backend("flash") == "flash" and list(get())[0] == int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
    assert sorted(get()) == sorted(default)
    assert set_sdpa_backend("auto") == "default" and list(get()) == default       # no GPU here
    x = torch.arange(6).view(2, 3)
    assert torch.equal(PinnedBatches(torch.device("cpu"))(x), x)
    timer = PhaseTimer(torch.device("cpu"), enabled=True, skip=0)
    timer.start()
    timer.mark("a")
    timer.end_step(10)
    s = timer.summary()
    assert s["steps"] == 1 and [r["phase"] for r in s["phases"]] == ["a"]


def test_compile_model_keeps_the_whole_model_compile_for_flex_layouts():
    from lit_gpt import Config
    plain = GPT(Config.from_name("tiny"))
    assert compile_model(plain) is plain                             # blocks compiled in place
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in plain.blocks)
    for ov in (dict(attn_mask="window", window_size=8), dict(pos_encoding="alibi"), dict(sink_logit=True)):
        m = GPT(Config.from_name("tiny", **ov))
        c = compile_model(m)
        assert c is not m and getattr(c, "_orig_mod", None) is m     # torch.compile(model)


def test_compile_scope_blocks_or_model():
    from lit_gpt import Config
    m = GPT(Config.from_name("tiny"))
    c = compile_model(m, "model")
    assert c is not m and getattr(c, "_orig_mod", None) is m
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in m.blocks)
    flex = GPT(Config.from_name("tiny", pos_encoding="alibi"))                # auto would compile the whole model
    assert compile_model(flex, "blocks") is flex
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in flex.blocks)
    with pytest.raises(ValueError, match="compile_scope='graph' is invalid; allowed: auto, blocks, model"):
        compile_model(m, "graph")


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compiled_scopes_give_the_eager_loss_and_gradients(scope):
    """Traced through dynamo and AOT autograd (backend aot_eager: the graphs inductor would get, run by eager
    kernels): the loss is the cross-entropy of the eager logits (float64), the gradients those of the eager model."""
    from lit_gpt import Config
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = Config.from_name("tiny", block_size=16)
    ref, m = GPT(cfg), GPT(cfg)
    m.load_state_dict(ref.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    inp, tgt = x[:, :-1], x[:, 1:]
    fwd = compile_model(m, scope, backend="aot_eager")
    for _ in range(2):                                   # the second call replays the compiled graphs
        m.zero_grad(set_to_none=True)
        loss = fwd(inp, targets=tgt, loss_impl="plain")
        loss.backward()
    want = F.cross_entropy(ref(inp).double().reshape(-1, cfg.vocab_size), tgt.reshape(-1))
    want.backward()
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-5
    for (name, p), q in zip(ref.named_parameters(), m.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name
    torch._dynamo.reset()


def test_the_loop_compiles_with_its_compile_scope(packed, tmp_path, monkeypatch):
    import lit_gpt.trainer as trainer
    seen = []
    monkeypatch.setattr(trainer, "compile_model", lambda model, scope: seen.append(scope) or model)
    d = tiny_run(packed, tmp_path / "c", max_steps=1, global_batch_size=2, eval_interval=0, sink_interval=0,
                 save_interval=0, save_final=False, compile=True, compile_scope="model")
    fit(from_dict(d))
    assert seen == ["model"]
