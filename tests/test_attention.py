"""Attention operations, masks and extra slots against explicit float64 loops (tests/reference.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lit_gpt.attention import (
    causal_mask, dense_mask, eager_attention, prefix_mask, sdpa_attention, set_sdpa_backend, sink_window_mask,
    window_mask,
)
from reference import attention_loop

OPS = [("softmax", True), ("sigmoid", True), ("sigmoid", False), ("elu", True), ("elu", False),
       ("elu_kernel", True), ("elu_kernel", False), ("identity", True), ("identity", False),
       ("mlp_kernel", True), ("mlp_kernel", False)]


def rand_qkv(B=2, H=3, Tq=7, Tk=7, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return mk(B, H, Tq, d), mk(B, H, Tk, d), mk(B, H, Tk, d)


def elu1(x):
    return F.elu(x) + 1.0


def make_mlp_phi(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    w2, b2 = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    return lambda x: torch.relu(x @ w1.T + b1) @ w2.T + b2


def loop_mask(kind, param=None):
    if kind == "causal":
        return lambda i, j: j <= i
    if kind == "window":
        return lambda i, j: j <= i and i - j < param
    if kind == "prefix":
        return lambda i, j: j <= i or (i < param and j < param)
    raise ValueError(kind)


@pytest.mark.parametrize("op,normalize", OPS)
def test_every_operation_matches_loop(op, normalize):
    q, k, v = rand_qkv()
    T = q.shape[2]
    pos = torch.arange(T).unsqueeze(0)
    phi = {"elu_kernel": elu1, "mlp_kernel": make_mlp_phi(q.shape[-1])}.get(op)
    y, w = eager_attention(q, k, v, mask=dense_mask(causal_mask, pos, pos), op=op, normalize=normalize,
                           kernel=phi, need_weights=True)
    y_ref, w_ref = attention_loop(q, k, v, loop_mask("causal"), op=op, normalize=normalize, phi=phi)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.05, 0.5, 1.0, 3.0])
def test_softmax_alpha_scales_the_output_not_the_map(alpha):
    """Output weights sum to alpha (paper Table 14); the returned map is the distribution before the scaling
    (rows sum to 1), which is what the sink metric thresholds."""
    q, k, v = rand_qkv()
    pos = torch.arange(q.shape[2]).unsqueeze(0)
    y, w = eager_attention(q, k, v, mask=dense_mask(causal_mask, pos, pos), alpha=alpha, need_weights=True)
    y_ref, w_ref = attention_loop(q, k, v, loop_mask("causal"), alpha=alpha)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    y1, w1 = eager_attention(q, k, v, mask=dense_mask(causal_mask, pos, pos), need_weights=True)
    torch.testing.assert_close(y, alpha * y1)
    torch.testing.assert_close(w, w1)


@pytest.mark.parametrize("kind,param", [("causal", None), ("window", 1), ("window", 3), ("prefix", 1), ("prefix", 4)])
def test_masks_equal_explicit_loops(kind, param):
    fn = {"causal": causal_mask, "window": window_mask(param) if param else None,
          "prefix": prefix_mask(param) if param else None}[kind]
    T = 9
    pos = torch.arange(T).unsqueeze(0)
    m = dense_mask(fn, pos, pos)[0, 0]
    allowed = loop_mask(kind, param)
    for i in range(T):
        for j in range(T):
            assert bool(m[i, j]) == allowed(i, j), (kind, param, i, j)


def test_sink_window_mask_and_empty_slots():
    fn = sink_window_mask(2, 3)
    q = torch.tensor([[10]])
    k = torch.tensor([[0, 1, 2, 7, 8, 9, 10, 11, -1]])
    m = dense_mask(fn, q, k)[0, 0, 0].tolist()
    assert m == [True, True, False, False, True, True, True, False, False]


@pytest.mark.parametrize("kind,param", [("causal", None), ("window", 3), ("prefix", 4)])
@pytest.mark.parametrize("slots", ["none", "kv", "logit", "both"])
def test_softmax_masks_and_slots_match_loop_and_fused(kind, param, slots):
    q, k, v = rand_qkv(H=2)
    H, d = q.shape[1], q.shape[-1]
    g = torch.Generator().manual_seed(3)
    slot_k = torch.randn(H, d, generator=g, dtype=torch.float64) if slots in ("kv", "both") else None
    slot_v = torch.randn(H, d, generator=g, dtype=torch.float64) if slots in ("kv", "both") else None
    slot_logit = torch.randn(H, generator=g, dtype=torch.float64) if slots in ("logit", "both") else None
    fn = {"causal": causal_mask, "window": window_mask(param or 1), "prefix": prefix_mask(param or 1)}[kind]
    pos = torch.arange(q.shape[2]).unsqueeze(0)
    mask = dense_mask(fn, pos, pos)
    kw = dict(slot_k=None if slot_k is None else slot_k.view(1, H, 1, d),
              slot_v=None if slot_v is None else slot_v.view(1, H, 1, d), slot_logit=slot_logit)
    y, w = eager_attention(q, k, v, mask=mask, need_weights=True, **kw)
    y_ref, w_ref = attention_loop(q, k, v, loop_mask(kind, param), slot_keys=slot_k, slot_values=slot_v,
                                  slot_logits=slot_logit)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    y_fused = sdpa_attention(q, k, v, mask=None if kind == "causal" else mask, is_causal=kind == "causal", **kw)
    torch.testing.assert_close(y_fused, y_ref)


def test_fused_bias_and_gqa_match_loop():
    B, H, G, T, d = 2, 4, 2, 6, 8
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, T, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, G, T, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, G, T, d, generator=g, dtype=torch.float64)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    bias = -slopes.view(1, H, 1, 1) * (torch.arange(T).view(T, 1) - torch.arange(T).view(1, T)).abs()
    y = sdpa_attention(q, k, v, mask=None, is_causal=True, bias=bias)
    kr, vr = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
    y_ref, _ = attention_loop(q, kr, vr, loop_mask("causal"), bias=lambda h, i, j: -float(slopes[h]) * abs(i - j))
    torch.testing.assert_close(y, y_ref)
    y_e, _ = eager_attention(q, k, v, mask=torch.ones(T, T, dtype=torch.bool).tril(), bias=bias)
    torch.testing.assert_close(y_e, y_ref)


def test_decode_query_against_longer_keys():
    """One query at the end of a cache: the causal alignment of the fused path is bottom-right."""
    q, k, v = rand_qkv(Tq=1, Tk=6)
    y = sdpa_attention(q, k, v, mask=None, is_causal=True)
    y_ref, _ = attention_loop(q, k, v, loop_mask("causal"))
    torch.testing.assert_close(y, y_ref)


def test_unnormalised_proxy_uses_absolute_similarity():
    """identity similarity can be negative: the returned map is |sim| / sum |sim| (the paper's proxy)."""
    q = torch.tensor([[[[1.0, 0.0]], ]], dtype=torch.float64).view(1, 1, 1, 2)
    k = torch.tensor([[1.0, 0.0], [-3.0, 0.0]], dtype=torch.float64).view(1, 1, 2, 2)
    v = torch.eye(2, dtype=torch.float64).view(1, 1, 2, 2)
    mask = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    y, w = eager_attention(q, k, v, mask=mask, op="identity", normalize=False, need_weights=True)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(w[0, 0, 0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([s, -3 * s], dtype=torch.float64))
    # normalised identity: Z = max(|sum|, 1) = max(|s - 3s|, 1)
    y, _ = eager_attention(q, k, v, mask=mask, op="identity", normalize=True)
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([s, -3 * s], dtype=torch.float64) / max(2 * s, 1.0))


def test_unknown_operation_and_sdpa_backend_give_the_shared_one_line_error():
    q, k, v = rand_qkv(Tq=2, Tk=2)
    with pytest.raises(ValueError) as e:
        eager_attention(q, k, v, mask=torch.ones(2, 2, dtype=torch.bool), op="sigmod")
    assert str(e.value) == ("attn_op='sigmod' is invalid (did you mean sigmoid?); allowed: softmax, sigmoid, elu, "
                            "elu_kernel, identity, mlp_kernel")
    with pytest.raises(ValueError) as e:
        set_sdpa_backend("cudn")                                 # refused before torch's order is touched
    assert str(e.value) == "sdpa_backend='cudn' is invalid (did you mean cudnn?); allowed: auto, cudnn, flash, " \
                           "efficient, default"
