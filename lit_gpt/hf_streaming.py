"""Streaming with attention sinks / LM-Infinite for Hugging Face causal LMs (transformers 5.x), on the same
cache and attention as our GPT (:class:`lit_gpt.streaming.SinkWindowKV`); no modeling file is edited.

Two routes, chosen by ``config.model_type``:

* models that dispatch through the attention-interface registry (Llama, Mistral, Qwen2/3, GPT-NeoX): the
  attention function ``"sink_stream"`` is registered with ``transformers.AttentionInterface`` and selected via
  ``config._attn_implementation``. The model projects and rotates q/k at the positions we pass
  (``position_ids``), calls ``past_key_values.update`` on our :class:`SinkCache` (a ``transformers.Cache``
  whose update only announces the layer) and then our function, which does the streaming attention.
* Falcon and BLOOM compute attention inline (their ALiBi never reaches the registry): the attention module's
  ``forward`` is replaced on the instance by one that reuses the module's own projections and head split, then
  the same streaming attention with ALiBi as a bias on (query, key) positions (BLOOM: -slope * distance;
  Falcon: the same divided by sqrt(head_dim), slopes rounded to bf16 as Falcon does).

RoPE models (Llama, NeoX with partial rotary, Falcon): re-indexing / the distance ceiling re-rotate by position
offsets with the model's own ``inv_freq`` (rotate-half layout on the first 2*len(inv_freq) dims); rope types
whose frequencies change with the length (dynamic) are refused.

Use :class:`HFRunner` (the same interface as ``streaming.GPTRunner``) or, by hand::

    enable_streaming(model)
    cache = SinkCache(model, StreamingSpec(4, 252))
    cache.set_positions(pos)                      # optional: (B, T) positions, -1 = padding
    out = model(input_ids=ids, position_ids=pos.clamp(min=0), past_key_values=cache, use_cache=True)
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from lit_gpt.positional import alibi_bias
from lit_gpt.streaming import PositionOps, SinkWindowKV, StreamingSpec, dense_spec

ATTN_NAME = "sink_stream"
INTERFACE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox")
MODULE_TYPES = ("falcon", "bloom")
SUPPORTED_TYPES = INTERFACE_TYPES + MODULE_TYPES
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_ACTIVE: List[Any] = [None, -1]          # (cache, layer) announced by SinkCache.update, read by the attention fn


def _cache_base():
    from transformers.cache_utils import Cache, CacheLayerMixin
    return Cache, CacheLayerMixin


def model_type(model) -> str:
    t = getattr(model.config, "model_type", None)
    if t not in SUPPORTED_TYPES:
        raise ValueError(f"config.model_type={t!r} is not supported by hf_streaming; allowed: {', '.join(SUPPORTED_TYPES)}")
    return t


def attention_modules(model) -> list:
    """The attention module of every decoder layer, in layer order."""
    from lit_gpt.hf import decoder_layers

    model_type(model)
    out = []
    for layer in decoder_layers(model):
        mod = next((getattr(layer, n) for n in ("self_attn", "attention", "self_attention") if hasattr(layer, n)), None)
        if mod is None:
            raise ValueError(f"{type(layer).__name__} has no self_attn / attention / self_attention module")
        out.append(mod)
    return out


def hf_position_ops(model) -> PositionOps:
    """RoPE (inv_freq of the model's rotary embedding) or ALiBi (the model's own slopes) as PositionOps."""
    t = model_type(model)
    cfg = model.config
    if t == "bloom" or (t == "falcon" and getattr(cfg, "alibi", False)):
        n_head = cfg.num_attention_heads if t == "falcon" else cfg.n_head
        if t == "bloom":
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
    if not rotary:
        return PositionOps("none")
    rope_type = getattr(rotary[0], "rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not supported for streaming; allowed: {', '.join(STATIC_ROPE_TYPES)} "
                         "(its frequencies must not depend on the sequence length)")
    return PositionOps("rope", inv_freq=rotary[0].inv_freq.detach().double())


# ---------------------------------------------------------------------------- the transformers Cache
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
            n = len(attention_modules(model))
            self.spec, self.ops = spec, hf_position_ops(model)
            super().__init__(layers=[SinkLayer(spec, i, self) for i in range(n)])
            self.seen: Optional[torch.Tensor] = None
            self.pending_pos: Optional[torch.Tensor] = None
            self.current_pos: Optional[torch.Tensor] = None

        def set_positions(self, pos: torch.Tensor) -> None:
            self.pending_pos = pos

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

        def layer_attend(self, layer_idx: int, q, k, v, scale: float, need_weights: bool = False):
            """Streaming attention of one layer: q (B, H, T, d), k/v (B, G, T, d) rotated at this call's
            positions -> (B, H, T, d)."""
            B, _, T, _ = q.shape
            pos = self._positions(layer_idx, B, T, q.device)
            return self.layers[layer_idx].kv.attend(q, k, v, pos, self.ops, scale=scale, need_weights=need_weights)

    return SinkCache


_CLASSES: Dict[str, Any] = {}


def SinkCache(model, spec: StreamingSpec):  # noqa: N802 - a class factory (transformers is imported lazily)
    """A ``transformers.Cache`` subclass instance for ``model`` (see the module docstring)."""
    if "cache" not in _CLASSES:
        _CLASSES["cache"] = _make_cache_class()
    return _CLASSES["cache"](model, spec)


# ---------------------------------------------------------------------------- attention entry points
def sink_stream_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: (B, H, T, d) in, (B, T, H, d) out, as every HF attention function."""
    cache, layer = _ACTIVE
    if cache is None or layer != getattr(module, "layer_idx", layer):
        raise RuntimeError(f"attn_implementation={ATTN_NAME!r} needs past_key_values=SinkCache(model, spec) in the "
                           "call (or use HFRunner); call disable_streaming(model) for ordinary attention")
    _ACTIVE[0], _ACTIVE[1] = None, -1
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    y, w = cache.layer_attend(layer, query, key, value, scale)
    return y.transpose(1, 2).contiguous(), w


def _require_cache(layer_past):
    if layer_past is None or not hasattr(layer_past, "layer_attend"):
        raise RuntimeError("streaming is enabled on this model: pass past_key_values=SinkCache(model, spec) "
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


def enable_streaming(model) -> None:
    """Route the model's attention through the streaming cache (idempotent; see :func:`disable_streaming`)."""
    from transformers import AttentionInterface

    t = model_type(model)
    hf_position_ops(model)                                  # refuse unsupported rope types early
    if getattr(model, "_sink_stream_prev", None) is not None:
        return
    AttentionInterface.register(ATTN_NAME, sink_stream_attention)
    model._sink_stream_prev = model.config._attn_implementation
    model.config._attn_implementation = ATTN_NAME           # also: no HF mask is materialised
    if t in MODULE_TYPES:
        fwd = _falcon_forward if t == "falcon" else _bloom_forward
        for i, attn in enumerate(attention_modules(model)):
            if getattr(attn, "layer_idx", None) is None:
                attn.layer_idx = i
            attn.forward = fwd.__get__(attn)


def disable_streaming(model) -> None:
    prev = getattr(model, "_sink_stream_prev", None)
    if prev is None:
        return
    model.config._attn_implementation = prev
    if model_type(model) in MODULE_TYPES:
        for attn in attention_modules(model):
            attn.__dict__.pop("forward", None)
    model._sink_stream_prev = None


class HFRunner:
    """``streaming.GPTRunner``'s interface for a Hugging Face causal LM (enables streaming on construction)."""

    def __init__(self, model) -> None:
        self.model = model
        enable_streaming(model)
        self.cache = None
        cfg = model.config
        self.block_size = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "seq_length", None)
        self._kw = set(inspect.signature(model.forward).parameters)
        self._alibi_mask = model_type(model) == "falcon" and getattr(cfg, "alibi", False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def start(self, batch_size: int, spec: Optional[StreamingSpec]) -> None:
        self.cache = SinkCache(self.model, spec) if spec is not None else None

    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("HFRunner.step needs start(batch, spec) first")
        B, T = ids.shape
        pos = pos.to(ids.device).long().expand(B, T)
        self.cache.set_positions(pos)
        kw: Dict[str, Any] = dict(input_ids=ids, past_key_values=self.cache, use_cache=True)
        if "position_ids" in self._kw:
            kw["position_ids"] = pos.clamp(min=0)
        if self._alibi_mask:     # keeps Falcon from building an ALiBi table over the whole stream (unused here)
            kw["attention_mask"] = torch.ones(B, T, dtype=torch.long, device=ids.device)
        return self.model(**kw).logits

    def fresh(self, ids: torch.Tensor) -> torch.Tensor:
        """Dense causal forward from position 0 (a never-wrapping ring: the same maths as the model's own)."""
        prev = self.cache
        self.start(ids.shape[0], dense_spec(ids.shape[1]))
        try:
            return self.step(ids, torch.arange(ids.shape[1], device=ids.device).unsqueeze(0))
        finally:
            self.cache = prev

    def stop(self) -> None:
        self.cache = None

    def cache_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()
