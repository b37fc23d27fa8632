"""Streaming caches of our GPT against independent references.

* ``original`` policy == the model's own full forward under the sink + window mask (same positions), for every
  positional encoding and attention variant where streaming is meaningful;
* ``reindex`` == StreamingLLM's definition (positions = indices inside the cache), ``lminfinite`` == LM-Infinite's
  (Λ mask, distance min(p - j, L), optional top-k middle tokens), both from loop maths in float64
  (tests/streaming_reference.py), token by token and in chunks of any length;
* rows of different lengths stay independent; memory stays bounded; the drivers (NLL, recomputation,
  generation) match direct computations.
"""
import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.attention import sink_window_mask, window_mask
from lit_gpt.generate import GPTRunner, StreamSession, recompute_nll, stream_generate, stream_nll
from lit_gpt.streaming import SinkWindowKV, StreamingSpec, install_streaming
from streaming_reference import lminfinite_middle, lminfinite_plan, ref_gpt_logits, streamingllm_plan
from conftest import variant_id

V = 48


pytestmark = pytest.mark.usefixtures("one_thread")


def build(seed=0, **overrides):
    base = dict(block_size=64, vocab_size=V, padding_multiple=1, n_layer=2, n_head=4, n_embd=16,
                intermediate_size=24)
    base.update(overrides)
    torch.manual_seed(seed)
    model = GPT(Config(**base)).double()
    with torch.no_grad():   # non-constant norms and slots so that they act
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith("ln_f") or name.endswith("sink_logit"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def run_chunks(model, idx, spec, chunk):
    runner = GPTRunner(model)
    runner.start(idx.shape[0], spec)
    T = idx.shape[1]
    outs = [runner.step(idx[:, c:c + chunk], torch.arange(c, min(T, c + chunk))) for c in range(0, T, chunk)]
    runner.stop()
    return torch.cat(outs, 1)


VARIANTS = [
    {}, dict(n_query_groups=2), dict(rotary_percentage=0.5, n_embd=32), dict(pos_encoding="alibi"),
    dict(pos_encoding="relative"), dict(pos_encoding="relative_learned"), dict(pos_encoding="nope"),
    dict(pos_encoding="sinusoidal"),
    dict(pos_encoding="learned"), dict(kv_bias="k"), dict(kv_bias="kv"), dict(sink_logit=True),
    dict(sink_token=True), dict(attn_op="sigmoid"), dict(attn_op="elu_kernel"), dict(attn_op="mlp_kernel"),
    dict(softmax_alpha=2.0), dict(attn_mask="window", window_size=4), dict(head_output="sum"),
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=variant_id)
@torch.no_grad()
def test_original_positions_equal_full_forward_under_the_sink_window_mask(overrides):
    model = build(**overrides)
    idx = torch.randint(0, V, (2, 17))
    for s, r in ((2, 5), (0, 6)):
        mask = sink_window_mask(s, r) if s else window_mask(r)
        if model.config.attn_mask == "window":
            inner = mask
            mask = lambda q, k, inner=inner: inner(q, k) & (q - k < model.config.window_size)
        full = model(idx, mask_fn=mask)
        for chunk in (1, 3, 17):
            got = run_chunks(model, idx, StreamingSpec(s, r, "original"), chunk)
            torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("overrides", [{}, dict(n_query_groups=2), dict(rotary_percentage=0.5, n_embd=32),
                                       dict(pos_encoding="alibi"), dict(pos_encoding="nope")], ids=variant_id)
@torch.no_grad()
def test_reindexed_positions_follow_streamingllm(overrides):
    model = build(**overrides)
    idx = torch.randint(0, V, (2, 16))
    s, r = 2, 5
    ref = ref_gpt_logits(model, idx, streamingllm_plan(s, r))
    for chunk in (1, 4, 7, 16):      # decoding path, chunks shorter and longer than the window
        got = run_chunks(model, idx, StreamingSpec(s, r, "reindex"), chunk)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    # and it is a different model from original positions once the window has moved (the test has teeth)
    orig = run_chunks(model, idx, StreamingSpec(s, r, "original"), 1)
    if model.config.pos_encoding != "nope":
        assert (orig[:, s + r:] - ref[:, s + r:]).abs().max() > 1e-4
    torch.testing.assert_close(orig[:, : s + r], ref[:, : s + r], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("overrides", [{}, dict(n_query_groups=2), dict(pos_encoding="alibi")], ids=variant_id)
@torch.no_grad()
def test_lminfinite_follows_the_distance_ceiling(overrides):
    model = build(**overrides)
    idx = torch.randint(0, V, (2, 16))
    n_global, L = 2, 5                        # the paper's setting: n_local = L_pretrain
    ref = ref_gpt_logits(model, idx, lminfinite_plan(n_global, L, L))
    for chunk in (1, 3, 16):
        got = run_chunks(model, idx, StreamingSpec(n_global, L, "lminfinite"), chunk)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pos_encoding", ["rope", "alibi"])
@pytest.mark.parametrize("insert_at", [None, 3, 11])
@torch.no_grad()
def test_lminfinite_topk_middle_tokens(pos_encoding, insert_at):
    """LM-Infinite's top-k (its models/llama.py): middle tokens scored and attended at distance top_k_insert_at
    (default L_pretrain / 2), only once k of them exist."""
    model = build(n_layer=3, pos_encoding=pos_encoding)
    idx = torch.randint(0, V, (2, 18))
    n_global, L, k = 2, 6, 2
    at = L // 2 if insert_at is None else insert_at
    ref = ref_gpt_logits(model, idx, lminfinite_plan(n_global, L, L), topk=k, topk_from_layer=1,
                         middle=lminfinite_middle(n_global, L), insert_at=at)
    spec = StreamingSpec(n_global, L, "lminfinite", topk=k, topk_from_layer=1, topk_insert_at=insert_at)
    assert spec.insert_at == at
    for chunk in (1, 5, 18):
        torch.testing.assert_close(run_chunks(model, idx, spec, chunk), ref, rtol=1e-9, atol=1e-9)
    plain = run_chunks(model, idx, StreamingSpec(n_global, L, "lminfinite"), 1)
    assert (plain - ref).abs().max() > 1e-4   # top-k really changes layers >= 1
    # the insertion distance matters: scoring the middle at the ceiling L (this repo's former choice) differs
    at_ceiling = run_chunks(model, idx, StreamingSpec(n_global, L, "lminfinite", topk=k, topk_from_layer=1,
                                                      topk_insert_at=L), 1)
    assert at == L or (at_ceiling - ref).abs().max() > 1e-4


@torch.no_grad()
def test_rows_of_different_lengths_stay_independent():
    model = build(n_query_groups=2)
    a, b = torch.randint(0, V, (1, 19)), torch.randint(0, V, (1, 11))
    spec = StreamingSpec(2, 5, "reindex")
    ref_a = run_chunks(model, a, spec, 1)
    ref_b = run_chunks(model, b, spec, 1)
    # b padded on the right with garbage; chunked prefill of 6, rows at different positions in every call
    tokens = torch.cat([a, torch.cat([b, torch.randint(0, V, (1, 8))], 1)])
    runner = GPTRunner(model)
    nll = stream_nll(runner, tokens, spec, chunk_size=6, lengths=torch.tensor([19, 11]))
    for row, ref, n in ((0, ref_a, 19), (1, ref_b, 11)):
        lp = torch.log_softmax(ref[0, : n - 1], -1)
        want = -lp.gather(-1, tokens[row, 1:n].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(nll[row, : n - 1], want, rtol=1e-9, atol=1e-9)
    assert torch.isnan(nll[1, 10:]).all()
    # decoding with rows at different positions: prompts of 13 and 4 tokens, then 6 greedy steps each
    outs = stream_generate(runner, [a[0, :13].tolist(), b[0, :4].tolist()], spec, 6, chunk_size=5)
    for row, prompt in ((0, a[0, :13]), (1, b[0, :4])):
        seq = prompt.tolist()
        for _ in range(6):        # greedy by re-streaming the whole sequence token by token
            seq.append(int(run_chunks(model, torch.tensor([seq]), spec, 1)[0, -1].argmax()))
        assert outs[row] == seq[len(prompt):]


@torch.no_grad()
def test_multi_turn_session_equals_one_stream():
    model = build()
    spec = StreamingSpec(2, 5, "reindex")
    turn1, turn2 = torch.randint(0, V, (9,)).tolist(), torch.randint(0, V, (4,)).tolist()
    session = StreamSession(GPTRunner(model), 1, spec, chunk_size=4)
    session.feed([turn1])
    gen1 = session.generate(5, feed_last=True)[0]
    session.feed([turn2])
    gen2 = session.generate(3)[0]
    session.close()
    seq = turn1 + gen1 + turn2 + gen2
    logits = run_chunks(model, torch.tensor([seq]), spec, 1)[0]
    n1 = len(turn1)
    assert gen1 == logits[n1 - 1: n1 + 4].argmax(-1).tolist()
    n2 = n1 + 5 + len(turn2)
    assert gen2 == logits[n2 - 1: n2 + 2].argmax(-1).tolist()


@torch.no_grad()
def test_cache_memory_is_bounded_and_eviction_is_in_place():
    model = build()
    spec = StreamingSpec(4, 8, "reindex")
    caches = install_streaming(model, spec)
    model(torch.randint(0, V, (2, 3)), input_pos=torch.arange(3))
    kv = caches[0].kv
    ptr, nbytes = kv.k.data_ptr(), caches[0].nbytes()
    for t in range(3, 60):
        model(torch.randint(0, V, (2, 1)), input_pos=torch.tensor([t]))
    assert kv.k.shape[2] == 12 and kv.k.data_ptr() == ptr and caches[0].nbytes() == nbytes
    held = sorted(kv.pos[0].tolist())
    assert held == [0, 1, 2, 3] + list(range(52, 60))   # the sinks and the last 8 positions
    model.clear_kv_cache()


def test_meaningless_combinations_raise_one_line_errors():
    for pe in ("learned", "sinusoidal"):
        model = build(pos_encoding=pe)
        for policy in ("reindex", "lminfinite"):
            with pytest.raises(ValueError, match=f"policy='{policy}' is invalid with pos_encoding='{pe}'"):
                install_streaming(model, StreamingSpec(2, 4, policy))
    with pytest.raises(ValueError, match="attn_mask='prefix'"):
        install_streaming(build(attn_mask="prefix", prefix_size=3), StreamingSpec(2, 4))
    with pytest.raises(ValueError, match="topk=2 is invalid with attn_op='sigmoid'"):
        install_streaming(build(attn_op="sigmoid"), StreamingSpec(2, 4, "lminfinite", topk=2))
    with pytest.raises(ValueError, match="StreamingSpec.policy='sliding' is invalid; allowed: reindex"):
        StreamingSpec(policy="sliding")
    with pytest.raises(ValueError, match="StreamingSpec.recent_size=0"):
        StreamingSpec(4, 0)
    with pytest.raises(ValueError, match="topk=5 is invalid; allowed: 0 unless policy='lminfinite'"):
        StreamingSpec(topk=5)
    with pytest.raises(ValueError, match="StreamingSpec.topk_insert_at=8 is invalid; allowed: null unless topk > 0"):
        StreamingSpec(2, 4, "lminfinite", topk_insert_at=8)
    with pytest.raises(ValueError, match="StreamingSpec.topk_insert_at=-1 is invalid; allowed: an integer >= 0"):
        StreamingSpec(2, 4, "lminfinite", topk=2, topk_insert_at=-1)


def test_spec_and_static_step_errors_are_the_repo_line():
    # the exact lines (lit_gpt.utils.invalid_choice's wording): a rule, or the allowed values with a hint
    lines = {
        "StreamingSpec.start_size=-1 is invalid; allowed: an integer >= 0": dict(start_size=-1),
        "StreamingSpec.recent_size=True is invalid; allowed: an integer >= 1 (the query sees itself)":
            dict(recent_size=True),
        "StreamingSpec.max_distance=8 is invalid; allowed: null unless policy='lminfinite' (policy='reindex')":
            dict(max_distance=8),
        "StreamingSpec.topk_from_layer=-2 is invalid; allowed: an integer >= 0": dict(topk_from_layer=-2),
        "StreamingSpec.policy='sliding' is invalid; allowed: reindex, original, lminfinite": dict(policy="sliding"),
        "StreamingSpec.policy='lminfinte' is invalid (did you mean lminfinite?); allowed: reindex, original, "
        "lminfinite": dict(policy="lminfinte"),
    }
    for line, kwargs in lines.items():
        with pytest.raises(ValueError) as e:
            StreamingSpec(**kwargs)
        assert str(e.value) == line
    with pytest.raises(ValueError) as e:
        SinkWindowKV(StreamingSpec(2, 4)).enter_static("smda")
    assert str(e.value) == "attention='smda' is invalid (did you mean sdpa?); allowed: sdpa, matmul"


@torch.no_grad()
def test_dense_stream_nll_and_recomputation_match_direct_forwards():
    model = build()
    runner = GPTRunner(model)
    tokens = torch.randint(0, V, (2, 21))
    full = torch.log_softmax(model(tokens), -1)
    want = -full[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(stream_nll(runner, tokens, None, chunk_size=4), want, rtol=1e-9, atol=1e-9)
    W = 6
    for stride in (1, 4):
        got = recompute_nll(runner, tokens, W, stride)
        for t in range(1, 21):                         # target t: the window of the forward that scores it
            b = W if t <= W else W + stride * -(-(t - W) // stride)
            b = min(b, 20)
            a = max(0, b - W)
            lp = torch.log_softmax(model(tokens[:, a:b])[:, t - 1 - a], -1)
            torch.testing.assert_close(got[:, t - 1], -lp.gather(-1, tokens[:, t:t + 1]).squeeze(-1),
                                       rtol=1e-9, atol=1e-9)
            assert t - a <= W and (stride > 1 or t - a == min(t, W))


@torch.no_grad()
def test_analysis_maps_come_back_through_the_streaming_cache():
    model = build()
    install_streaming(model, StreamingSpec(2, 4, "reindex"))
    idx = torch.randint(0, V, (1, 9))
    out, an = model(idx, input_pos=torch.arange(9), return_analysis={"attn"})
    w = an.attn[0]                                     # columns: 2 sinks, no ring slot used yet, 9 chunk keys
    assert w.shape == (1, 4, 9, 11)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 9, dtype=w.dtype))
    assert (w[0, :, 8, :2] > 0).all() and (w[0, :, 8, 2:7] == 0).all()  # sinks seen from p=8, not via the chunk
    assert (w[0, :, 8, 7:] > 0).all()                  # the window: positions 5..8
    out, an = model(idx[:, :1], input_pos=torch.tensor([9]), return_analysis={"attn"})
    assert an.attn[0].shape == (1, 4, 1, 6)            # decoding: 2 sinks + the 4-slot ring
    model.clear_kv_cache()


GRAPH_VARIANTS = [{}, dict(n_query_groups=2), dict(pos_encoding="alibi"), dict(kv_bias="kv", sink_logit=True),
                  dict(attn_op="sigmoid")]


@pytest.mark.parametrize("overrides", GRAPH_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("policy", ["reindex", "lminfinite"])
@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
@torch.no_grad()
def test_graph_safe_decoding_equals_token_by_token_streaming(overrides, policy, attention):
    """GraphDecoder's step (device-side ring writes, all slots attended; the CUDA graph itself needs a GPU) gives
    the logits of plain token-by-token streaming, also with rows at different positions, padding, and a chunked
    prefill between decoding steps."""
    model = build(**overrides)
    spec = StreamingSpec(2, 6, policy)
    T = 40
    idx = torch.randint(0, V, (2, T))
    ref = run_chunks(model, idx, spec, 1)                   # token by token, the dynamic path
    runner = GPTRunner(model)
    runner.start(2, spec)
    runner.step(idx[:, :3], torch.arange(3))                # prefill past the sinks
    from lit_gpt.generate import GraphDecoder
    dec = GraphDecoder(model, 2, attention=attention)
    assert not dec.use_graph                                # CPU: the same static step, no graph
    outs = {}
    for t in range(3, 20):
        outs[t] = dec.step(idx[:, t:t + 1], torch.full((2, 1), t)).clone()
    runner.step(idx[:, 20:29], torch.arange(20, 29))         # a chunked call between steps
    for t in range(29, T):
        outs[t] = dec.step(idx[:, t:t + 1], torch.full((2, 1), t)).clone()
    runner.stop()
    for t, out in outs.items():
        torch.testing.assert_close(out, ref[:, t], rtol=1e-10, atol=1e-10)
    # a padded row (position -1) leaves its cache untouched: row 1 continues as if the step never happened
    runner.start(2, spec)
    runner.step(idx[:, :10], torch.arange(10))
    dec = GraphDecoder(model, 2, attention=attention)
    dec.step(idx[:, 10:11], torch.tensor([[10], [-1]]))
    got = dec.step(idx[:, 11:12], torch.tensor([[11], [10]])).clone()
    runner.stop()
    torch.testing.assert_close(got[0], ref[0, 11], rtol=1e-10, atol=1e-10)
    other = run_chunks(model, torch.cat([idx[1:, :10], idx[1:, 11:12]], 1), spec, 1)
    torch.testing.assert_close(got[1], other[0, 10], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
@torch.no_grad()
def test_compiled_graph_safe_step_equals_the_reference_and_updates_the_cache_in_place(attention):
    """GraphDecoder(compile=True) (inductor on CPU; the CUDA graph needs a GPU) gives StreamingLLM's logits from the
    float64 reference loop, and its compiled code allocates no cache-sized buffer: the ring write and the sink
    re-rotation are index writes that inductor does in place (a slice write of the sinks made it rewrite the whole
    cache every step, the step's largest kernel on an H200)."""
    from torch._inductor.utils import run_and_get_code

    from lit_gpt.generate import GraphDecoder
    torch._dynamo.reset()
    model = build(n_layer=1)
    s, r, B, T = 2, 6, 2, 20
    idx = torch.randint(0, V, (B, T))
    ref = ref_gpt_logits(model, idx, streamingllm_plan(s, r))
    runner = GPTRunner(model)
    runner.start(B, StreamingSpec(s, r, "reindex"))
    runner.step(idx[:, :3], torch.arange(3))
    dec = GraphDecoder(model, B, graph=False, compile=True, attention=attention)
    got, codes = run_and_get_code(lambda: dec.step(idx[:, 3:4], torch.full((B, 1), 3)).clone())
    outs = {3: got}
    for t in range(4, T):
        outs[t] = dec.step(idx[:, t:t + 1], torch.full((B, 1), t)).clone()
    runner.stop()
    torch._dynamo.reset()
    for t, out in outs.items():
        torch.testing.assert_close(out, ref[:, t], rtol=1e-9, atol=1e-9)
    cfg = model.config
    cache_shape = f"empty_strided_cpu(({B}, {cfg.n_query_groups}, {s + r}, {cfg.head_size})"
    assert codes and not any(cache_shape in c for c in codes)


def test_bad_recomputation_window_and_stride_give_the_shared_one_line_error():
    # checked before the runner is touched; the whole lines (lit_gpt.utils.invalid_choice's wording)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    for kwargs, line in ((dict(window=0), "window=0 is invalid; allowed: a positive integer"),
                         (dict(window=2.0), "window=2.0 is invalid; allowed: a positive integer"),
                         (dict(window=4, stride=5), "stride=5 is invalid; allowed: an integer in [1, window=4]")):
        with pytest.raises(ValueError) as e:
            recompute_nll(None, tokens, **kwargs)
        assert str(e.value) == line
