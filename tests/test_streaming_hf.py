"""Hugging Face streaming (lit_gpt.hf_streaming) on tiny random models built from configs (no download).

For every supported family (each through transformers' AttentionInterface unless noted):
* before the cache fills, streaming equals the model's own dense forward (its own attention, masks and cache);
* after it fills, streaming equals the reference definition of tests/streaming_reference.py: the model's own
  modules with attention by the paper's plan in a float64 loop, RoPE from the config (StreamingLLM: positions
  are indices in the cache; LM-Infinite: Λ mask and distance min(p - j, L); learned absolute positions: sinks +
  window at original positions), token by token and in chunks. Falcon / BLOOM (inline attention, ALiBi or RoPE)
  against their own forward over the cache content (StreamingLLM's definition for one layer), and Llama / NeoX
  also against the models written out by hand.
* refusals come from the config alone, in one line, before any weight loads; dense attention runs on any model;
  the cache keyword follows the installed transformers and nothing warns; the drop-in loader and the snippet in
  docs/streaming.md run.
HF computes RoPE angles in float32 even for float64 models, hence tolerances of 1e-6.
"""
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BloomConfig, BloomForCausalLM, CohereConfig, CohereForCausalLM, FalconConfig, FalconForCausalLM, Gemma2Config,
    Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig, GemmaForCausalLM, GlmConfig,
    GlmForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, GptOssConfig,
    GptOssForCausalLM, GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
    MistralForCausalLM, Olmo2Config, Olmo2ForCausalLM, OPTConfig, OPTForCausalLM, Phi3Config, Phi3ForCausalLM,
    PhiConfig, PhiForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, SmolLM3Config,
    SmolLM3ForCausalLM, StableLmConfig, StableLmForCausalLM, Starcoder2Config, Starcoder2ForCausalLM,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

from lit_gpt import hf_streaming as hs  # noqa: E402
from lit_gpt.hf_streaming import (  # noqa: E402
    HFRunner, SinkCache, cache_kwarg, cache_of, disable_streaming, enable_streaming, layer_position_ops,
    streaming_support,
)
from lit_gpt.generate import stream_generate, stream_nll  # noqa: E402
from lit_gpt.streaming import StreamingSpec  # noqa: E402
from streaming_reference import (  # noqa: E402
    lminfinite_middle, lminfinite_plan, original_plan, ref_hf_llama_logits, ref_hf_neox_logits, ref_hf_plan_logits,
    streamingllm_plan,
)

V = 40
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

ATTN = dict(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def rope(theta=10000.0, **extra):
    return {"rope_type": "default", "rope_theta": theta, **extra}


# family -> (model class, config) for the models that go through transformers' AttentionInterface
INTERFACE = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**ATTN)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**ATTN, sliding_window=5)),       # sliding everywhere
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**ATTN)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**ATTN, head_dim=8)),                    # q/k norms
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**ATTN, rope_parameters=rope(partial_rotary_factor=0.5))),
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(
        **ATTN, head_dim=8, query_pre_attn_scalar=16, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": rope(10000.0), "full_attention": rope(1000.0)})),
    "olmo2": lambda: Olmo2ForCausalLM(Olmo2Config(**ATTN)),
    "smollm3": lambda: SmolLM3ForCausalLM(SmolLM3Config(**ATTN, no_rope_layers=[1, 0])),  # layer 1: NoPE
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**ATTN, head_dim=8)),
    "phi": lambda: PhiForCausalLM(PhiConfig(**ATTN, rope_parameters=rope(partial_rotary_factor=0.5))),
    "stablelm": lambda: StableLmForCausalLM(StableLmConfig(**ATTN, qk_layernorm=True,
                                                           rope_parameters=rope(partial_rotary_factor=0.5))),
    "starcoder2": lambda: Starcoder2ForCausalLM(Starcoder2Config(**ATTN)),
    "granite": lambda: GraniteForCausalLM(GraniteConfig(**ATTN, attention_multiplier=0.3, embedding_multiplier=2.0,
                                                        residual_multiplier=0.5, logits_scaling=2.0)),
    "cohere": lambda: CohereForCausalLM(CohereConfig(**ATTN)),                             # interleaved RoPE
    "glm": lambda: GlmForCausalLM(GlmConfig(**ATTN, head_dim=8)),                          # interleaved, partial
    "gpt_oss": lambda: GptOssForCausalLM(GptOssConfig(                                     # learned sink logits
        **ATTN, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=3, rope_parameters=rope(),
        layer_types=["sliding_attention", "full_attention"], experts_implementation="eager")),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=40,
                                                         num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
                                                         max_position_embeddings=64)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=40, num_hidden_layers=2,
                                            num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)),
}
MODULE = {
    "falcon": lambda: FalconForCausalLM(FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, alibi=False)),
    "falcon_alibi": lambda: FalconForCausalLM(FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=4, alibi=True)),
    "bloom": lambda: BloomForCausalLM(BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)),
}
DENSE_ONLY = {   # refused for streaming (attention logit soft-capping): dense attention through its own cache
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**ATTN, head_dim=8, sliding_window=4)),
}
LEARNED = ("gpt2", "opt")
INTERLEAVED = ("cohere", "glm")


def tiny(family, layers=2, seed=0):
    torch.manual_seed(seed)
    if layers != 2:
        build = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**dict(ATTN, num_hidden_layers=layers))),
                 "mistral": lambda: MistralForCausalLM(MistralConfig(**dict(ATTN, num_hidden_layers=layers))),
                 "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
                     vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                     num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=64)),
                 "falcon": lambda: FalconForCausalLM(FalconConfig(
                     vocab_size=V, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, alibi=False)),
                 "falcon_alibi": lambda: FalconForCausalLM(FalconConfig(
                     vocab_size=V, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, alibi=True)),
                 "bloom": lambda: BloomForCausalLM(BloomConfig(vocab_size=V, hidden_size=32, n_layer=layers, n_head=4))
                 }[family]
    else:
        build = {**INTERFACE, **MODULE, **DENSE_ONLY}[family]
    m = build()
    with torch.no_grad():   # larger weights than the HF init so that attention is far from uniform
        for name, p in m.named_parameters():
            if p.dim() == 2 and not any(s in name for s in ("embed", "wte", "wpe", "word_embeddings", "router")):
                p.mul_(4.0)
            if name.endswith("sinks"):
                p.normal_(0.0, 1.0)
    return m.double().eval()


def config_rope(model, layout="half"):
    """(n_rot, base, layout) per layer read from the config (independently of the probe), None for NoPE."""
    cfg = model.config
    rp = cfg.rope_parameters
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    types = getattr(cfg, "layer_types", None) or [None] * cfg.num_hidden_layers
    nope = getattr(cfg, "no_rope_layers", None)
    out = []
    for i, t in enumerate(types):
        r = rp[t] if t in rp else rp
        n_rot = int(d * r.get("partial_rotary_factor", 1.0))
        out.append(None if nope is not None and not nope[i] else (n_rot, r["rope_theta"], layout))
    return out


def stream_logits(runner, idx, spec, chunk):
    runner.start(idx.shape[0], spec)
    T = idx.shape[1]
    out = [runner.step(idx[:, c:c + chunk], torch.arange(c, min(T, c + chunk))) for c in range(0, T, chunk)]
    runner.stop()
    return torch.cat(out, 1)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- every family vs the definitions
@pytest.mark.parametrize("family", list(INTERFACE) + list(MODULE))
@torch.no_grad()
def test_before_the_cache_fills_streaming_equals_dense_decoding(family):
    model = tiny(family)
    idx = torch.randint(0, V, (2, 9))
    own = model(idx).logits                     # the model's own attention (sdpa / eager) and masks
    runner = HFRunner(model)
    assert runner.refusal is None
    policies = ("original",) if family in LEARNED else ("reindex", "original", "lminfinite")
    for policy in policies:
        spec = StreamingSpec(2, 9, policy)      # 9 tokens: nothing has left the window yet
        for chunk in (1, 4):
            close(stream_logits(runner, idx, spec, chunk), own)
    close(stream_logits(runner, idx, StreamingSpec(0, 4), 9)[:, :4], own[:, :4])


@pytest.mark.parametrize("family", [f for f in INTERFACE if f not in LEARNED])
@torch.no_grad()
def test_after_the_cache_fills_streaming_equals_the_papers_definitions(family):
    model = tiny(family)
    idx = torch.randint(0, V, (2, 13))
    layer_rope = config_rope(model, "interleaved" if family in INTERLEAVED else "half")
    s, r = 2, 4
    cases = [(StreamingSpec(s, r, "reindex"), streamingllm_plan(s, r)),
             (StreamingSpec(s, r, "lminfinite"), lminfinite_plan(s, r, r))]
    want = [ref_hf_plan_logits(model, idx, plan, layer_rope) for _, plan in cases]
    runner = HFRunner(model)
    for (spec, _), w in zip(cases, want):
        for chunk in (1, 5):
            close(stream_logits(runner, idx, spec, chunk), w)
    assert (want[0] - want[1]).abs().max() > 1e-4          # the two policies differ here


@pytest.mark.parametrize("family", LEARNED)
@torch.no_grad()
def test_learned_positions_stream_at_original_positions_only(family):
    model = tiny(family)
    idx = torch.randint(0, V, (2, 13))
    runner = HFRunner(model)
    for s, r in ((2, 4), (0, 5)):
        want = ref_hf_plan_logits(model, idx, original_plan(s, r), [None, None], learned=True)
        for chunk in (1, 5):
            close(stream_logits(runner, idx, StreamingSpec(s, r, "original"), chunk), want)
    close(stream_logits(runner, idx, StreamingSpec(0, 5), 3),                   # a window: nothing to re-index
          ref_hf_plan_logits(model, idx, original_plan(0, 5), [None, None], learned=True))
    for policy in ("reindex", "lminfinite"):
        with pytest.raises(ValueError, match=f"policy='{policy}' is invalid for {family} .learned absolute"):
            runner.start(1, StreamingSpec(2, 4, policy))
    runner.start(1, StreamingSpec(2, 4, "original"))
    with pytest.raises(ValueError, match="position 64 is past .* learned position table .max_position_embeddings=64"):
        runner.step(idx[:1, :1], torch.tensor([[64]]))


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
def test_rope_adapters_follow_the_models_written_out(family, ref):
    model = tiny(family)
    idx = torch.randint(0, V, (2, 14))
    cases = [(StreamingSpec(2, 4, "reindex"), streamingllm_plan(2, 4)),
             (StreamingSpec(2, 4, "lminfinite"), lminfinite_plan(2, 4, 4))]
    want = [ref(model, idx, plan) for _, plan in cases]
    runner = HFRunner(model)
    for (spec, _), w in zip(cases, want):
        for chunk in (1, 5):
            close(stream_logits(runner, idx, spec, chunk), w)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt_neox", "falcon", "falcon_alibi", "bloom"])
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
        close(stream_logits(runner, idx, StreamingSpec(s, r, "reindex"), chunk), want)
    window_only = stream_logits(runner, idx, StreamingSpec(0, r + s), 1)
    assert (window_only[:, s + r:] - want[:, s + r:]).abs().max() > 1e-4


@torch.no_grad()
def test_each_layers_rope_is_measured_from_the_model():
    g3 = tiny("gemma3")
    ops = layer_position_ops(g3)
    bases = [op.inv_freq[1].item() for op in ops]          # inv_freq[1] = base^(-2/8)
    assert bases == pytest.approx([10000.0 ** -0.25, 1000.0 ** -0.25]) and ops[0].layout == "half"
    assert [op.kind for op in layer_position_ops(tiny("smollm3"))] == ["rope", "none"]
    assert {op.layout for op in layer_position_ops(tiny("cohere"))} == {"interleaved"}
    assert [len(op.inv_freq) for op in layer_position_ops(tiny("phi3"))] == [2, 2]    # partial: 4 of 8 dims
    assert [op.kind for op in layer_position_ops(tiny("gpt2"))] == ["absolute", "absolute"]
    yarn = LlamaForCausalLM(LlamaConfig(**ATTN, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})).eval()
    op = layer_position_ops(yarn)[0]
    torch.testing.assert_close(op.inv_freq.float(), yarn.model.rotary_emb.inv_freq)
    assert yarn.config._attn_implementation == "sdpa"      # the probe restores the attention implementation


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neox", "falcon", "bloom", "gpt2"])
@torch.no_grad()
def test_dense_equals_own_forward_and_rows_stay_independent(family):
    model = tiny(family)
    idx = torch.randint(0, V, (2, 13))
    own = torch.log_softmax(model(idx).logits, -1)
    want = -own[:, :-1].gather(-1, idx[:, 1:, None])[..., 0]
    single = [torch.log_softmax(model(idx[i:i + 1, :n]).logits, -1) for i, n in ((0, 13), (1, 7))]
    runner = HFRunner(model)
    close(stream_nll(runner, idx, None, chunk_size=5), want)
    spec = StreamingSpec(2, 3, "original" if family == "gpt2" else "reindex")
    ref_rows = [stream_nll(runner, idx[i:i + 1, :n], spec, chunk_size=1) for i, n in ((0, 13), (1, 7))]
    ragged = stream_nll(runner, idx, spec, chunk_size=4, lengths=torch.tensor([13, 7]))
    close(ragged[0], ref_rows[0][0])
    close(ragged[1, :6], ref_rows[1][0])
    dense_rows = stream_nll(runner, idx, None, chunk_size=3, lengths=torch.tensor([13, 7]))
    close(dense_rows[1, :6], -single[1][0, :-1].gather(-1, idx[1, 1:7, None])[..., 0])
    disable_streaming(model)
    torch.testing.assert_close(torch.log_softmax(model(idx).logits, -1), own)


# ---------------------------------------------------------------------------- what is refused, and when
REFUSED = [
    ("gemma2", {}, "attention logit soft-capping .config.attn_logit_softcapping=50.0. is not implemented"),
    ("mpt", {}, "MptForCausalLM computes attention inline .it does not dispatch through transformers' Attention"),
    ("xglm", {}, "XGLMForCausalLM computes attention inline"),
    ("llama4_text", {}, r"config.layer_types has \['chunked_attention'\] layers; streaming supports full_attention"),
    ("qwen3_next", {}, r"config.layer_types has \['linear_attention'\] layers"),
    ("gptj", {}, "RoPE set by config.rotary_dim without config.rope_parameters"   # 5.24; 5.17: inline
                 "|GPTJForCausalLM computes attention inline"),
    ("t5", {}, "an encoder-decoder .config.is_encoder_decoder=True."),
    ("gemma3", {}, "a multimodal config .config.vision_config."),
    ("gemma3_text", {"use_bidirectional_attention": True}, "config.use_bidirectional_attention=True"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_type='dynamic' is not supported for streaming; allowed: default, linear, llama3, yarn"),
]


@pytest.mark.parametrize("model_type,kw,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_configs_are_refused_in_one_line(model_type, kw, message):
    with pytest.raises(ValueError, match=message) as e:
        streaming_support(CONFIG_MAPPING[model_type](**kw))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "olmo2",
                                        "smollm3", "gpt_neox", "cohere", "glm", "gpt_oss", "falcon", "bloom",
                                        "gpt2", "opt", "gpt_bigcode"])
def test_supported_configs_are_found_from_the_config(model_type):
    from transformers.models.falcon.modeling_falcon import FalconAttention

    sup = streaming_support(CONFIG_MAPPING[model_type]())
    # Falcon computed attention inline (with its _split_heads) before transformers 5.25, then dispatches through
    # the interface; BLOOM computes it inline
    inline = {"bloom"} | ({"falcon"} if hasattr(FalconAttention, "_split_heads") else set())
    assert sup.route == ("module" if model_type in inline else "interface")
    assert sup.positions == {"gpt2": "learned", "opt": "learned", "gpt_bigcode": "learned", "bloom": "alibi"}.get(
        model_type, "rope")


def tiny_folder(tmp_path, family):
    from test_hf import make_tokenizer

    folder = tmp_path / family
    tiny(family).float().save_pretrained(folder)
    make_tokenizer(add_bos=False).save_pretrained(folder)
    return folder


def test_refused_before_the_weights_load(tmp_path, monkeypatch):
    from lit_gpt.streaming_io import load_lm

    folder = tiny_folder(tmp_path, "gemma2")

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match="soft-capping.*; --methods dense, recompute run on any causal LM"):
        load_lm(str(folder), methods=["dense", "sink"])
    with pytest.raises(ValueError, match="soft-capping"):
        hs.AutoModelForCausalLM.from_pretrained(str(folder), attention_sink_size=4, attention_sink_window_size=12)
    gpt2 = tiny_folder(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="policy='reindex' is invalid for gpt2"):
        load_lm(str(gpt2), methods=["sink"])


@torch.no_grad()
def test_dense_runs_on_a_model_that_cannot_stream():
    model = tiny("gemma2")
    idx = torch.randint(0, V, (2, 11))
    own = torch.log_softmax(model(idx).logits, -1)
    runner = HFRunner(model)
    assert "soft-capping" in runner.refusal
    close(stream_nll(runner, idx, None, chunk_size=4), -own[:, :-1].gather(-1, idx[:, 1:, None])[..., 0])
    ragged = stream_nll(runner, idx, None, chunk_size=3, lengths=torch.tensor([11, 6]))
    alone = torch.log_softmax(model(idx[1:, :6]).logits, -1)
    close(ragged[1, :5], -alone[0, :-1].gather(-1, idx[1, 1:6, None])[..., 0])
    close(runner.fresh(idx), model(idx).logits)
    assert stream_generate(runner, [idx[0, :5].tolist()], None, 6)[0] == \
        model.generate(idx[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    with pytest.raises(ValueError, match="soft-capping.*only dense attention runs on it"):
        runner.start(1, StreamingSpec(2, 4))


# ---------------------------------------------------------------------------- the transformers Cache API
def _no_deprecations():
    """Every FutureWarning / DeprecationWarning an error (the suite ignores them otherwise)."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", FutureWarning)
    warnings.simplefilter("error", DeprecationWarning)
    return ctx


@torch.no_grad()
def test_cache_keyword_follows_the_installed_transformers():
    model = tiny("llama")
    params = inspect.signature(type(model).forward).parameters
    assert cache_kwarg(model) == ("cache" if "cache" in params else "past_key_values")
    if cache_kwarg(model) == "cache":                  # the old keyword really is deprecated on this version
        with pytest.warns(FutureWarning, match="past_key_values"):
            model(input_ids=torch.zeros(1, 2, dtype=torch.long), past_key_values=None)
    else:                                              # an older transformers: the old keyword is the keyword
        assert "past_key_values" in params
    enable_streaming(model)
    cache = SinkCache(model, StreamingSpec(2, 4))
    assert isinstance(cache, transformers.Cache)
    idx = torch.randint(0, V, (1, 11))
    ctx = _no_deprecations()
    try:
        out = [model(input_ids=idx[:, :5], use_cache=True, **{cache_kwarg(model): cache}).logits]
        for t in range(5, 11):    # no positions given: HF's default position_ids from get_seq_length()
            out.append(model(input_ids=idx[:, t:t + 1], use_cache=True, **{cache_kwarg(model): cache}).logits)
        runner = HFRunner(model)
        nll = stream_nll(runner, idx, StreamingSpec(2, 4), chunk_size=3)
        gen = model.generate(idx[:, :6], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                             **{cache_kwarg(model): SinkCache(model, StreamingSpec(2, 4))})
        ours = stream_generate(runner, [idx[0, :6].tolist()], StreamingSpec(2, 4), 12)[0]
    finally:
        ctx.__exit__(None, None, None)
    assert cache.get_seq_length() == 11
    want = ref_hf_llama_logits(model, idx, streamingllm_plan(2, 4))
    close(torch.cat(out, 1), want)
    close(nll[0], -torch.log_softmax(want[0, :-1], -1).gather(-1, idx[0, 1:, None])[:, 0])
    assert gen[0, 6:].tolist() == ours
    with pytest.raises(RuntimeError, match="needs a SinkCache"):
        model(input_ids=idx[:, :3])
    disable_streaming(model)


# ---------------------------------------------------------------------------- drop-in loading
@torch.no_grad()
def test_drop_in_streams_generate_and_forward_by_default(tmp_path):
    folder = tiny_folder(tmp_path, "gemma3")
    ctx = _no_deprecations()
    try:
        model = hs.AutoModelForCausalLM.from_pretrained(str(folder), attention_sink_size=2,
                                                        attention_sink_window_size=6, dtype=torch.float64)
        idx = torch.randint(0, V, (1, 5))
        out = model.generate(idx, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        first = model(idx[:, :3])                              # a forward without a cache starts one
        nxt = model(idx[:, 3:], **{cache_kwarg(model): cache_of(first)})
    finally:
        ctx.__exit__(None, None, None)
    runner = HFRunner(model)
    assert out[0, 5:].tolist() == stream_generate(runner, [idx[0].tolist()], StreamingSpec(2, 6), 20)[0]
    close(torch.cat([first.logits, nxt.logits], 1), stream_logits(runner, idx, StreamingSpec(2, 6), 1))
    with pytest.raises(ValueError, match="DynamicCache holds 3 tokens; this model streams through a SinkCache"):
        c = transformers.DynamicCache(config=model.config)
        c.update(torch.zeros(1, 2, 3, 8, dtype=torch.float64), torch.zeros(1, 2, 3, 8, dtype=torch.float64), 0)
        model(idx, **{cache_kwarg(model): c})
    hs.stream_by_default(model, StreamingSpec(2, 3))                 # again: the new spec replaces the old
    assert model.generate(idx, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 5:].tolist() \
        == stream_generate(runner, [idx[0].tolist()], StreamingSpec(2, 3), 8)[0]
    disable_streaming(model)
    assert "forward" not in model.__dict__ and model.config._attn_implementation != hs.ATTN_NAME


def docs_snippet() -> str:
    text = (ROOT / "docs" / "streaming.md").read_text()
    m = re.search(r"<!-- drop-in snippet -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/streaming.md lost its drop-in snippet"
    return m.group(1)


@torch.no_grad()
def test_the_drop_in_snippet_in_the_docs_runs(tmp_path):
    """The snippet as written, on a tiny local model: only the model id and the sizes are swapped."""
    folder = tiny_folder(tmp_path, "llama")
    code = docs_snippet()
    swaps = {r'model_id = "[^"]+"': f'model_id = "{folder}"', r"attention_sink_window_size=\d+":
             "attention_sink_window_size=8", r"max_new_tokens=\d+": "max_new_tokens=30"}
    for pat, new in swaps.items():
        code, n = re.subn(pat, new, code)
        assert n == 1, pat
    ns: dict = {}
    ctx = _no_deprecations()
    try:
        exec(compile(code, "docs/streaming.md", "exec"), ns)
    finally:
        ctx.__exit__(None, None, None)
    model, ids, out = ns["model"], ns["ids"], ns["out"]
    assert out.shape[1] == ids.shape[1] + 30
    ours = stream_generate(HFRunner(model), [ids[0].tolist()], StreamingSpec(4, 8), 30)[0]
    assert out[0, ids.shape[1]:].tolist() == ours


def test_eval_long_ppl_runs_dense_on_any_model_and_refuses_streaming_in_one_line(tmp_path, capsys):
    import json

    import eval_long_ppl

    folder = tiny_folder(tmp_path, "gemma2")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 30}" for i in range(60)))
    args = ["--model", str(folder), "--text", "file", "--text-file", str(text), "--tokens", "40", "--cache-size", "8",
            "--chunk", "16", "--threads", "1"]
    eval_long_ppl.main(args + ["--methods", "dense,recompute", "--out", str(tmp_path / "dense")])
    res = json.loads((tmp_path / "dense" / "results.json").read_text())["results"]
    assert [r["method"] for r in res] == ["dense", "recompute"] and all(r["nll"] > 0 for r in res)
    with pytest.raises(SystemExit, match=r"^error: model_type='gemma2' is not supported by hf_streaming: attention "
                                         r"logit soft-capping.*; --methods dense, recompute run on any causal LM$"):
        eval_long_ppl.main(args + ["--methods", "dense,sink", "--out", str(tmp_path / "sink")])
    assert not (tmp_path / "sink").exists()
