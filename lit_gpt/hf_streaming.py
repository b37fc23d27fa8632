"""Streaming with attention sinks / LM-Infinite for Hugging Face causal LMs (transformers 5.x), on the same
cache and attention as our GPT (:class:`lit_gpt.streaming.SinkWindowKV`); no modeling file is edited.

Which models stream (:func:`streaming_support`, from the config alone, so a refusal comes before the weights
load, in one line naming what is missing):

* decoder-only causal LMs whose modeling code dispatches attention through transformers' ``AttentionInterface``
  (transformers' own test, ``_can_set_attn_implementation``): Llama, Mistral, Qwen2/3, Gemma 1/3, Phi/Phi-3,
  OLMo/OLMo-2, SmolLM3, GPT-NeoX, StableLM, Cohere, GLM, Granite, GPT-2, OPT, gpt-oss, ... The attention function
  ``"sink_stream"`` is registered and selected via ``config._attn_implementation``; the model projects, normalises
  (Gemma-3 / Qwen3 / OLMo-2 q/k norms) and rotates q/k at the positions we pass, calls ``update`` on our
  :class:`SinkCache` (a ``transformers.Cache`` whose update only announces the layer) and then our function, which
  does the streaming attention. Per-layer facts come from what the model passes: its ``sliding_window`` (Gemma-3's
  local layers, Mistral, gpt-oss), applied to the distances of the position policy
  (:meth:`StreamingSpec.key_distance`), and gpt-oss's learned sink logits (``s_aux``), an extra softmax column;
* Falcon (before transformers 5.25) and BLOOM, which compute attention inline: the attention
  module's ``forward`` is replaced on the instance by one that reuses the module's own projections and head split,
  then the same streaming attention with ALiBi as a bias on (query, key) positions (BLOOM: -slope * distance;
  Falcon: the same divided by sqrt(head_dim), slopes rounded to bf16 as Falcon does). Whether a family computes
  attention inline is read from the installed modeling file (:func:`dispatches_through_interface`): from
  transformers 5.25 Falcon dispatches through the interface and takes the first route, its ALiBi as the same bias.

Positions: RoPE (``config.rope_parameters``, static rope types only), ALiBi (Falcon / BLOOM) or a learned table
(no RoPE, ``max_position_embeddings``: only the ``original`` policy, never past the table). Refused: encoder-
decoders, multimodal configs, inline attention outside Falcon/BLOOM (MPT, XGLM, ...), bidirectional attention,
attention logit soft-capping (Gemma-2), layer types other than full / sliding attention (Llama-4's chunked,
linear-attention hybrids), rope types whose frequencies depend on the length, table-based rotary (GPT-J).

RoPE per layer is measured once after loading (:func:`layer_position_ops`): one-token sequences of the same
token at positions 0, 1, 2, ... give every layer the same hidden state at every position (a token attending to
itself sees q.k independent of the rotation), so a layer's key at position p is its key at 0 rotated by p.
Each layer is matched against the model's own ``inv_freq`` buffers in both RoPE layouts (rotate-half,
interleaved) or no rotation: Gemma-3's local / global bases, SmolLM3's NoPE layers, Cohere's interleaved pairs,
partial rotary and YaRN's scaled cos/sin come out without a list of families. Re-indexing / the distance ceiling
then re-rotate by position offsets with those frequencies.

The cache keyword follows the installed transformers (:func:`cache_kwarg`): ``cache`` where ``forward`` takes it
(``past_key_values`` is deprecated there and removed in 6.0), ``past_key_values`` before.

Use :class:`HFRunner` (the interface of ``generate.GPTRunner``; on a model that cannot stream it still runs
dense attention through the model's own cache), the drop-in loader (the ``attention_sinks`` package's API)::

    from lit_gpt.hf_streaming import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(name, attention_sink_size=4, attention_sink_window_size=1020)
    out = model.generate(ids, max_new_tokens=5000)          # a fresh SinkCache unless one is passed

or, by hand::

    cache = SinkCache(model, StreamingSpec(4, 252))      # enables streaming on the model
    cache.set_positions(pos)                             # optional: (B, T) positions, -1 = padding
    out = model(input_ids=ids, position_ids=pos.clamp(min=0), **{cache_kwarg(model): cache})
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from lit_gpt.positional import alibi_bias
from lit_gpt.streaming import PositionOps, SinkWindowKV, StreamingSpec, dense_spec

ATTN_NAME = "sink_stream"
MODULE_TYPES = ("falcon", "bloom")                  # inline attention, streamed through instance forwards
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LAYER_TYPES = ("full_attention", "sliding_attention")
ROTARY_FIELDS = ("rotary_dim", "rotary_pct", "rotary_emb_base", "rope_theta", "rope_scaling")
PROBE_POSITIONS = (0, 1, 2, 3, 5, 8, 13, 40, 100, 333, 1000)

_ACTIVE: List[Any] = [None, -1]          # (cache, layer) announced by SinkCache.update, read by the attention fn


def _cache_base():
    from transformers.cache_utils import Cache, CacheLayerMixin
    return Cache, CacheLayerMixin


# ---------------------------------------------------------------------------- what can stream (config only)
@dataclass(frozen=True)
class StreamingSupport:
    """What :func:`streaming_support` read from a config."""

    model_type: str
    route: str                       # "interface" (AttentionInterface) or "module" (Falcon / BLOOM forwards)
    positions: str                   # "rope" (per layer: RoPE or none, see layer_position_ops), "alibi", "learned"
    max_positions: Optional[int]     # max_position_embeddings (a learned table's size)


def _refusal(model_type: Any, what: str) -> ValueError:
    return ValueError(f"model_type={model_type!r} is not supported by hf_streaming: {what}")


def _causal_lm_class(config):
    from transformers import AutoModelForCausalLM as _Auto

    try:
        return _Auto._model_mapping[type(config)]
    except KeyError:
        extra = " (remote code is not inspected)" if getattr(config, "auto_map", None) else ""
        raise _refusal(getattr(config, "model_type", None),
                       f"AutoModelForCausalLM has no class for {type(config).__name__}{extra}") from None


@functools.lru_cache(maxsize=None)
def dispatches_through_interface(cls) -> bool:
    """Whether the installed modeling file of ``cls`` looks its attention function up in transformers'
    ``AttentionInterface`` (Falcon does from transformers 5.25 on; before, it computed attention inline)."""
    try:
        src = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return False
    return "ALL_ATTENTION_FUNCTIONS.get_interface(" in src or "ALL_ATTENTION_FUNCTIONS[" in src


def _rope_types(rope_parameters: Dict[str, Any]) -> List[str]:
    """Rope types of a rope_parameters dict: one set, or one per layer type (Gemma-3: sliding / full)."""
    per_type = all(isinstance(v, dict) or v is None for v in rope_parameters.values())
    groups = [v for v in rope_parameters.values() if v] if per_type else [rope_parameters]
    return sorted({g.get("rope_type", "default") for g in groups})


def streaming_support(config) -> StreamingSupport:
    """Whether (and how) a model of this config streams; a one-line ValueError naming what is missing if not.
    Reads the config only (``AutoConfig``), so it runs before any weight is loaded."""
    from lit_gpt.hf import text_config

    top = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise _refusal(top, "an encoder-decoder (config.is_encoder_decoder=True); streaming needs a decoder-only "
                            "causal LM")
    if getattr(config, "vision_config", None) is not None:
        raise _refusal(top, "a multimodal config (config.vision_config); stream its text-only *ForCausalLM model")
    cls = _causal_lm_class(config)
    cfg = text_config(config)
    t = getattr(cfg, "model_type", top)
    if t in MODULE_TYPES and not dispatches_through_interface(cls):
        route = "module"
    elif cls._can_set_attn_implementation():
        route = "interface"
    else:
        raise _refusal(t, f"{cls.__name__} computes attention inline (it does not dispatch through transformers' "
                          f"AttentionInterface; inline families streamed here: {', '.join(MODULE_TYPES)})")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise _refusal(t, "config.use_bidirectional_attention=True (bidirectional attention cannot be streamed)")
    cap = getattr(cfg, "attn_logit_softcapping", None)
    if cap:
        raise _refusal(t, f"attention logit soft-capping (config.attn_logit_softcapping={cap}) is not implemented "
                          "by the streaming attention")
    bad = sorted(set(getattr(cfg, "layer_types", None) or []) - set(LAYER_TYPES))
    if bad:
        raise _refusal(t, f"config.layer_types has {bad} layers; streaming supports {', '.join(LAYER_TYPES)}")
    rp = getattr(cfg, "rope_parameters", None)
    if t == "bloom" or (t == "falcon" and getattr(cfg, "alibi", False)):
        positions = "alibi"
    elif rp:
        dyn = [r for r in _rope_types(rp) if r not in STATIC_ROPE_TYPES]
        if dyn:
            raise ValueError(f"rope_type={dyn[0]!r} is not supported for streaming; allowed: "
                             f"{', '.join(STATIC_ROPE_TYPES)} (its frequencies must not depend on the sequence length)")
        positions = "rope"
    else:
        hint = next((f for f in ROTARY_FIELDS if getattr(cfg, f, None) is not None), None)
        if hint is not None:
            raise _refusal(t, f"RoPE set by config.{hint} without config.rope_parameters (GPT-J-style fixed sin/cos "
                              "table, or a pre-5.x config) is not supported")
        if not getattr(cfg, "max_position_embeddings", None):
            raise _refusal(t, "its positions are none of RoPE (config.rope_parameters), ALiBi or a learned table "
                              "(config.max_position_embeddings)")
        positions = "learned"
    return StreamingSupport(t, route, positions, getattr(cfg, "max_position_embeddings", None))


def check_spec(support: StreamingSupport, spec: StreamingSpec) -> None:
    """One-line errors for position policies a model's positions cannot follow (learned tables: original only)."""
    if support.positions == "learned" and spec.policy != "original" and (spec.start_size or spec.policy != "reindex"):
        raise ValueError(f"StreamingSpec.policy={spec.policy!r} is invalid for {support.model_type} (learned absolute "
                         "positions); allowed: 'original', or a window without sinks (positions are added to the "
                         "token embedding, so cached keys can be neither re-indexed nor given a distance ceiling)")


# ---------------------------------------------------------------------------- positions per layer (after load)
def attention_modules(model) -> list:
    """The attention module of every decoder layer, in layer order."""
    from lit_gpt.hf import decoder_layers

    out = []
    for layer in decoder_layers(model):
        mod = next((getattr(layer, n) for n in ("self_attn", "attention", "self_attention", "attn")
                    if hasattr(layer, n)), None)
        if mod is None:
            raise ValueError(f"{type(layer).__name__} has no self_attn / attention / self_attention / attn module")
        out.append(mod)
    return out


def _module_position_ops(model, support: StreamingSupport) -> PositionOps:
    """Falcon / BLOOM (either route): ALiBi with the model's own slopes, or RoPE with its rotary embedding's
    inv_freq."""
    cfg = model.config
    if support.positions == "alibi":
        n_head = cfg.num_attention_heads if support.model_type == "falcon" else cfg.n_head
        if support.model_type == "bloom":
            from transformers.models.bloom.modeling_bloom import build_alibi_tensor
            factor = 1.0
        else:
            from transformers.models.falcon.modeling_falcon import build_alibi_tensor
            factor = 1.0 / math.sqrt(cfg.hidden_size // n_head)
        # slope_h = alibi at key position 1 (the model's own formula, including Falcon's bf16 rounding)
        slopes = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_head, torch.float32)[:, 0, 1].double()
        slopes = slopes * factor
        return PositionOps("bias", bias_fn=lambda qp, kp: alibi_bias(qp, kp, slopes))
    rotary = [m for name, m in model.named_modules() if name.endswith("rotary_emb") and hasattr(m, "inv_freq")]
    return PositionOps("rope", inv_freq=rotary[0].inv_freq.detach().double()) if rotary else PositionOps("none")


def _inv_freq_buffers(model) -> Dict[str, torch.Tensor]:
    """The model's RoPE frequency buffers (``inv_freq``, Gemma-3's ``{layer_type}_inv_freq``), duplicates dropped."""
    out: Dict[str, torch.Tensor] = {}
    for name, buf in model.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.endswith("inv_freq") and "original" not in leaf:
            f = buf.detach().double()
            if not any(f.shape == g.shape and torch.equal(f, g) for g in out.values()):
                out[name] = f
    return out


@torch.no_grad()
def _probe_rope(model, n_layers: int, max_positions: Optional[int]) -> List[PositionOps]:
    """Per layer: RoPE with one of the model's inv_freq buffers (either layout) or none, measured on one token
    repeated at :data:`PROBE_POSITIONS` (see the module docstring)."""
    from lit_gpt.hf import hf_forward, text_config

    cands = _inv_freq_buffers(model)
    pos = [p for p in PROBE_POSITIONS if max_positions is None or p < max_positions]
    device = next(model.parameters()).device
    P = torch.tensor(pos, device=device).unsqueeze(0)
    vocab = int(text_config(model).vocab_size)
    toks = torch.tensor([vocab // 2, vocab // 3 + 1], device=device)
    idx = toks.repeat_interleave(len(pos)).unsqueeze(1)           # (2 * len(pos), 1): one-token sequences
    prev = model.config._attn_implementation
    try:
        _, an = hf_forward(model, idx, need=("k",), position_ids=P.repeat(1, 2).view(-1, 1))
    finally:
        if model.config._attn_implementation != prev:
            model.set_attn_implementation(prev)
    if len(an.k) != n_layers:
        raise ValueError(f"{type(model).__name__}: {len(an.k)} attention calls for {n_layers} decoder layers")
    ops: List[PositionOps] = []
    for i, k in enumerate(an.k):
        tol = 1e-3 if k.dtype in (torch.float32, torch.float64) else 5e-2
        k = k.double().view(2, len(pos), k.shape[1], k.shape[-1]).transpose(1, 2)        # (2, G, T, d)
        k0 = k[:, :, :1].expand_as(k)
        size = k.abs().max().clamp(min=1e-30)
        best, err = PositionOps("none"), float((k - k0).abs().max() / size)
        for f in cands.values():
            for layout in ("half", "interleaved"):
                op = PositionOps("rope", inv_freq=f.to(k.device), layout=layout)
                e = float((op.rotate(k0, P.to(k.device)) - k).abs().max() / size)
                if e < err:
                    best, err = op, e
        if err > tol:
            raise ValueError(f"{type(model).__name__} layer {i}: its keys are neither unrotated nor RoPE (rotate-half "
                             f"or interleaved) with one of its inv_freq buffers {sorted(cands)} (relative error "
                             f"{err:.1e}); streaming cannot re-rotate them")
        ops.append(best)
    return ops


def layer_position_ops(model, support: Optional[StreamingSupport] = None) -> List[PositionOps]:
    """How each layer encodes positions, as :class:`PositionOps` (one per decoder layer)."""
    support = support or streaming_support(model.config)
    n = len(attention_modules(model))
    if support.route == "module" or support.positions == "alibi":
        return [_module_position_ops(model, support)] * n
    if support.positions == "learned":
        if _inv_freq_buffers(model):
            raise _refusal(support.model_type, "the config has no rope_parameters but the model holds inv_freq "
                                               "buffers (cannot tell its positions)")
        return [PositionOps("absolute")] * n
    return _probe_rope(model, n, support.max_positions)


# ---------------------------------------------------------------------------- the transformers Cache
def cache_kwarg(model) -> str:
    """The keyword under which this transformers version's ``forward`` / ``generate`` take a Cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_of(output) -> Any:
    """The cache a forward returned (``output.cache`` on current transformers, ``past_key_values`` before)."""
    c = getattr(output, "cache", None)
    return c if c is not None else getattr(output, "past_key_values", None)


def _make_layer_class():
    _, CacheLayerMixin = _cache_base()

    class SinkLayer(CacheLayerMixin):
        """One layer of :class:`SinkCache`: holds a :class:`SinkWindowKV`; ``update`` stores nothing (the
        attention function writes the cache once it knows the query)."""

        is_sliding = False
        is_compileable = False

        def __init__(self, spec: StreamingSpec, layer_idx: int, owner) -> None:
            super().__init__()
            self.kv = SinkWindowKV(spec, layer_idx)
            self.owner = owner

        def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            self.is_initialized = True
            return key_states, value_states

        def get_mask_sizes(self, *args, **kwargs) -> Tuple[int, int]:
            q = args[0] if args else kwargs.get("query_length", kwargs.get("cache_position"))
            n = q if isinstance(q, int) else int(q.shape[-1])
            return n, 0

        def get_seq_length(self, *args, **kwargs) -> int:
            return self.owner.get_seq_length()

        def get_max_length(self) -> int:
            return -1

        def get_max_cache_shape(self) -> int:
            return -1

        def reset(self) -> None:
            self.kv.reset()

    return SinkLayer


def _make_cache_class():
    Cache, _ = _cache_base()
    SinkLayer = _make_layer_class()

    class SinkCache(Cache):
        """``transformers.Cache`` for sink + window (or LM-Infinite) streaming; one :class:`SinkWindowKV` per layer.

        Positions: :meth:`set_positions` before a forward ((B, T) ints, -1 = padding); otherwise each row
        continues after the tokens it has seen (``get_seq_length``, so HF's default position_ids agree).
        """

        def __init__(self, model, spec: StreamingSpec) -> None:
            enable_streaming(model)
            self.support: StreamingSupport = model._sink_stream_support
            check_spec(self.support, spec)
            self.spec, self.ops = spec, model._sink_stream_ops
            super().__init__(layers=[SinkLayer(spec, i, self) for i in range(len(self.ops))])
            self.seen: Optional[torch.Tensor] = None
            self.pending_pos: Optional[torch.Tensor] = None
            self.current_pos: Optional[torch.Tensor] = None

        def set_positions(self, pos: torch.Tensor) -> None:
            self.check_positions(int(pos.max()))
            self.pending_pos = pos

        def check_positions(self, top: int) -> None:
            """A learned position table ends at max_position_embeddings: a clear error instead of an IndexError."""
            if self.support.positions == "learned" and top >= self.support.max_positions:
                raise ValueError(f"position {top} is past {self.support.model_type}'s learned position table "
                                 f"(max_position_embeddings={self.support.max_positions}); learned absolute "
                                 "positions cannot stream past it")

        def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
            _ACTIVE[0], _ACTIVE[1] = self, layer_idx
            return self.layers[layer_idx].update(key_states, value_states)

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0 if self.seen is None else int(self.seen.max())

        def get_mask_sizes(self, *args, **kwargs) -> Tuple[int, int]:
            return self.layers[0].get_mask_sizes(*args, **kwargs)

        def get_query_offset(self, layer_idx: int = 0) -> int:
            return self.get_seq_length()

        def reset(self) -> None:
            for layer in self.layers:
                layer.reset()
            self.seen = self.pending_pos = self.current_pos = None

        def nbytes(self) -> int:
            return sum(layer.kv.nbytes() for layer in self.layers)

        def _positions(self, layer_idx: int, B: int, T: int, device) -> torch.Tensor:
            if layer_idx == 0 or self.current_pos is None or self.current_pos.shape != (B, T):
                if self.seen is None or self.seen.shape[0] != B:
                    self.seen = torch.zeros(B, dtype=torch.long, device=device)
                if self.pending_pos is not None:
                    p = self.pending_pos.to(device).long().expand(B, T)
                    self.pending_pos = None
                else:
                    p = self.seen.to(device).unsqueeze(1) + torch.arange(T, device=device)
                self.current_pos = p
                top = torch.where(p >= 0, p + 1, torch.zeros_like(p)).max(dim=1).values
                self.seen = torch.maximum(self.seen.to(device), top)
            return self.current_pos

        def layer_attend(self, layer_idx: int, q, k, v, scale: float, window: Optional[int] = None,
                         sink_logit: Optional[torch.Tensor] = None, need_weights: bool = False):
            """Streaming attention of one layer: q (B, H, T, d), k/v (B, G, T, d) rotated at this call's
            positions -> (B, H, T, d). ``window``: the layer's own sliding window (keys, the query included);
            ``sink_logit`` (H,): learned per-head logits of an extra softmax column with a zero value (gpt-oss)."""
            B, _, T, _ = q.shape
            pos = self._positions(layer_idx, B, T, q.device)
            return self.layers[layer_idx].kv.attend(q, k, v, pos, self.ops[layer_idx], scale=scale,
                                                    mask_fn=self.spec.window_mask(window) if window else None,
                                                    slot_logit=sink_logit, need_weights=need_weights)

    return SinkCache


_CLASSES: Dict[str, Any] = {}


def _sink_cache_class():
    if "cache" not in _CLASSES:
        _CLASSES["cache"] = _make_cache_class()
    return _CLASSES["cache"]


def SinkCache(model, spec: StreamingSpec):  # noqa: N802 - a class factory (transformers is imported lazily)
    """A ``transformers.Cache`` subclass instance for ``model`` (see the module docstring)."""
    return _sink_cache_class()(model, spec)


# ---------------------------------------------------------------------------- attention entry points
def sink_stream_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: (B, H, T, d) in, (B, T, H, d) out, as every HF attention function."""
    cache, layer = _ACTIVE
    if cache is None or layer != getattr(module, "layer_idx", layer):
        raise RuntimeError(f"attn_implementation={ATTN_NAME!r} needs a SinkCache(model, spec) in the call (keyword "
                           "'cache' or 'past_key_values', or use HFRunner); disable_streaming(model) restores "
                           "ordinary attention")
    _ACTIVE[0], _ACTIVE[1] = None, -1
    if kwargs.get("softcap"):
        raise ValueError(f"attention logit soft-capping (softcap={kwargs['softcap']}) is not implemented by the "
                         "streaming attention")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    y, w = cache.layer_attend(layer, query, key, value, scale, window=kwargs.get("sliding_window"),
                              sink_logit=kwargs.get("s_aux"))
    return y.transpose(1, 2).contiguous(), w


def _require_cache(layer_past):
    if layer_past is None or not hasattr(layer_past, "layer_attend"):
        raise RuntimeError("streaming is enabled on this model: pass a SinkCache(model, spec) "
                           "(or call disable_streaming(model))")
    return layer_past


def _falcon_forward(self, hidden_states, alibi=None, attention_mask=None, position_ids=None, layer_past=None,
                    use_cache=False, output_attentions=False, position_embeddings=None, **kwargs):
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    cache = _require_cache(layer_past)
    q, k, v = self._split_heads(self.query_key_value(hidden_states))
    B, T = q.shape[:2]
    n_kv = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    q = q.transpose(1, 2).reshape(B, self.num_heads, T, self.head_dim)
    k = k.transpose(1, 2).reshape(B, n_kv, T, self.head_dim)
    v = v.transpose(1, 2).reshape(B, n_kv, T, self.head_dim)
    if not self.config.alibi:
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    y, _ = cache.layer_attend(self.layer_idx, q, k, v, self.inv_norm_factor)
    return self.dense(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)), None


def _bloom_forward(self, hidden_states, residual, alibi=None, attention_mask=None, layer_past=None, use_cache=False,
                   output_attentions=False, **kwargs):
    from transformers.models.bloom.modeling_bloom import dropout_add

    cache = _require_cache(layer_past)
    if self.pretraining_tp > 1 and self.slow_but_exact:
        raise ValueError("BLOOM with pretraining_tp > 1 and slow_but_exact=True is not supported for streaming")
    q, k, v = self._reshape(self.query_key_value(hidden_states))
    B, _, T, _ = q.shape
    y, _ = cache.layer_attend(self.layer_idx, q, k, v, self.inv_norm_factor)
    out = self.dense(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
    return dropout_add(out, residual, self.hidden_dropout, self.training), None


def enable_streaming(model) -> StreamingSupport:
    """Route the model's attention through the streaming cache (idempotent; see :func:`disable_streaming`).
    Raises the one-line refusal of :func:`streaming_support` (or of the RoPE probe) for a model that cannot."""
    from transformers import AttentionInterface

    if getattr(model, "_sink_stream_prev", None) is not None:
        return model._sink_stream_support
    support = streaming_support(model.config)
    ops = layer_position_ops(model, support)
    AttentionInterface.register(ATTN_NAME, sink_stream_attention)
    _register_mask()
    model._sink_stream_support, model._sink_stream_ops = support, ops
    model._sink_stream_prev = model.config._attn_implementation
    model.config._attn_implementation = ATTN_NAME           # also: no HF mask is materialised
    if support.route == "module":
        fwd = _falcon_forward if support.model_type == "falcon" else _bloom_forward
        for i, attn in enumerate(attention_modules(model)):
            if getattr(attn, "layer_idx", None) is None:
                attn.layer_idx = i
            attn.forward = fwd.__get__(attn)
    return support


def _falcon_alibi(model) -> bool:
    return model._sink_stream_support.model_type == "falcon" and model._sink_stream_support.positions == "alibi"


def _alibi_call_mask(ids: torch.Tensor) -> torch.Tensor:
    """The attention_mask a streamed ALiBi Falcon gets: this call's tokens only. Falcon builds its ALiBi table over
    the mask's length (over the whole stream otherwise); the streaming attention adds ALiBi itself and ignores it."""
    return torch.ones(ids.shape[0], ids.shape[-1], dtype=torch.long, device=ids.device)


def _register_mask() -> None:
    """A causal mask function under our attention's name. The streaming attention ignores HF masks, but Falcon's
    ALiBi (transformers >= 5.25) adds its bias onto the mask and needs one; it covers this call's tokens only
    (:meth:`SinkLayer.get_mask_sizes`), so it stays small."""
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:          # an older transformers: no mask registry, and no Falcon that needs it
        return
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def disable_streaming(model) -> None:
    """Undo :func:`enable_streaming` and :func:`stream_by_default`: the model's own attention again."""
    prev = getattr(model, "_sink_stream_prev", None)
    if prev is None:
        return
    model.config._attn_implementation = prev
    if model._sink_stream_support.route == "module":
        for attn in attention_modules(model):
            attn.__dict__.pop("forward", None)
    _drop_default_wrappers(model)
    model._sink_stream_prev = None


def _drop_default_wrappers(model) -> None:
    for name in ("forward", "generate"):
        if getattr(model.__dict__.get(name), "_sink_stream_default", False):
            del model.__dict__[name]


# ---------------------------------------------------------------------------- drop-in loading
def stream_by_default(model, spec: StreamingSpec):
    """Make ``model.generate`` and ``model(...)`` stream through a fresh :class:`SinkCache` of ``spec`` unless the
    call brings its own cache (an empty cache of another kind, e.g. the DynamicCache generate makes, is replaced).
    A forward's output carries the cache (``cache_of(out)``) for the next call. Returns the model."""
    _drop_default_wrappers(model)                     # called again: the new spec replaces the old one
    enable_streaming(model)
    check_spec(model._sink_stream_support, spec)
    key = cache_kwarg(model)
    sink_cls = _sink_cache_class()

    def with_cache(kwargs: Dict[str, Any]) -> Dict[str, Any]:
        name = key if key in kwargs else ("past_key_values" if "past_key_values" in kwargs else key)
        c = kwargs.get(name)
        if isinstance(c, sink_cls):
            return kwargs
        if c is not None and c.get_seq_length() > 0:
            raise ValueError(f"{name}={type(c).__name__} holds {c.get_seq_length()} tokens; this model streams "
                             "through a SinkCache (pass the cache of its previous output, or none)")
        kwargs.pop(name, None)
        kwargs[key] = sink_cls(model, spec)
        return kwargs

    def forward_cache(args, kwargs) -> Dict[str, Any]:
        kwargs = with_cache(kwargs)
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None:
            c = kwargs.get(key, kwargs.get("past_key_values"))
            c.check_positions(c.get_seq_length() + ids.shape[-1] - 1)
            if _falcon_alibi(model):
                kwargs["attention_mask"] = _alibi_call_mask(ids)
        return kwargs

    for name, prepare in (("forward", forward_cache), ("generate", lambda args, kwargs: with_cache(kwargs))):
        orig = getattr(model, name)

        def wrapper(*args, _orig=orig, _prepare=prepare, **kwargs):
            return _orig(*args, **_prepare(args, kwargs))

        wrapper = functools.wraps(orig)(wrapper)
        wrapper._sink_stream_default = True
        setattr(model, name, wrapper)
    model.sink_spec = spec
    return model


def from_pretrained(name_or_path, *model_args, attention_sink_size: int = 4, attention_sink_window_size: int = 1020,
                    attention_sink_policy: str = "reindex", **kwargs):
    """``transformers.AutoModelForCausalLM.from_pretrained`` plus the ``attention_sinks`` package's keywords:
    ``attention_sink_size`` sinks + ``attention_sink_window_size`` recent tokens (the query included), positions
    re-indexed in the cache (``attention_sink_policy``: reindex | original | lminfinite, whose distance ceiling is
    the window). The config is checked before the weights load; the model then streams by default
    (:func:`stream_by_default`). Every other argument goes to transformers unchanged (``gguf_file=``, ``dtype=``,
    ``device_map=``, ...)."""
    from transformers import AutoConfig
    from transformers import AutoModelForCausalLM as _Auto

    spec = StreamingSpec(attention_sink_size, attention_sink_window_size, attention_sink_policy)
    config = kwargs.pop("config", None)
    if config is None:
        shared = ("gguf_file", "revision", "trust_remote_code", "local_files_only", "cache_dir", "token", "subfolder")
        config = AutoConfig.from_pretrained(name_or_path, **{k: kwargs[k] for k in shared if k in kwargs})
    check_spec(streaming_support(config), spec)
    model = _Auto.from_pretrained(name_or_path, *model_args, config=config, **kwargs)
    return stream_by_default(model, spec)


class AutoModelForCausalLM:
    """Drop-in for ``transformers.AutoModelForCausalLM`` with attention sinks (the ``attention_sinks`` package's
    API): ``AutoModelForCausalLM.from_pretrained(name, attention_sink_size=4, attention_sink_window_size=1020)``."""

    from_pretrained = staticmethod(from_pretrained)


# ---------------------------------------------------------------------------- runner
class HFRunner:
    """``generate.GPTRunner``'s interface for a Hugging Face causal LM (enables streaming on construction).

    A model that cannot stream (:func:`streaming_support` refuses it) still runs dense attention through its own
    attention and cache (any causal LM: ``--methods dense``, recompute); a streaming spec then raises the refusal.
    """

    def __init__(self, model) -> None:
        from lit_gpt.hf import text_config

        self.model = model
        try:
            enable_streaming(model)
            self.refusal: Optional[str] = None
        except ValueError as e:
            self.refusal = str(e)
        self.cache = None
        self._native: Optional[Dict[str, Any]] = None
        cfg = text_config(model)
        self.block_size = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "seq_length", None)
        self._kw = set(inspect.signature(model.forward).parameters)
        self._cache_kw = cache_kwarg(model)
        self._alibi_mask = self.refusal is None and _falcon_alibi(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def start(self, batch_size: int, spec: Optional[StreamingSpec]) -> None:
        self.cache, self._native = None, None
        if spec is None:
            return
        if self.refusal is None:
            self.cache = SinkCache(self.model, spec)
        elif spec.start_size == 0 and spec.policy == "original":
            self._native = {"cache": None, "mask": None, "limit": spec.recent_size}
        else:
            raise ValueError(f"{self.refusal}; only dense attention runs on it (--methods dense)")

    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.cache is None and self._native is None:
            raise RuntimeError("HFRunner.step needs start(batch, spec) first")
        B, T = ids.shape
        pos = pos.to(ids.device).long().expand(B, T)
        kw: Dict[str, Any] = dict(input_ids=ids, use_cache=True)
        if "position_ids" in self._kw:
            kw["position_ids"] = pos.clamp(min=0)
        if self._native is not None:
            return self._native_step(kw, pos)
        self.cache.set_positions(pos)
        kw[self._cache_kw] = self.cache
        if self._alibi_mask:
            kw["attention_mask"] = _alibi_call_mask(ids)
        return self.model(**kw).logits

    def _native_step(self, kw: Dict[str, Any], pos: torch.Tensor) -> torch.Tensor:
        """Dense attention with the model's own cache: padding (-1) columns masked by a growing attention_mask."""
        st = self._native
        if int(pos.max()) >= st["limit"]:
            raise ValueError(f"{self.refusal}; only dense attention runs on it (a window of {st['limit']} would "
                             "have to evict)")
        valid = (pos >= 0).long()
        st["mask"] = valid if st["mask"] is None else torch.cat([st["mask"], valid], dim=1)
        kw["attention_mask"] = st["mask"]
        if st["cache"] is not None:
            kw[self._cache_kw] = st["cache"]
        out = self.model(**kw)
        st["cache"] = cache_of(out)
        return out.logits

    def fresh(self, ids: torch.Tensor) -> torch.Tensor:
        """Dense causal forward from position 0 (a never-wrapping ring: the same maths as the model's own)."""
        if self.refusal is not None:
            return self.model(input_ids=ids, use_cache=False).logits
        prev = self.cache
        self.start(ids.shape[0], dense_spec(ids.shape[1]))
        try:
            return self.step(ids, torch.arange(ids.shape[1], device=ids.device).unsqueeze(0))
        finally:
            self.cache = prev

    def stop(self) -> None:
        self.cache, self._native = None, None

    def cache_bytes(self) -> int:
        if self._native is not None:
            layers = getattr(self._native["cache"], "layers", None) or []
            ts = [t for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
            return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))
        return 0 if self.cache is None else self.cache.nbytes()
