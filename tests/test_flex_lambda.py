"""The Λ mask (sinks + window) on the Flex path: the window runs block-sparse, the sink columns join through the
log-normaliser (lit_gpt.flex.split_sinks). Forward against the float64 loop of tests/reference.py (LM-Infinite's
mask: key j is seen by query i iff j <= i and (j < n_sink or i - j < window)); gradients by gradcheck with a dense
stand-in for the compiled Flex kernel (Flex has no CPU backward)."""
import math

import pytest
import torch

import lit_gpt.flex as flex
from lit_gpt.attention import causal_mask, prefix_mask, sink_window_mask, window_mask
from reference import alibi_slope_list, attention_loop

pytest.importorskip("torch.nn.attention.flex_attention")


def lambda_loop(n_sink, window):
    return lambda i, j: j <= i and (j < n_sink or i - j < window)


def qkv(B, H, G, T, d, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, T, d, generator=g, dtype=torch.float64, requires_grad=requires_grad)
            for n in (H, G, G)]


class OffsetTable:
    """A relative bias given as its table by offset q - k (what the model's T5 bias hands to Flex)."""

    def __init__(self, H, T, seed=7):
        self.table = torch.randn(H, 2 * T - 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def offset_table(self, T, device):
        return self.table


def test_split_sinks_only_for_the_lambda_mask():
    for fn in (causal_mask, window_mask(8), prefix_mask(4), sink_window_mask(0, 8)):
        assert flex.split_sinks(fn, 64) is None
    fn = sink_window_mask(4, 8)
    part, w, n = flex.split_sinks(fn, 64)
    assert (w, n) == (8, 4) and flex.split_sinks(fn, 64)[0] is part          # one window function per mask
    assert flex.split_sinks(fn, 10)[2] == 2                    # only sinks 0, 1 are ever beyond a query's window
    assert flex.split_sinks(fn, 8)[2] == 0                     # T <= window: the window part is the whole mask
    q, k = torch.arange(64).view(64, 1), torch.arange(64).view(1, 64)
    beyond = (k < 4) & (q - k >= 8)
    assert torch.equal(fn(q, k), part(q, k) | beyond) and not bool((part(q, k) & beyond).any())


@pytest.mark.parametrize("T,n_sink,window", [(40, 4, 8), (11, 4, 8), (8, 4, 8), (33, 1, 5)])
@pytest.mark.parametrize("extra", ["none", "alibi", "relative", "slots_gqa_alpha"])
@pytest.mark.parametrize("split", [False, True])
def test_lambda_flex_forward_matches_loop(T, n_sink, window, extra, split):
    B, H, d = 2, 4, 8
    G = 2 if extra == "slots_gqa_alpha" else H
    q, k, v = qkv(B, H, G, T, d)
    scale = 1 / math.sqrt(d)
    kw, bias, loop_kw = {}, None, {}
    if extra == "alibi":
        slopes = alibi_slope_list(H)
        kw["alibi_slopes"] = torch.tensor(slopes, dtype=torch.float64)
        bias = lambda h, i, j: -slopes[h] * abs(i - j)                                       # noqa: E731
    elif extra == "relative":
        rel = OffsetTable(H, T)
        kw["rel_bias"] = rel
        bias = lambda h, i, j: float(rel.table[h, i - j + T - 1])                            # noqa: E731
    elif extra == "slots_gqa_alpha":
        g = torch.Generator().manual_seed(3)
        sk, sv = (torch.randn(H, d, generator=g, dtype=torch.float64) for _ in range(2))
        sl = torch.randn(H, generator=g, dtype=torch.float64)
        kw.update(slot_k=sk.view(1, H, 1, d), slot_v=sv.view(1, H, 1, d), slot_logit=sl, alpha=0.5)
        loop_kw = dict(slot_keys=sk, slot_values=sv, slot_logits=sl, alpha=0.5)
    with torch.no_grad():
        y = flex.flex_attention_forward(q, k, v, sink_window_mask(n_sink, window), scale=scale,
                                        split_lambda=split, **kw)
    kr, vr = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
    y_ref, _ = attention_loop(q, kr, vr, lambda_loop(n_sink, window), scale=scale, bias=bias, **loop_kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block_size", [(16, 8), 8, (8, 16)])
@pytest.mark.parametrize("T,n_sink,window", [(40, 4, 8), (33, 1, 5)])
def test_lambda_flex_forward_with_smaller_blocks_matches_loop(T, n_sink, window, block_size):
    """A block mask of other (query, key) blocks (partial sink blocks waste less) computes the same attention."""
    B, H, d = 2, 4, 8
    q, k, v = qkv(B, H, H, T, d, seed=1)
    scale = 1 / math.sqrt(d)
    with torch.no_grad():
        y = flex.flex_attention_forward(q, k, v, sink_window_mask(n_sink, window), scale=scale, block_size=block_size)
    y_ref, _ = attention_loop(q, k, v, lambda_loop(n_sink, window), scale=scale)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    key = ((flex.mask_key(sink_window_mask(n_sink, window)), block_size), T, "cpu")
    assert flex._BLOCK_MASKS[key].BLOCK_SIZE == ((block_size,) * 2 if isinstance(block_size, int) else block_size)


def dense_flex(q, k, v, *, score_mod, block_mask, scale, enable_gqa, return_lse):
    """A dense float64 stand-in for flex_attention with autograd: scores, the block mask's mask_mod, softmax."""
    B, H, T, d = q.shape
    kr, vr = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    s = (q @ kr.transpose(-1, -2)) * scale
    b, h, i, j = (torch.arange(n).view(*[n if a == m else 1 for a in range(4)]) for m, n in enumerate((B, H, T, T)))
    if score_mod is not None:
        s = score_mod(s, b, h, i, j)
    s = s.masked_fill(~block_mask.mask_mod(b, h, i, j).expand(B, H, T, T), float("-inf"))
    f = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(s.to(f), -1)
    out = (torch.exp(s.to(f) - lse.unsqueeze(-1)) @ vr.to(f)).to(q.dtype)
    return (out, lse) if return_lse else out


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_lambda_flex_gradients_through_the_merge(monkeypatch, alibi, split):
    """The sink keys get gradient from both parts (window queries near them, merged queries beyond): gradcheck of
    the whole split path (split=True) and of the default one-call path, each forward pinned to the loop above."""
    monkeypatch.setattr(flex, "_flex_fn", lambda device: dense_flex)
    B, H, G, T, d = 1, 2, 1, 14, 4
    q, k, v = qkv(B, H, G, T, d, seed=1, requires_grad=True)
    slopes = torch.tensor(alibi_slope_list(H), dtype=torch.float64) if alibi else None
    fn = sink_window_mask(2, 5)

    def f(q, k, v):
        return flex.flex_attention_forward(q, k, v, fn, scale=0.5, alibi_slopes=slopes, split_lambda=split)

    assert torch.autograd.gradcheck(f, (q, k, v))
    with torch.no_grad():
        y_ref, _ = attention_loop(q, k.expand(B, H, T, d), v.expand(B, H, T, d), lambda_loop(2, 5), scale=0.5,
                                  bias=(lambda h, i, j: -float(slopes[h]) * abs(i - j)) if alibi else None)
        torch.testing.assert_close(f(q, k, v), y_ref, rtol=1e-10, atol=1e-10)


def test_model_forward_with_a_lambda_mask_on_flex_equals_eager():
    from lit_gpt import GPT, Config
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny", attn_impl="flex", pos_encoding="alibi", sink_logit=True)).double()
    idx = torch.randint(0, model.config.vocab_size, (2, 48))
    fn = sink_window_mask(4, 16)
    with torch.no_grad():
        y = model(idx, mask_fn=fn)
        assert model.attention_paths() == ["flex"] * model.config.n_layer
        model.config.attn_impl = "eager"
        torch.testing.assert_close(y, model(idx, mask_fn=fn), rtol=1e-9, atol=1e-9)
