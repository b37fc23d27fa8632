"""Hugging Face adapters (transformers 5.x) on tiny random models built from configs (no download).

* Llama (GQA) and GPT-NeoX (partial rotary) against the models written out in float64 loops with the papers'
  attention plans (StreamingLLM cache-index positions; LM-Infinite's Λ mask and distance ceiling);
* every supported family, one layer: StreamingLLM at query p equals the model's own forward over the cache
  content (sinks + recent tokens, re-indexed from 0), which is the paper's definition when keys depend on the
  token and its position only (Falcon and BLOOM included, ALiBi or RoPE);
HF computes RoPE angles in float32 even for float64 models, hence tolerances of 1e-6.
* dense streaming == the model's own forward; ragged rows stay independent; disable restores the model.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
    GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
)

from lit_gpt.hf_streaming import HFRunner, SinkCache, disable_streaming, enable_streaming  # noqa: E402
from lit_gpt.streaming import StreamingSpec, stream_generate, stream_nll  # noqa: E402
from streaming_reference import (  # noqa: E402
    lminfinite_middle, lminfinite_plan, ref_hf_llama_logits, ref_hf_neox_logits, streamingllm_plan,
)

V = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(family, layers=2, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=32)
    if family == "llama":
        m = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=40, num_hidden_layers=layers, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64))
    elif family == "mistral":
        m = MistralForCausalLM(MistralConfig(**common, intermediate_size=40, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=None))
    elif family == "gpt_neox":
        m = GPTNeoXForCausalLM(GPTNeoXConfig(**common, intermediate_size=40, num_hidden_layers=layers,
                                             num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=64))
    elif family == "falcon":
        m = FalconForCausalLM(FalconConfig(**common, num_hidden_layers=layers, num_attention_heads=4, alibi=False))
    elif family == "falcon_alibi":
        m = FalconForCausalLM(FalconConfig(**common, num_hidden_layers=layers, num_attention_heads=4, alibi=True))
    else:
        m = BloomForCausalLM(BloomConfig(**common, n_layer=layers, n_head=4))
    with torch.no_grad():   # larger weights than the HF init so that attention is far from uniform
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "word_embeddings" not in name:
                p.mul_(4.0)
    return m.double().eval()


def stream_logits(runner, idx, spec, chunk):
    runner.start(idx.shape[0], spec)
    T = idx.shape[1]
    out = [runner.step(idx[:, c:c + chunk], torch.arange(c, min(T, c + chunk))) for c in range(0, T, chunk)]
    runner.stop()
    return torch.cat(out, 1)


FAMILIES = ["llama", "mistral", "gpt_neox", "falcon", "falcon_alibi", "bloom"]


@torch.no_grad()
def test_lminfinite_topk_on_hf_llama_follows_the_reference():
    """LM-Infinite's top-k middle tokens at distance top_k_insert_at (default L / 2) on a Hugging Face model."""
    model = tiny("llama", layers=3)
    idx = torch.randint(0, V, (2, 16))
    for insert_at, at in ((None, 3), (9, 9)):
        spec = StreamingSpec(2, 6, "lminfinite", topk=2, topk_from_layer=1, topk_insert_at=insert_at)
        want = ref_hf_llama_logits(model, idx, lminfinite_plan(2, 6, 6), topk=2, topk_from_layer=1,
                                   middle=lminfinite_middle(2, 6), insert_at=at)
        for chunk in (1, 7):
            torch.testing.assert_close(stream_logits(HFRunner(model), idx, spec, chunk), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family,ref", [("llama", ref_hf_llama_logits), ("gpt_neox", ref_hf_neox_logits)])
@torch.no_grad()
def test_rope_adapters_follow_the_papers_definitions(family, ref):
    model = tiny(family)
    idx = torch.randint(0, V, (2, 14))
    cases = [(StreamingSpec(2, 4, "reindex"), streamingllm_plan(2, 4)),
             (StreamingSpec(2, 4, "lminfinite"), lminfinite_plan(2, 4, 4))]
    want = [ref(model, idx, plan) for _, plan in cases]
    runner = HFRunner(model)
    for (spec, _), w in zip(cases, want):
        for chunk in (1, 5):
            torch.testing.assert_close(stream_logits(runner, idx, spec, chunk), w, rtol=1e-6, atol=1e-6)
    assert (want[0] - want[1]).abs().max() > 1e-3          # the two policies differ here


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_one_layer_reindex_equals_own_forward_over_the_cache_content(family):
    model = tiny(family, layers=1)
    idx = torch.randint(0, V, (2, 12))
    s, r = 2, 4
    want = []
    for p in range(12):           # the model's own attention over [sinks, recent] at positions 0..len-1
        content = sorted(set(range(min(s, p + 1))) | set(range(max(0, p - r + 1), p + 1)))
        want.append(model(idx[:, content]).logits[:, -1])
    want = torch.stack(want, 1)
    runner = HFRunner(model)
    for chunk in (1, 5):
        torch.testing.assert_close(stream_logits(runner, idx, StreamingSpec(s, r, "reindex"), chunk), want,
                                   rtol=1e-6, atol=1e-6)
    window_only = stream_logits(runner, idx, StreamingSpec(0, r + s), 1)
    assert (window_only[:, s + r:] - want[:, s + r:]).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_dense_equals_own_forward_and_rows_stay_independent(family):
    model = tiny(family)
    idx = torch.randint(0, V, (2, 13))
    own = torch.log_softmax(model(idx).logits, -1)
    want = -own[:, :-1].gather(-1, idx[:, 1:, None])[..., 0]
    single = [torch.log_softmax(model(idx[i:i + 1, :n]).logits, -1) for i, n in ((0, 13), (1, 7))]
    runner = HFRunner(model)
    torch.testing.assert_close(stream_nll(runner, idx, None, chunk_size=5), want, rtol=1e-6, atol=1e-6)
    spec = StreamingSpec(2, 3)
    ref_rows = [stream_nll(runner, idx[i:i + 1, :n], spec, chunk_size=1) for i, n in ((0, 13), (1, 7))]
    ragged = stream_nll(runner, idx, spec, chunk_size=4, lengths=torch.tensor([13, 7]))
    torch.testing.assert_close(ragged[0], ref_rows[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ragged[1, :6], ref_rows[1][0], rtol=1e-6, atol=1e-6)
    dense_rows = stream_nll(runner, idx, None, chunk_size=3, lengths=torch.tensor([13, 7]))
    torch.testing.assert_close(dense_rows[1, :6], -single[1][0, :-1].gather(-1, idx[1, 1:7, None])[..., 0],
                               rtol=1e-6, atol=1e-6)
    disable_streaming(model)
    torch.testing.assert_close(torch.log_softmax(model(idx).logits, -1), own)


@torch.no_grad()
def test_cache_is_a_transformers_cache_and_plain_calls_continue_positions():
    model = tiny("llama")
    enable_streaming(model)
    cache = SinkCache(model, StreamingSpec(2, 4))
    assert isinstance(cache, transformers.Cache)
    idx = torch.randint(0, V, (1, 11))
    out = [model(input_ids=idx[:, :5], past_key_values=cache, use_cache=True).logits]
    for t in range(5, 11):        # no positions given: HF's default position_ids from get_seq_length()
        out.append(model(input_ids=idx[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert cache.get_seq_length() == 11
    torch.testing.assert_close(torch.cat(out, 1), ref_hf_llama_logits(model, idx, streamingllm_plan(2, 4)),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="needs past_key_values=SinkCache"):
        model(input_ids=idx[:, :3])
    disable_streaming(model)


@torch.no_grad()
def test_hf_generate_with_sink_cache_equals_stream_generate():
    model = tiny("llama")
    idx = torch.randint(0, V, (1, 6))
    runner = HFRunner(model)
    spec = StreamingSpec(2, 4)
    ours = stream_generate(runner, [idx[0].tolist()], spec, 14)[0]
    out = model.generate(idx, past_key_values=SinkCache(model, spec), max_new_tokens=14, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert out[0, 6:].tolist() == ours
    disable_streaming(model)


def test_unsupported_models_raise_one_line_errors():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported by hf_streaming; allowed: llama"):
        HFRunner(gpt2)
    dyn = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                               "rope_theta": 10000.0}))
    with pytest.raises(ValueError, match="rope_type='dynamic' is not supported for streaming"):
        HFRunner(dyn)
