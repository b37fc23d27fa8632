"""The fused sigmoid / elu+1 attention kernel (lit_gpt/kernels/sim_attention.py) on CPU, in Triton's interpreter:
forward against explicit float64 loops (tests/reference.py), gradients against float64 autograd through the eager
path, the block-range logic at several block shapes, and the model choosing it (attn_impl='triton' on CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

from lit_gpt import GPT, Config
from lit_gpt.attention import (
    causal_mask, dense_mask, eager_attention, prefix_mask, sink_window_mask, window_mask,
)
from lit_gpt.config import ConfigError
from lit_gpt.positional import alibi_bias, alibi_slopes
from reference import alibi_slope_list, attention_loop

sim = pytest.importorskip("lit_gpt.kernels.sim_attention")
if not sim.available() or not sim.INTERPRETED:
    pytest.skip("needs triton, run in its interpreter (no CUDA, or TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)

LOOP_MASKS = {
    "causal": (causal_mask, lambda i, j: j <= i),
    "window7": (window_mask(7), lambda i, j: j <= i and i - j < 7),
    "prefix19": (prefix_mask(19), lambda i, j: j <= i or (i < 19 and j < 19)),
    "sink3_window9": (sink_window_mask(3, 9), lambda i, j: j <= i and (j < 3 or i - j < 9)),
}


def _inputs(B, H, G, T, d, slots, seed=0, gain=1.0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g)
    q, k, v = mk(B, H, T, d) * gain, mk(B, G, T, d), mk(B, G, T, d)
    sk, sv = (mk(1, H, 1, d), mk(1, H, 1, d)) if slots else (None, None)
    return q, k, v, sk, sv, mk(B, H, T, d)


def _check(op, normalize, mask, *, slots=False, alibi=False, B=1, H=2, G=2, T=37, d=24, gain=1.0):
    mask_fn, allowed = LOOP_MASKS[mask]
    q, k, v, sk, sv, dy = _inputs(B, H, G, T, d, slots, gain=gain)
    slopes = alibi_slopes(H) if alibi else None
    leaves = [t.requires_grad_() for t in (q, k, v, sk, sv) if t is not None]
    before = dict(sim.STATS)
    y = sim.sim_attention(q, k, v, mask_fn, op=op, normalize=normalize, alibi_slopes=slopes, slot_k=sk, slot_v=sv)
    grads = torch.autograd.grad(y, leaves, dy)
    assert sim.STATS["forward"] == before["forward"] + 1 and sim.STATS["backward"] == before["backward"] + 1
    # forward: explicit float64 loops
    rep = H // G
    kr, vr = k.detach().double().repeat_interleave(rep, 1), v.detach().double().repeat_interleave(rep, 1)
    bias = None
    if alibi:
        sl = alibi_slope_list(H)
        bias = lambda h, i, j: -sl[h] * abs(i - j)
    y_ref, _ = attention_loop(q.detach().double(), kr, vr, allowed, op=op, normalize=normalize, bias=bias,
                              slot_keys=None if sk is None else sk.detach().double()[0, :, 0],
                              slot_values=None if sv is None else sv.detach().double()[0, :, 0])
    tol = dict(rtol=2e-5, atol=2e-5 * float(y_ref.abs().max()))
    torch.testing.assert_close(y.double(), y_ref, **tol)
    # gradients: float64 autograd through the eager path
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    q6, k6, v6 = l64[:3]
    sk6, sv6 = (l64[3], l64[4]) if slots else (None, None)
    pos = torch.arange(T).unsqueeze(0)
    y6, _ = eager_attention(q6, k6, v6, mask=dense_mask(mask_fn, pos, pos), op=op, normalize=normalize,
                            bias=None if slopes is None else alibi_bias(pos, pos, slopes).double(), slot_k=sk6,
                            slot_v=sv6)
    torch.testing.assert_close(y6, y_ref, rtol=1e-10, atol=1e-10 * float(y_ref.abs().max()))
    for name, g, g6 in zip("q k v slot_k slot_v".split(), grads, torch.autograd.grad(y6, l64, dy.double())):
        assert g.shape == g6.shape, name
        err = float((g.double() - g6).abs().max() / g6.abs().max().clamp_min(1e-30))
        assert err < 5e-5, (name, err)


@pytest.mark.parametrize("op", ["sigmoid", "elu"])
@pytest.mark.parametrize("normalize", [True, False])
def test_causal_matches_reference(op, normalize):
    _check(op, normalize, "causal")


@pytest.mark.parametrize("op,normalize,mask,slots,alibi,G", [
    ("sigmoid", True, "window7", True, False, 2),
    ("elu", True, "prefix19", False, True, 2),
    ("sigmoid", False, "sink3_window9", False, False, 1),
    ("elu", False, "window7", True, True, 1),
    ("sigmoid", True, "prefix19", True, True, 1),
])
def test_masks_slots_alibi_gqa(op, normalize, mask, slots, alibi, G):
    _check(op, normalize, mask, slots=slots, alibi=alibi, H=2, G=G)


@pytest.mark.parametrize("op", ["sigmoid", "elu"])
@pytest.mark.parametrize("normalize", [True, False])
def test_large_scores_reach_both_branches(op, normalize):
    """|scores| up to ~15: elu + 1 far into its linear part (s + 1) and its exponential part (e^s ~ 1e-7), where the
    kernel's branch-free exp2 form max(s, 0) + 2^(min(s, 0) log2 e) must agree with the reference; sigmoid saturates."""
    _check(op, normalize, "causal", gain=4.0, alibi=op == "elu")


@pytest.mark.parametrize("op", ["sigmoid", "elu"])
@pytest.mark.parametrize("normalize", [True, False])
def test_nan_scores_stay_nan(op, normalize):
    """A NaN in one query row makes that row's output and its dq NaN, as in the eager path (the branch-free elu+1
    uses NaN-propagating min / max), and leaves the other rows finite."""
    q, k, v, _, _, dy = _inputs(1, 1, 1, 20, 16, False)
    q[0, 0, 7, 3] = float("nan")
    q.requires_grad_()
    y = sim.sim_attention(q, k, v, causal_mask, op=op, normalize=normalize)
    (dq,) = torch.autograd.grad(y, (q,), dy)
    rows = torch.arange(20) != 7
    assert torch.isnan(y[0, 0, 7]).all() and torch.isfinite(y[0, 0, rows]).all()
    assert torch.isnan(dq[0, 0, 7]).all() and torch.isfinite(dq[0, 0, rows]).all()


@pytest.mark.parametrize("blocks", [dict(fwd=(32, 16), dkdv=(16, 32), dq=(32, 16)),
                                    dict(fwd=(16, 32), dkdv=(32, 16), dq=(16, 32))])
@pytest.mark.parametrize("mask", ["window7", "prefix19", "sink3_window9"])
def test_block_ranges_at_other_block_shapes(monkeypatch, blocks, mask):
    """Which key / query blocks are visited and which need the elementwise mask depends on the block shape."""
    monkeypatch.setattr(sim, "INTERPRET_BLOCKS", blocks)
    _check("sigmoid", True, mask, slots=mask == "window7", T=70, d=16)


@pytest.mark.parametrize("op", ["sigmoid", "elu"])
def test_tiny_row_sums_use_the_clamp(op):
    """Scores about -25: every sim ~ 1e-11, Z below the 1e-8 clamp, so z = 1e-8 and dZ is not propagated.
    (Much lower scores lose elu + 1 to cancellation in the float64 reference, elu(s) + 1 = (e^s - 1) + 1.)"""
    mask_fn, _ = LOOP_MASKS["causal"]
    _, _, v, _, _, dy = _inputs(1, 1, 1, 20, 16, False)
    g = torch.Generator().manual_seed(1)
    u = F.normalize(torch.randn(16, generator=g), dim=0)
    a, b = (1 + 0.02 * torch.rand(2, 1, 1, 20, 1, generator=g)) * math.sqrt(96.0)
    q, k = (a * u).requires_grad_(), (-b * u).requires_grad_()          # every q.k / sqrt(16) in [-25, -24]
    v.requires_grad_()
    y = sim.sim_attention(q, k, v, mask_fn, op=op, normalize=True)
    pos = torch.arange(20).unsqueeze(0)
    l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    y6, _ = eager_attention(*l64, mask=dense_mask(mask_fn, pos, pos), op=op, normalize=True)
    assert float(y6.detach().abs().max()) > 0
    torch.testing.assert_close(y.double(), y6, rtol=1e-4, atol=1e-4 * float(y6.abs().max()))
    for g, g6 in zip(torch.autograd.grad(y, (q, k, v), dy), torch.autograd.grad(y6, l64, dy.double())):
        torch.testing.assert_close(g.double(), g6, rtol=1e-4, atol=1e-4 * float(g6.abs().max()))


def test_bad_inputs_give_one_line_naming_the_argument():
    q, k, v, sk, sv, _ = _inputs(1, 2, 2, 8, 4, slots=True)

    def hand_mask(i, j):                    # a causal mask the kernel cannot see the band of
        return j <= i

    lines = {
        "op='softmax' is invalid; allowed: sigmoid, elu": dict(op="softmax"),
        "op='sigmod' is invalid (did you mean sigmoid?); allowed: sigmoid, elu": dict(op="sigmod"),
        "mask_fn='hand_mask' is invalid; allowed: a mask of lit_gpt.attention with a band (causal, window, prefix, "
        "sink + window)": dict(mask_fn=hand_mask),
        "slot_v=None is invalid; allowed: a tensor when slot_k is given (the slots go together)": dict(slot_k=sk),
        "slot_k=None is invalid; allowed: a tensor when slot_v is given (the slots go together)": dict(slot_v=sv),
    }
    for line, kwargs in lines.items():
        kwargs = dict(dict(mask_fn=causal_mask, op="elu"), **kwargs)
        with pytest.raises(ValueError) as e:
            sim.sim_attention(q, k, v, kwargs.pop("mask_fn"), normalize=True, **kwargs)
        assert str(e.value) == line


def test_custom_op_registration():
    """Schema, fake (meta) kernels and autograd registration, as torch.compile uses them."""
    q, k, v, sk, sv, _ = _inputs(1, 1, 1, 16, 16, True)
    for t in (q, k, v, sk, sv):
        t.requires_grad_()
    torch.library.opcheck(sim._fwd_op, (q, k, v, sk, sv, None, "sigmoid", True, 0.25, 0, 0, 0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---------------------------------------------------------------------------- in the model
MODEL_CASES = [
    dict(attn_op="sigmoid", attn_normalize=False, kv_bias="kv", attn_mask="window", window_size=5),
    dict(attn_op="elu", pos_encoding="alibi", attn_mask="prefix", prefix_size=6, n_query_groups=2),
    dict(attn_op="sigmoid", sink_token=True, kv_bias="k", kv_bias_value="one_hot", kv_bias_shared=True),
]


@pytest.mark.parametrize("overrides", MODEL_CASES)
def test_model_uses_the_kernel_and_matches_eager(overrides):
    torch.manual_seed(0)
    cfg = Config.from_name("tiny", block_size=24, n_layer=1, attn_impl="triton", **overrides)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 21))

    def run(impl):
        model.config.attn_impl = impl
        model.zero_grad(set_to_none=True)
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = dict(sim.STATS)
    lf, gf = run("triton")
    assert sim.STATS["forward"] == before["forward"] + 1 and sim.STATS["backward"] == before["backward"] + 1
    le, ge = run("eager")
    assert sim.STATS["forward"] == before["forward"] + 1          # eager did not go through the kernel
    torch.testing.assert_close(lf, le, rtol=1e-5, atol=1e-5)
    assert gf.keys() == ge.keys()
    for n in ge:
        torch.testing.assert_close(gf[n], ge[n], rtol=1e-4, atol=1e-6, msg=n)


def test_model_keeps_eager_where_the_kernel_does_not_apply():
    cfg = Config.from_name("tiny", block_size=24, n_layer=1, attn_op="sigmoid", attn_impl="triton")
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    before = dict(sim.STATS)
    with torch.no_grad():
        model(idx, return_analysis=["attn"])                          # attention maps: eager
        model(idx, mask_fn=lambda q, k: k <= q)                        # a mask without a band: eager
        model.set_kv_cache(1)
        model(idx, input_pos=torch.arange(12))                         # a KV cache: eager
        model.clear_kv_cache()
        auto = GPT(cfg.replace(attn_impl="auto"))
        auto(idx)
        assert sim.STATS == before
        model(idx)
    assert sim.STATS["forward"] == before["forward"] + 1


@pytest.mark.parametrize("overrides", [dict(attn_op="softmax"), dict(attn_op="elu_kernel"),
                                       dict(attn_op="sigmoid", pos_encoding="relative")])
def test_config_rejects_triton_where_it_does_not_apply(overrides):
    with pytest.raises(ConfigError, match="attn_impl='triton' is invalid") as e:
        Config.from_name("tiny", attn_impl="triton", **overrides)
    assert "\n" not in str(e.value)
