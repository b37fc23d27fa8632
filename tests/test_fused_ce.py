"""The fused linear + cross-entropy loss (lit_gpt/fused_ce.py) against a float64 loop, on CPU; its Triton kernel
under Triton's CPU interpreter."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_gpt import GPT, Config
from lit_gpt.fused_ce import ce_grad_inplace_torch, fused_linear_cross_entropy, linear_cross_entropy
from reference import cross_entropy_loop

ROOT = Path(__file__).resolve().parents[1]


def _case(N=11, C=6, V=13, dtype=torch.float64, ignore=(2, 7)):
    h = torch.randn(N, C, dtype=dtype, requires_grad=True)
    w = torch.randn(V, C, dtype=dtype, requires_grad=True)
    t = torch.randint(0, V, (N,))
    for i in ignore:
        t[i] = -100
    return h, w, t


@pytest.mark.parametrize("chunk_rows", [1, 4, 11, 64])
def test_fused_loss_and_grads_match_loop(chunk_rows):
    h, w, t = _case()
    loss = fused_linear_cross_entropy(h, w, t, chunk_rows=chunk_rows)
    (2.5 * loss).backward()                  # backward scales the stored gradients by the incoming gradient
    ref_loss, ref_gh, ref_gw = cross_entropy_loop(h, w, t.tolist())
    assert abs(loss.item() - ref_loss) < 1e-12
    assert torch.allclose(h.grad, 2.5 * ref_gh, atol=1e-12)
    assert torch.allclose(w.grad, 2.5 * ref_gw, atol=1e-12)


def test_plain_impl_matches_loop_and_auto_is_plain_on_cpu():
    h, w, t = _case(dtype=torch.float32)
    ref_loss, ref_gh, ref_gw = cross_entropy_loop(h, w, t.tolist())
    for impl in ("plain", "auto"):
        h.grad = w.grad = None
        loss = linear_cross_entropy(h, w, t, impl=impl)
        loss.backward()
        assert abs(loss.item() - ref_loss) < 1e-5
        assert torch.allclose(h.grad.double(), ref_gh, atol=1e-5) and torch.allclose(w.grad.double(), ref_gw, atol=1e-5)
    with pytest.raises(ValueError, match="loss_impl='triton' is invalid; allowed: auto, fused, plain"):
        linear_cross_entropy(h, w, t, impl="triton")


def test_bf16_autocast_keeps_fp32_params_and_bf16_accuracy():
    h, w, t = _case(N=40, C=16, V=50, dtype=torch.float32, ignore=(0,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, t, chunk_rows=16)
    loss.backward()
    ref_loss, ref_gh, ref_gw = cross_entropy_loop(h, w, t.tolist())
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert abs(loss.item() - ref_loss) / ref_loss < 2e-2
    assert float((w.grad.double() - ref_gw).norm() / ref_gw.norm()) < 3e-2


def test_all_targets_ignored_gives_zero_loss_and_grads():
    h, w, t = _case(N=4, ignore=())
    t[:] = -100
    loss = fused_linear_cross_entropy(h, w, t, chunk_rows=3)
    loss.backward()
    assert loss.item() == 0.0 and float(h.grad.abs().max()) == 0.0 and float(w.grad.abs().max()) == 0.0


def test_no_grad_call_returns_the_loss():
    h, w, t = _case()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, t, chunk_rows=5)
    assert abs(loss.item() - cross_entropy_loop(h, w, t.tolist())[0]) < 1e-12


@pytest.mark.parametrize("impl", ["fused", "plain"])
def test_model_targets_path_equals_cross_entropy_of_logits(impl):
    cfg = Config.from_name("tiny", block_size=16, tie_embeddings=True)
    model = GPT(cfg).double()
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    y = x[:, 1:].clone()
    y[:, :3] = -100                                          # e.g. train.loss_skip_first
    logits = model(x[:, :-1])
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = model(x[:, :-1], targets=y, loss_impl=impl)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-12
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-12), n
    with pytest.raises(ValueError, match="targets and return_analysis cannot be combined"):
        model(x[:, :-1], targets=y, return_analysis=True)


def test_triton_kernel_matches_torch_pass_in_interpreter():
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from lit_gpt.fused_ce import ce_grad_inplace_torch, ce_grad_inplace_triton
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            n, V = 6, 150                                     # V not a multiple of the block
            logits = (3 * torch.randn(n, V)).to(dtype)
            t = torch.randint(0, V, (n,)); t[1] = -100
            scale = torch.tensor(1 / 5.0)
            a, b = logits.clone(), logits.clone()
            la = ce_grad_inplace_torch(a, t, scale)
            lb = ce_grad_inplace_triton(b, t, scale, block=64)
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            assert torch.allclose(la, lb, atol=tol * 10), (la, lb)
            assert torch.allclose(a.float(), b.float(), atol=tol), (a - b).abs().max()
            assert float(b[1].abs().max()) == 0.0
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_torch_pass_overwrites_logits_with_the_gradient():
    logits = torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([4, -100, 0])
    g = logits.clone()
    loss = ce_grad_inplace_torch(g, t, torch.tensor(0.5))
    p = torch.softmax(logits, -1)
    assert torch.allclose(loss, torch.stack([torch.logsumexp(logits[0], 0) - logits[0, 4], torch.tensor(0.0).double(),
                                             torch.logsumexp(logits[2], 0) - logits[2, 0]]))
    expect = 0.5 * (p - F.one_hot(t.clamp(min=0), 5).double())
    expect[1] = 0
    assert torch.allclose(g, expect)
