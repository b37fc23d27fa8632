"""The one model against reference maths: every variant is a config field of the same GPT.

The reference block below recomputes a transformer block with explicit formulas and loops in float64 from
the module's raw weights, so it shares no code path with lit_gpt/model.py.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lit_gpt import CHOICES, GPT, Config
from lit_gpt.sink_metrics import SinkMeter
from reference import alibi_slope_list, attention_loop, paper_relative_bias, rope_rotate, sinusoid, t5_bucket
from conftest import variant_id

V = 64


def tiny(**overrides):
    base = dict(block_size=32, vocab_size=V, padding_multiple=1, n_layer=2, n_head=4, n_embd=16,
                intermediate_size=24)
    base.update(overrides)
    return Config(**base)


def build(seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    model = GPT(tiny(**overrides)).to(dtype)
    # random (non-default) values for parameters initialised to constants, so the tests see them act
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sink_logit") or "norm" in name or name.startswith("ln_f"):
                p.add_(0.3 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------------------- reference block
def ref_norm(x, mod, cfg):
    if cfg.norm_class == "rmsnorm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * mod.weight.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + cfg.norm_eps) * mod.weight.double() + mod.bias.double()


def ref_act(name, x):
    if name in ("relu", "reglu"):
        return torch.where(x > 0, x, torch.zeros_like(x))
    if name in ("gelu", "geglu"):
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return x / (1.0 + torch.exp(-x))        # swish / swiglu


def linear(x, lin):
    y = x @ lin.weight.double().T
    return y + lin.bias.double() if lin.bias is not None else y


def ref_mlp(x, mlp, cfg):
    h = cfg.intermediate_size
    if cfg.mlp in ("reglu", "geglu", "swiglu"):
        W = mlp.fc.weight.double()
        b = mlp.fc.bias.double() if mlp.fc.bias is not None else torch.zeros(2 * h, dtype=torch.float64)
        gate = x @ W[:h].T + b[:h]
        up = x @ W[h:].T + b[h:]
        return linear(ref_act(cfg.mlp, gate) * up, mlp.proj)
    return linear(ref_act(cfg.mlp, linear(x, mlp.fc)), mlp.proj)


def ref_attention(x, attn, cfg, positions, rel_table=None):
    """x (B, T, C) -> (output (B, T, C), weights, q, k) with explicit per-vector RoPE and loop attention."""
    B, T, _ = x.shape
    H, G, d = cfg.n_head, cfg.n_query_groups, cfg.head_size
    W = attn.qkv.weight.double()
    b = attn.qkv.bias.double() if attn.qkv.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    q = (x @ W[: H * d].T + b[: H * d]).view(B, T, H, d).permute(0, 2, 1, 3).clone()
    k = (x @ W[H * d:(H + G) * d].T + b[H * d:(H + G) * d]).view(B, T, G, d).permute(0, 2, 1, 3).clone()
    v = (x @ W[(H + G) * d:].T + b[(H + G) * d:]).view(B, T, G, d).permute(0, 2, 1, 3).clone()
    if cfg.kv_bias == "v":
        v = v + attn.v_bias.double().view(1, -1, 1, d)
    if cfg.pos_encoding == "rope":
        n = int(cfg.rotary_percentage * d)
        for bb, hh, t in itertools.product(range(B), range(H), range(T)):
            q[bb, hh, t] = rope_rotate(q[bb, hh, t], positions[t], n, cfg.rope_base)
        for bb, gg, t in itertools.product(range(B), range(G), range(T)):
            k[bb, gg, t] = rope_rotate(k[bb, gg, t], positions[t], n, cfg.rope_base)
    rep = H // G
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    bias = None
    if cfg.pos_encoding == "alibi":
        slopes = alibi_slope_list(H)
        bias = lambda h, i, j: -slopes[h] * abs(i - j)
    elif cfg.pos_encoding == "relative":          # the paper's fixed bucket index, no parameters
        bias = lambda h, i, j: paper_relative_bias(i, j, cfg.relative_buckets, cfg.relative_max_distance)
    elif cfg.pos_encoding == "relative_learned":
        bidir = cfg.attn_mask == "prefix"
        bias = lambda h, i, j: float(rel_table[t5_bucket(j - i, cfg.relative_buckets, cfg.relative_max_distance,
                                                         bidir), h])
    if cfg.attn_mask == "causal":
        allowed = lambda i, j: j <= i
    elif cfg.attn_mask == "window":
        allowed = lambda i, j: j <= i and i - j < cfg.window_size
    else:
        allowed = lambda i, j: j <= i or (i < cfg.prefix_size and j < cfg.prefix_size)
    phi = None
    if cfg.attn_op == "elu_kernel":
        phi = lambda t: torch.where(t > 0, t + 1.0, torch.exp(t))
    elif cfg.attn_op == "mlp_kernel":
        phi = lambda t: linear(torch.relu(linear(t, attn.kernel.fc1)), attn.kernel.fc2)
    slot_keys = slot_values = slot_logits = None
    if cfg.kv_bias in ("k", "kv"):
        ks = attn.k_star.double()
        ks = torch.cat([ks, torch.zeros(ks.shape[0], d - ks.shape[1], dtype=torch.float64)], 1)
        slot_keys = ks.expand(H, d)
        slot_values = attn.v_star.double().expand(H, d)
    if cfg.sink_logit:
        slot_logits = attn.sink_logit.double()
    y, w = attention_loop(q, kr, vr, allowed, op=cfg.attn_op, normalize=cfg.attn_normalize,
                          alpha=cfg.softmax_alpha, bias=bias, phi=phi, slot_keys=slot_keys,
                          slot_values=slot_values, slot_logits=slot_logits, q_pos=positions, k_pos=positions)
    if cfg.head_output == "sum":
        out = linear(y.sum(1), attn.proj)
    else:
        out = linear(y.permute(0, 2, 1, 3).reshape(B, T, H * d), attn.proj)
    return out, w, q, k


def ref_block(x, block, cfg, positions, rel_table=None):
    if cfg.norm_position == "pre":
        a, w, q, k = ref_attention(ref_norm(x, block.norm_1, cfg), block.attn, cfg, positions, rel_table)
        h = x + a
        return h + ref_mlp(ref_norm(h, block.norm_2, cfg), block.mlp, cfg), w, q, k
    a, w, q, k = ref_attention(x, block.attn, cfg, positions, rel_table)
    h = ref_norm(x + a, block.norm_1, cfg)
    return ref_norm(h + ref_mlp(h, block.mlp, cfg), block.norm_2, cfg), w, q, k


VARIANTS = [
    {},
    dict(pos_encoding="nope"), dict(pos_encoding="sinusoidal"), dict(pos_encoding="learned"),
    dict(pos_encoding="alibi"), dict(pos_encoding="relative"), dict(pos_encoding="relative_learned"),
    dict(rotary_percentage=0.5, n_embd=32),
    dict(mlp="relu"), dict(mlp="gelu"), dict(mlp="swish"), dict(mlp="reglu"), dict(mlp="geglu"),
    dict(norm_position="post"), dict(norm_class="layernorm", bias=True),
    dict(head_output="sum"), dict(n_query_groups=2), dict(n_head=1),
    dict(attn_mask="window", window_size=3), dict(attn_mask="prefix", prefix_size=4),
    dict(attn_mask="prefix", prefix_size=4, pos_encoding="relative"),
    dict(attn_mask="prefix", prefix_size=4, pos_encoding="relative_learned"),
    dict(kv_bias="k"), dict(kv_bias="kv"), dict(kv_bias="v"), dict(kv_bias="k", kv_bias_shared=True),
    dict(kv_bias="kv", kv_bias_shared=True), dict(kv_bias="v", kv_bias_shared=True),
    dict(kv_bias="k", kv_bias_value="one_hot", kv_bias_value_scale=2.0),
    dict(kv_bias="k", kv_bias_value="uniform", kv_bias_value_scale=3.0),
    dict(kv_bias="k", kv_bias_key_dims=1), dict(sink_logit=True), dict(sink_logit=True, kv_bias="kv"),
    dict(softmax_alpha=2.5),
    dict(attn_op="sigmoid", attn_normalize=False), dict(attn_op="sigmoid"), dict(attn_op="elu"),
    dict(attn_op="elu", attn_normalize=False), dict(attn_op="elu_kernel"),
    dict(attn_op="elu_kernel", attn_normalize=False),
    dict(attn_op="identity"), dict(attn_op="identity", attn_normalize=False), dict(attn_op="mlp_kernel"),
    dict(attn_op="mlp_kernel", attn_normalize=False), dict(attn_op="sigmoid", attn_normalize=False, kv_bias="k"),
    dict(attn_op="sigmoid", attn_normalize=False, pos_encoding="alibi"),
    dict(attn_op="sigmoid", attn_normalize=False, pos_encoding="relative"),
    dict(attn_op="sigmoid", attn_normalize=False, pos_encoding="relative_learned"),
    dict(softmax_alpha=0.2, kv_bias="k"),
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=variant_id)
@torch.no_grad()
def test_blocks_match_reference_maths(overrides):
    model = build(**overrides)
    cfg = model.config
    B, T = 2, 7
    idx = torch.randint(0, V, (B, T))
    logits, an = model(idx, return_analysis=True)
    positions = list(range(T))
    # embedding + absolute positions
    x0 = model.wte.weight.double()[idx]
    if cfg.pos_encoding == "sinusoidal":
        x0 = x0 + torch.stack([sinusoid(t, cfg.n_embd) for t in positions])
    elif cfg.pos_encoding == "learned":
        x0 = x0 + model.wpe.weight.double()[:T]
    torch.testing.assert_close(an.hidden[0], x0)
    rel_table = model.rel_bias.embedding.weight.double() if cfg.pos_encoding == "relative_learned" else None
    for layer, block in enumerate(model.blocks):
        out, w, q, k = ref_block(an.hidden[layer], block, cfg, positions, rel_table)
        torch.testing.assert_close(an.attn[layer], w, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(an.q[layer], q, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(an.k[layer], k, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(an.hidden[layer + 1], out, rtol=1e-9, atol=1e-9)
    # pre-norm: a final norm before the head; post-norm: none (the seed's model_postln.py comments ln_f out)
    last = ref_norm(an.hidden[-1], model.ln_f, cfg) if cfg.norm_position == "pre" else an.hidden[-1]
    final = last @ model.lm_head.weight.double().T
    torch.testing.assert_close(logits, final, rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_sink_token_is_a_prepended_learned_position_zero():
    model = build(sink_token=True)
    cfg = model.config
    idx = torch.randint(0, V, (2, 6))
    logits, an = model(idx, return_analysis=True)
    # the same computation with the sink embedding as an explicit first token at position 0
    x = torch.cat([model.sink_token.double().expand(2, 1, -1), model.wte.weight.double()[idx]], dim=1)
    positions = list(range(7))
    for layer, block in enumerate(model.blocks):
        x, w, _, _ = ref_block(x, block, cfg, positions)
        torch.testing.assert_close(an.attn[layer], w[:, :, 1:], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(an.hidden[layer + 1], x[:, 1:], rtol=1e-9, atol=1e-9)
    assert an.n_extra == 1 and an.attn[0].shape[-1] == 7
    torch.testing.assert_close(logits, model.lm_head(model.ln_f(x[:, 1:])))


# ---------------------------------------------------------------------------- every field value
def all_field_values():
    cases = []
    for name, values in CHOICES.items():
        for value in values:
            ov = {name: value}
            if name == "attn_mask" and value == "window":
                ov["window_size"] = 4
            if name == "attn_mask" and value == "prefix":
                ov["prefix_size"] = 3
            if name == "kv_bias_value" and value != "zero":
                ov["kv_bias"] = "k"
            if name == "attn_impl" and value == "flex":
                continue  # CUDA only (FlexAttention has no CPU backward); covered on the GPU benchmark
            if name == "attn_impl" and value == "triton":
                ov["attn_op"] = "sigmoid"   # the fused sigmoid / elu kernel (Triton's interpreter on CPU)
            cases.append(ov)
    combos = [
        dict(attn_op="sigmoid", attn_normalize=False, pos_encoding="alibi", norm_position="post"),
        dict(kv_bias="kv", kv_bias_shared=True, attn_mask="window", window_size=3, pos_encoding="relative"),
        dict(sink_token=True, sink_logit=True, kv_bias="k", n_query_groups=2, head_output="sum"),
        dict(mlp="geglu", norm_class="layernorm", bias=True, pos_encoding="learned", attn_mask="prefix", prefix_size=2),
        dict(attn_op="mlp_kernel", attn_normalize=False, kv_bias="k", kv_bias_key_dims=2, n_head=2),
        dict(kv_bias="k", kv_bias_value="uniform", kv_bias_value_scale=5.0, softmax_alpha=0.5),
        dict(attn_op="elu_kernel", sink_token=True, pos_encoding="sinusoidal", tie_embeddings=True),
    ]
    return cases + combos


@pytest.mark.parametrize("overrides", all_field_values(), ids=variant_id)
def test_every_field_value_trains(overrides):
    torch.manual_seed(0)
    model = GPT(tiny(**overrides))
    idx = torch.randint(0, V, (2, 12))
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


# ---------------------------------------------------------------------------- fused == eager
SOFTMAX_VARIANTS = [v for v in VARIANTS if v.get("attn_op", "softmax") == "softmax"] + [
    dict(sink_token=True), dict(sink_token=True, pos_encoding="alibi", n_query_groups=2, kv_bias="k")]


@pytest.mark.parametrize("overrides", SOFTMAX_VARIANTS, ids=variant_id)
def test_fused_path_equals_eager_path(overrides):
    model = build(**overrides)
    idx = torch.randint(0, V, (2, 9))
    fused = model(idx)
    model.config.attn_impl = "eager"
    eager = model(idx)
    torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- KV cache
CACHE_VARIANTS = [dict(pos_encoding=p) for p in CHOICES["pos_encoding"]] + [
    dict(rotary_percentage=0.5, n_embd=32), dict(n_query_groups=2), dict(kv_bias="kv"), dict(kv_bias="v"),
    dict(sink_logit=True), dict(sink_token=True), dict(sink_token=True, pos_encoding="learned"),
    dict(attn_mask="window", window_size=3), dict(attn_op="sigmoid", attn_normalize=False),
    dict(attn_op="mlp_kernel"), dict(head_output="sum"), dict(norm_position="post"),
]


@pytest.mark.parametrize("overrides", CACHE_VARIANTS, ids=variant_id)
def test_cached_decoding_equals_full_forward(overrides):
    model = build(**overrides)
    B, T = 2, 10
    idx = torch.randint(0, V, (B, T))
    full = model(idx)
    model.set_kv_cache(B, max_seq_length=16)
    prompt = 4
    outs = [model(idx[:, :prompt], input_pos=torch.arange(prompt))]
    for t in range(prompt, T):
        outs.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)
    model.clear_kv_cache()


def test_prefix_lm_cache_equals_full_forward_once_prefix_is_prefilled():
    model = build(attn_mask="prefix", prefix_size=4)
    idx = torch.randint(0, V, (2, 9))
    full = model(idx)
    model.set_kv_cache(2, 16)
    outs = [model(idx[:, :4], input_pos=torch.arange(4))]
    for t in range(4, 9):
        outs.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)


def test_rows_with_different_positions_stay_independent():
    model = build()
    a = torch.randint(0, V, (1, 8))
    b = torch.randint(0, V, (1, 5))
    ref_a, ref_b = model(a), model(b)
    model.set_kv_cache(2, 16)
    # one batch: row 0 prefills 6 tokens at positions 0..5; row 1 prefills 3 real tokens at 0..2 and three
    # padding tokens parked at positions 13..15, which causality hides from every later query of that row
    ids = torch.cat([a[:, :6], torch.cat([b[:, :3], b.new_zeros(1, 3)], 1)])
    pos = torch.stack([torch.arange(6), torch.tensor([0, 1, 2, 13, 14, 15])])
    out = model(ids, input_pos=pos)
    torch.testing.assert_close(out[0], ref_a[0, :6], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out[1, :3], ref_b[0, :3], rtol=1e-9, atol=1e-9)
    step = model(torch.cat([a[:, 6:7], b[:, 3:4]]), input_pos=torch.tensor([[6], [3]]))
    torch.testing.assert_close(step[0, 0], ref_a[0, 6], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(step[1, 0], ref_b[0, 3], rtol=1e-9, atol=1e-9)


def test_dense_cache_is_a_streaming_cache_that_never_evicts():
    """GPT.set_kv_cache installs the model's one cache protocol (lit_gpt.streaming.StreamingCache) over a ring that
    never wraps; a position past its end is refused and nothing held is overwritten."""
    from lit_gpt.streaming import StreamingCache
    model = build()
    model.set_kv_cache(2, max_seq_length=8)
    caches = [b.attn.kv_cache for b in model.blocks]
    assert all(isinstance(c, StreamingCache) for c in caches)
    assert [(c.spec.start_size, c.spec.recent_size, c.spec.policy) for c in caches] == [(0, 8, "original")] * 2
    idx = torch.randint(0, V, (2, 9))
    full = model(idx[:, :8])
    torch.testing.assert_close(model(idx[:, :8], input_pos=torch.arange(8)), full, rtol=1e-9, atol=1e-9)
    assert model.attention_paths() == ["streaming", "streaming"]
    held = caches[0].kv.pos.clone()
    with pytest.raises(ValueError, match=r"input_pos out of range: max 8, cache holds positions \[0, 8\)"):
        model(idx[:, 8:], input_pos=torch.tensor([8]))
    assert torch.equal(caches[0].kv.pos, held) and held[0].tolist() == list(range(8))
    model.clear_kv_cache()


@pytest.mark.parametrize("op", [dict(), dict(alpha=2.0), dict(op="sigmoid", normalize=False)], ids=variant_id)
@torch.no_grad()
def test_the_cache_protocol_takes_the_operation_explicitly(op):
    """StreamingCache.attend needs no attention module: q/k/v at their positions and an AttentionOp (here with a
    sink logit and a k* slot, grouped heads) give the float64 loop's output, for a prefill chunk then decoding."""
    from lit_gpt.attention import AttentionOp, causal_mask
    from lit_gpt.streaming import StreamingCache, dense_spec
    torch.manual_seed(0)
    B, H, G, T, d = 2, 4, 2, 7, 8
    q = torch.randn(B, H, T, d, dtype=torch.float64)
    k, v = torch.randn(B, G, T, d, dtype=torch.float64), torch.randn(B, G, T, d, dtype=torch.float64)
    slot_k, slot_v = torch.randn(1, H, 1, d, dtype=torch.float64), torch.randn(1, H, 1, d, dtype=torch.float64)
    slot_logit = torch.randn(H, dtype=torch.float64)
    spec = AttentionOp(scale=0.3, slot_k=slot_k, slot_v=slot_v, slot_logit=slot_logit, **op)
    cache = StreamingCache(dense_spec(16), tiny(pos_encoding="nope"))
    outs = [cache.attend(q[:, :, :4], k[:, :, :4], v[:, :, :4], torch.arange(4), spec, mask_fn=causal_mask)[0]]
    for t in range(4, T):
        s = slice(t, t + 1)
        outs.append(cache.attend(q[:, :, s], k[:, :, s], v[:, :, s], torch.tensor([t]), spec, mask_fn=causal_mask)[0])
    want, _ = attention_loop(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), lambda i, j: j <= i,
                             op=spec.op, normalize=spec.normalize, alpha=spec.alpha, scale=0.3,
                             slot_keys=slot_k[0, :, 0], slot_values=slot_v[0, :, 0], slot_logits=slot_logit)
    torch.testing.assert_close(torch.cat(outs, 2), want, rtol=1e-10, atol=1e-10)


def test_the_attention_path_is_picked_at_construction():
    """attn_op and attn_impl choose a layer's path once (not per call); reassigning config.attn_impl re-picks it."""
    cases = {("softmax", "auto"): "_flex_or_sdpa", ("softmax", "flex"): "_flex_or_sdpa", ("softmax", "sdpa"): "_sdpa",
             ("softmax", "eager"): "_eager", ("sigmoid", "auto"): "_triton_or_eager",
             ("elu", "triton"): "_triton_or_eager", ("sigmoid", "eager"): "_eager", ("elu_kernel", "auto"): "_eager",
             ("identity", "eager"): "_eager"}
    for (op, impl), name in cases.items():
        attn = GPT(tiny(attn_op=op, attn_impl=impl)).blocks[0].attn
        assert attn._path is getattr(type(attn), name), (op, impl)
    model = build(attn_impl="sdpa")
    idx = torch.randint(0, V, (2, 6))
    want = model(idx)
    assert model.attention_paths() == ["sdpa", "sdpa"]
    model.config.attn_impl = "eager"
    torch.testing.assert_close(model(idx), want, rtol=1e-9, atol=1e-9)
    assert model.attention_paths() == ["eager", "eager"]


# ---------------------------------------------------------------------------- returned maps
def test_softmax_maps_sum_to_one_with_slot_columns():
    for ov in ({}, dict(kv_bias="k"), dict(sink_logit=True), dict(sink_token=True),
               dict(kv_bias="kv", sink_logit=True, sink_token=True)):
        model = build(**ov)
        _, an = model(torch.randint(0, V, (2, 8)), return_analysis={"attn"})
        n_extra = model.config.n_extra_slots
        assert an.n_extra == n_extra
        for w in an.attn:
            assert w.shape == (2, 4, 8, n_extra + 8)
            torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 8, dtype=w.dtype))


def first_token_sink_model(**overrides):
    """Queries are a constant vector u (zero query weights, query bias u); only the embedding of token 7 has a
    component that the key weights map onto u. Placing token 7 first makes every head attend to position 1."""
    cfg = tiny(pos_encoding="nope", bias=True, n_layer=1, **overrides)
    model = GPT(cfg).double()
    H, d = cfg.n_head, cfg.head_size
    with torch.no_grad():
        W, b = model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.bias
        W.zero_()
        b.zero_()
        b[: H * d] = 1.0                                   # q = (1, ..., 1) in every head
        model.wte.weight[:, 0] = torch.where(torch.arange(V) == 7, 10.0, 0.0).double()
        W[H * d:2 * H * d, 0] = 5.0                        # keys of token 7 align with q
    idx = torch.randint(0, V, (3, 12))
    idx[:, 0] = 7
    idx[:, 1:] = torch.where(idx[:, 1:] == 7, 8, idx[:, 1:])
    return model, idx


def test_first_token_dominance_shows_in_maps_and_sink_metric():
    model, idx = first_token_sink_model()
    _, an = model(idx, return_analysis={"attn"})
    w = an.attn[0]
    assert float(w[..., 0].min()) > 0.99                 # every query puts > 99% on token 1
    meter = SinkMeter()
    meter.update(an.attn)
    res = meter.compute()
    assert res.sink[1] == 100.0 and res.sink[2] == 0.0


# ---------------------------------------------------------------------------- sizes
def test_named_60m_has_the_papers_size():
    cfg = Config.from_name("tinyllama_60M")
    model = torch.device("meta")
    with torch.device("meta"):
        m = GPT(cfg)
    emb = cfg.vocab_size * cfg.n_embd * 2
    non_emb = m.num_parameters() - emb
    assert cfg.vocab_size == 50432 and cfg.n_layer == 10 and cfg.head_size == 96
    assert 58e6 < non_emb < 61e6, non_emb
    for n, h in (("tinyllama_60M_head1", 1), ("tinyllama_60M_head2", 2), ("tinyllama_60M_head4", 4)):
        c = Config.from_name(n)
        assert c.n_head == h and c.n_embd == 768 and c.head_size == 768 // h
    big = Config.from_name("tinyllama_1_1b")
    assert (big.n_layer, big.n_head, big.n_embd, big.intermediate_size) == (22, 16, 2048, 5632)
    del model


@pytest.mark.parametrize("mlp", CHOICES["mlp"])
def test_init_follows_the_seed(mlp):
    """The seed's _init_weights (lit_gpt/model.py of sail-sg/Attention-Sink): every linear / embedding
    normal(0, sqrt(2 / (5 fan_in))); the FFN output projection normal(0, 1 / sqrt(fan_in) / n_layer) only for the
    SwiGLU FFN (LLaMAMLP, whose xformers SwiGLU names it w3); ReluMLP, GeluMLP, SwishMLP, RegluMLP and GegluMLP keep
    the fan-in init (Table 11 compares FFNs under exactly this init)."""
    torch.manual_seed(0)
    cfg = Config.from_name("tinyllama_demo", mlp=mlp)
    m = GPT(cfg)
    d, h = cfg.n_embd, cfg.intermediate_size

    def close(t, want, tol):
        return abs(float(t.detach().std()) - want) / want < tol

    assert close(m.wte.weight, math.sqrt(2 / (5 * d)), 0.01)
    assert close(m.lm_head.weight, math.sqrt(2 / (5 * d)), 0.01)
    for block in m.blocks:
        assert close(block.attn.qkv.weight, math.sqrt(2 / (5 * d)), 0.02)
        assert close(block.attn.proj.weight, math.sqrt(2 / (5 * d)), 0.03)     # attention output: fan-in too
        assert close(block.mlp.fc.weight, math.sqrt(2 / (5 * d)), 0.02)
        want = 1 / math.sqrt(h) / cfg.n_layer if mlp == "swiglu" else math.sqrt(2 / (5 * h))
        assert close(block.mlp.proj.weight, want, 0.03), (mlp, float(block.mlp.proj.weight.std()), want)


# ---------------------------------------------------------------------------- T5 relative position (point 1)
# The seed's buckets (model_relpos.py build_attention_bias, computed in bfloat16 as there; float32 and float64 give
# the same): the first distance of each bucket from 16 on, and the last bucket, 31, open-ended.
SEED_BUCKET_STARTS = {16: 16, 19: 17, 21: 18, 24: 19, 27: 20, 31: 21, 35: 22, 40: 23, 46: 24, 52: 25, 59: 26,
                      67: 27, 77: 28, 87: 29, 99: 30, 113: 31}


def test_relative_is_the_papers_fixed_bucket_index():
    """pos_encoding='relative' adds g(i - j) in [0, 31] (B = 32, D = 128) to the logits, the same for every head,
    with no parameters; 'relative_learned' keeps T5's learned (bucket, head) table."""
    fixed, learned, nope = (GPT(tiny(pos_encoding=p)) for p in ("relative", "relative_learned", "nope"))
    assert fixed.num_parameters() == nope.num_parameters()
    assert learned.num_parameters() == nope.num_parameters() + 32 * 4
    assert not any("rel_bias" in k for k in fixed.state_dict())
    T = 160
    pos = torch.arange(T).unsqueeze(0)
    bias = fixed.rel_bias(pos, pos)
    assert bias.shape == (1, 1, T, T)
    want = torch.tensor([[paper_relative_bias(i, j) for j in range(T)] for i in range(T)])
    torch.testing.assert_close(bias[0, 0], want, rtol=0, atol=0)
    expected, bucket = {}, 0
    for n in range(T):
        bucket = n if n < 16 else SEED_BUCKET_STARTS.get(n, bucket)
        expected[n] = bucket
    assert [int(bias[0, 0, n, 0]) for n in range(T)] == [expected[n] for n in range(T)]
    assert int(bias[0, 0, 0, 5]) == 0                  # a key after the query counts as distance 0 (the seed)


@pytest.mark.parametrize("overrides", [dict(), dict(attn_mask="prefix", prefix_size=20), dict(kv_bias="kv")],
                         ids=variant_id)
@torch.no_grad()
def test_relative_bias_long_distances_match_the_paper(overrides):
    """Distances up to 119 (every log-spaced bucket and the open last one from 113): maps and outputs of a layer
    against the float64 loop of the paper's formula; the fused paths (SDPA, Flex on CPU) compute the same."""
    model = build(pos_encoding="relative", n_layer=1, n_head=2, **overrides)
    cfg = model.config
    T = 120
    idx = torch.randint(0, V, (1, T))
    logits, an = model(idx, return_analysis=True)
    out, w, _, _ = ref_block(an.hidden[0], model.blocks[0], cfg, list(range(T)))
    torch.testing.assert_close(an.attn[0], w, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(an.hidden[1], out, rtol=1e-9, atol=1e-9)
    for impl in ("sdpa", "flex"):
        model.config.attn_impl = impl
        torch.testing.assert_close(model(idx), logits, rtol=1e-9, atol=1e-9)
        assert model.attention_paths() == [impl]


# ---------------------------------------------------------------------------- softmax scaled to alpha (point 2)
def sink_by_hand(maps, eps=0.3, K=10):
    """Sink_k^eps (%) from per-layer maps (B, H, T, T), with loops: alpha_k = mean over i >= k of A[i, k]."""
    out = []
    for k in range(K):
        hits = total = 0
        for a in maps:
            B, H, T, _ = a.shape
            for b in range(B):
                for h in range(H):
                    score = sum(float(a[b, h, i, k]) for i in range(k, T)) / (T - k)
                    hits += score > eps
                    total += 1
        out.append(100.0 * hits / total)
    return out


@pytest.mark.parametrize("alpha", [0.2, 0.05, 2.0])
def test_softmax_alpha_sink_is_thresholded_on_the_unscaled_distribution(alpha):
    """Table 14: with rows summing to alpha = 0.2 an alpha-scaled map could never pass eps = 0.3 (Sink = 0 by
    construction) and for alpha > 1 the threshold would be eps / alpha. The metric uses the row-normalised map,
    as the seed's evaluation does for every operation (model_attn_sim_infer.py returns attn / sum attn)."""
    model, idx = first_token_sink_model(softmax_alpha=alpha)
    _, an = model(idx, return_analysis={"attn", "hidden"})
    w = an.attn[0]
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    meter = SinkMeter()
    meter.update(an.attn)
    res = meter.compute()
    assert res.sink[1] == 100.0 and res.sink[2] == 0.0
    assert sink_by_hand([alpha * w])[0] == (0.0 if alpha < 0.3 else 100.0)   # what thresholding alpha*A gave
    # a random alpha model: the metric equals the hand loop on the reference loop's row-normalised map
    model = build(softmax_alpha=alpha, n_layer=2)
    idx = torch.randint(0, V, (2, 12))
    _, an = model(idx, return_analysis=True)
    maps = []
    for layer, block in enumerate(model.blocks):
        out, w_ref, _, _ = ref_block(an.hidden[layer], block, model.config, list(range(12)))
        torch.testing.assert_close(an.attn[layer], w_ref, rtol=1e-9, atol=1e-9)
        maps.append(w_ref)
    meter = SinkMeter(eps=0.1)
    meter.update(an.attn)
    res = meter.compute()
    assert [res.sink[k] for k in range(1, 11)] == pytest.approx(sink_by_hand(maps, eps=0.1))
    # the first layer's map does not depend on alpha at all
    plain = build(n_layer=2)
    plain.load_state_dict(model.state_dict())
    _, an1 = plain(idx, return_analysis={"attn"})
    torch.testing.assert_close(an.attn[0], an1.attn[0], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- post-norm (point 6)
def test_post_norm_has_no_final_norm_like_the_seed():
    """model_postln.py of the seed comments ln_f out: the head reads the last block's (normalised) output."""
    model = build(norm_position="post")
    assert isinstance(model.ln_f, torch.nn.Identity)
    assert not any(k.startswith("ln_f") for k in model.state_dict())
    idx = torch.randint(0, V, (2, 6))
    logits, an = model(idx, return_analysis={"hidden"})
    torch.testing.assert_close(logits, an.hidden[-1] @ model.lm_head.weight.T, rtol=1e-12, atol=1e-12)
    pre = build(norm_position="pre")
    assert any(k.startswith("ln_f") for k in pre.state_dict())


def test_checkpoints_of_the_former_variants_load_or_are_refused_clearly(tmp_path):
    from lit_gpt.checkpoint import load_model, write_checkpoint

    # a 'relative' checkpoint with the learned table (written before the paper's fixed bias became 'relative')
    old = build(pos_encoding="relative_learned")
    sd = old.state_dict()
    cfg = dict(old.config.to_dict(), pos_encoding="relative")
    write_checkpoint(tmp_path / "rel", sd, Config(**cfg))
    with pytest.warns(UserWarning, match="now called 'relative_learned'"):
        model, payload = load_model(tmp_path / "rel", dtype=torch.float64)
    assert model.config.pos_encoding == "relative_learned"
    idx = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(model(idx), old(idx))
    # a post-norm checkpoint with a final norm computes a function no config has any more: refused, one line
    post = build(norm_position="post")
    sd = dict(post.state_dict(), **{"ln_f.weight": torch.ones(post.config.n_embd, dtype=torch.float64)})
    write_checkpoint(tmp_path / "post", sd, post.config)
    with pytest.raises(ValueError, match="unexpected \\['ln_f.weight'\\]; it has a final norm ln_f, which post-norm"):
        load_model(tmp_path / "post")


FLEX_VARIANTS = [{}, dict(attn_mask="window", window_size=3), dict(attn_mask="prefix", prefix_size=5),
                 dict(pos_encoding="alibi", attn_mask="window", window_size=4),
                 dict(n_query_groups=2, softmax_alpha=2.0),
                 dict(sink_token=True, attn_mask="window", window_size=2), dict(pos_encoding="relative"),
                 dict(pos_encoding="relative_learned"),
                 dict(pos_encoding="relative", attn_mask="prefix", prefix_size=6),
                 dict(kv_bias="kv"), dict(kv_bias="k", kv_bias_shared=True, kv_bias_value="one_hot"),
                 dict(sink_logit=True), dict(sink_logit=True, kv_bias="kv", n_query_groups=2, softmax_alpha=0.5)]


@pytest.mark.parametrize("overrides", FLEX_VARIANTS, ids=variant_id)
@torch.no_grad()
def test_flex_path_equals_eager_forward(overrides):
    """FlexAttention (forward on CPU; it trains on CUDA only) computes the same function as the eager path, and
    every layer really ran it (a Flex failure raises with attn_impl='flex'; nothing falls back silently)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import warnings
    model = build(dtype=torch.float32, attn_impl="flex", **overrides)
    idx = torch.randint(0, V, (2, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = model(idx)
    assert model.attention_paths() == ["flex"] * model.config.n_layer
    model.config.attn_impl = "eager"
    torch.testing.assert_close(flex, model(idx), rtol=1e-4, atol=1e-4)
    assert model.attention_paths() == ["eager"] * model.config.n_layer


class OutOfResources(RuntimeError):
    """Stands for triton.runtime.errors.OutOfResources (matched by name, as torch.compile wraps it)."""


@torch.no_grad()
def test_flex_failures_are_visible(monkeypatch):
    """attn_impl='flex' never falls back; 'auto' falls back to SDPA only on a Triton resource limit, with a warning,
    and records that SDPA ran; any other error of the Flex path raises."""
    import lit_gpt.flex as flex
    import lit_gpt.model as model_mod

    def fails_with(error):
        def f(*a, **k):
            raise error
        return f

    model = build(dtype=torch.float32, attn_mask="window", window_size=3)
    idx = torch.randint(0, V, (2, 10))
    model.config.attn_impl = "sdpa"
    want = model(idx)
    assert model.attention_paths() == ["sdpa", "sdpa"]
    monkeypatch.setattr(flex, "_FAILED", {})                      # this test's own layout record
    monkeypatch.setattr(model_mod, "use_flex", lambda cfg, q, full: cfg.attn_impl in ("flex", "auto"))
    limit = RuntimeError("backend='inductor' raised")
    limit.__cause__ = OutOfResources("out of resource: shared memory, Required: 135168, Hardware limit: 101376")
    bug = TypeError("score_mod got an unexpected argument")
    for impl, error in (("flex", limit), ("flex", bug), ("auto", bug)):
        model.config.attn_impl = impl
        monkeypatch.setattr(flex, "flex_attention_forward", fails_with(error))
        with pytest.raises(flex.FlexAttentionError, match=f"FlexAttention failed for layout .* attn_impl='{impl}'"):
            model(idx)
    assert flex._FAILED == {}
    model.config.attn_impl = "auto"
    monkeypatch.setattr(flex, "flex_attention_forward", fails_with(limit))
    with pytest.warns(RuntimeWarning, match="Triton resource limit .* uses SDPA for this layout"):
        got = model(idx)
    torch.testing.assert_close(got, want)
    assert model.attention_paths() == ["sdpa", "sdpa"] and len(flex._FAILED) == 1
    assert not flex.flex_available(model.config)                  # this layout stays on SDPA, no retry per call
    assert flex.is_resource_limit(limit) and not flex.is_resource_limit(bug)


@torch.no_grad()
def test_flex_block_masks_are_a_bounded_cache_keyed_by_value(monkeypatch):
    """Block masks live in a small LRU keyed by (mask band, length, device): two models with different windows get
    their own entries (each the mask of its own window, by loops), two models with the same window share one, and
    however many lengths pass, at most BLOCK_MASK_CACHE_SIZE entries stay, the least recently used leaving first."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    import warnings
    from collections import OrderedDict
    import lit_gpt.flex as flex
    from lit_gpt.attention import causal_mask
    monkeypatch.setattr(flex, "_BLOCK_MASKS", OrderedDict())
    T = 20
    idx = torch.randint(0, V, (2, T))
    models = {w: build(dtype=torch.float32, attn_impl="flex", attn_mask="window", window_size=w) for w in (3, 5)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = {w: m(idx) for w, m in models.items()}
        again = build(dtype=torch.float32, attn_impl="flex", attn_mask="window", window_size=3)
        torch.testing.assert_close(again(idx), outs[3])
    assert len(flex._BLOCK_MASKS) == 2
    grid = torch.arange(T)
    for (key, _n, _device), bm in flex._BLOCK_MASKS.items():
        w = key[1]
        got = bm.mask_mod(0, 0, grid[:, None], grid[None, :])
        assert got.tolist() == [[j <= i and i - j < w for j in range(T)] for i in range(T)], key
    for w, m in models.items():
        m.config.attn_impl = "eager"
        torch.testing.assert_close(outs[w], m(idx), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(flex, "BLOCK_MASK_CACHE_SIZE", 4)
    first = flex.block_mask_for(causal_mask, 16, torch.device("cpu"))
    for n in range(17, 24):
        flex.block_mask_for(causal_mask, n, torch.device("cpu"))
        assert flex.block_mask_for(causal_mask, 16, torch.device("cpu")) is first    # used: stays
        assert len(flex._BLOCK_MASKS) <= 4
    assert [k[1] for k in flex._BLOCK_MASKS] == [21, 22, 23, 16]              # the two window masks left first


def test_gpu_checks_fail_a_flex_case_that_did_not_run_flex():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_checks import case_ok

    flex = dict(attn_mask="window", window_size=64, attn_impl="flex")
    assert case_ok("flex_window64", flex, 1e-7, 1e-6, 11.0, "flex")
    assert not case_ok("flex_window64", flex, 1e-7, 1e-6, 11.0, "sdpa")      # the silent fallback of before
    assert not case_ok("flex_window64", flex, 1e-7, 1e-6, 11.0, "flex / bf16 flex+sdpa")
    assert case_ok("window64", dict(attn_mask="window", window_size=64), 1e-7, 1e-6, 11.0, "sdpa")
    assert not case_ok("flex_window64", flex, 1e-3, 1e-6, 11.0, "flex")


def test_unknown_analysis_keys_give_the_shared_one_line_error():
    model = build()
    idx = torch.zeros(1, 4, dtype=torch.long)
    for need, line in ((["attn", "hiden"], "return_analysis=['hiden'] is invalid (did you mean hidden?); "
                                           "allowed: attn, hidden, q, k, v"),
                       (["x", "logits"], "return_analysis=['logits', 'x'] is invalid; allowed: attn, hidden, q, k, v")):
        with pytest.raises(ValueError) as e:
            model(idx, return_analysis=need)
        assert str(e.value) == line
