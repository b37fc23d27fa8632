"""One LLaMA-style model for every variant of the paper: GPT -> Block -> CausalSelfAttention + MLP + norms.

A single forward serves training, evaluation and generation:

* ``model(idx)``                              full causal forward (the training path), logits (B, T, V)
* ``model(idx, input_pos=pos)``               uses the per-layer caches set by :meth:`GPT.set_kv_cache` (dense)
                                              or :func:`lit_gpt.streaming.install_streaming` (sinks + window):
                                              one protocol, :class:`lit_gpt.streaming.StreamingCache`
* ``model(idx, return_analysis=True)``        returns ``(logits, Analysis)`` with per-layer attention maps,
                                              hidden states and q/k/v after positional encoding

Every variant is a field of :class:`lit_gpt.config.Config`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt.attention import (
    AttentionOp, MaskFn, causal_mask, dense_mask, eager_attention, mask_from_config, sdpa_attention,
)
from lit_gpt.config import RELATIVE_POSITIONS, Config
from lit_gpt.positional import (
    RelativePositionBias, alibi_bias, alibi_slopes, apply_rope, rope_cos_sin, rope_inv_freq, sinusoidal_embedding,
)
from lit_gpt.utils import invalid_choice

ANALYSIS_KEYS = ("attn", "hidden", "q", "k", "v")


# ---------------------------------------------------------------------------- analysis record
@dataclass
class Analysis:
    """Per-layer intermediates of one forward.

    attn:   per layer (B, H, T, n_extra + Tk) float32 attention maps; columns are
            [sink logit][k* slot][sink token] (those present) followed by the Tk keys. For softmax the
            probabilities before the softmax_alpha scaling (rows sum to 1, so the sink threshold does not move
            with alpha); for non-softmax operations the paper's proxy |sim| / sum |sim|.
    hidden: n_layer + 1 tensors (B, T, n_embd): the input of every block, then the output of the last block
            before the final norm.
    q, k, v: per layer (B, H|G, T, head_size) after positional encoding (keys and values of this call only).
    Positions of a prepended sink token are dropped from every per-position output (not from attn columns).
    """

    attn: List[torch.Tensor] = field(default_factory=list)
    hidden: List[torch.Tensor] = field(default_factory=list)
    q: List[torch.Tensor] = field(default_factory=list)
    k: List[torch.Tensor] = field(default_factory=list)
    v: List[torch.Tensor] = field(default_factory=list)
    n_extra: int = 0


@dataclass
class ForwardContext:
    pos: torch.Tensor                        # (B|1, T) positions of the tokens of this call
    cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]]  # RoPE tables (B|1, 1, T, n) or None
    mask_fn: MaskFn
    full_causal: bool                        # no cache and plain causal mask: the fused is_causal path applies
    bias_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    need: frozenset = frozenset()
    analysis: Optional[Analysis] = None
    drop_first: bool = False                 # a sink token was prepended in this call
    no_cache: bool = True                    # full forward: positions are 0..T-1, keys are this call's tokens
    rel_bias: Optional[nn.Module] = None     # the model's T5 relative bias (for the flex score_mod)
    memo: Dict[Any, Any] = field(default_factory=dict)   # masks / biases shared by all layers of one forward

    def cached(self, name: str, make: Callable[[], Any], pin: tuple = ()):
        """Compute once per forward: every layer sees the same positions, hence the same mask and bias. The key is
        ``name`` with the ids of the ``pin`` tensors (kept alive, so an id cannot be reused within the forward).
        Inside torch.compile nothing is memoised (the compiler shares the work itself, and an id would make it
        recompile for every forward when a block is compiled on its own)."""
        if torch.compiler.is_compiling():
            return make()
        key = (name, id(self.mask_fn)) + tuple(id(t) for t in pin)
        if key not in self.memo:
            self.memo[key] = (make(), pin)
        return self.memo[key][0]


def _fused_rope_op(config: Config, x: torch.Tensor, full_forward: bool) -> Optional[Callable]:
    """The fused RoPE + qkv split of :mod:`lit_gpt.kernels.rope` when ``config.rope_impl`` picks it for this call,
    else None; with ``rope_impl='torch'`` (the default) that module, and Triton, are never imported."""
    if config.rope_impl == "torch":
        return None
    from lit_gpt.kernels.rope import rope_qkv, use_fused_rope
    return rope_qkv if use_fused_rope(config, x, full_forward) else None


def _parse_need(return_analysis: Union[bool, Iterable[str]]) -> frozenset:
    if return_analysis is True:
        return frozenset(ANALYSIS_KEYS)
    if not return_analysis:
        return frozenset()
    need = frozenset(return_analysis)
    bad = need - set(ANALYSIS_KEYS)
    if bad:
        raise ValueError(invalid_choice("return_analysis", sorted(bad), ANALYSIS_KEYS))
    return need


# ---------------------------------------------------------------------------- norms and MLPs
class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x if x.dtype == torch.float64 else x.float()      # normalise in fp32 (fp64 stays fp64)
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.to(xf.dtype)).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def make_norm(config: Config) -> nn.Module:
    if config.norm_class == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


_ACT = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "reglu": F.relu, "geglu": F.gelu, "swiglu": F.silu}


class MLP(nn.Module):
    """relu / gelu / swish: proj(act(fc x)); reglu / geglu / swiglu: proj(act(gate x) * up x).

    For the gated forms ``fc`` holds [gate; up] stacked (one matmul); export splits them.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gated = config.mlp in ("reglu", "geglu", "swiglu")
        self.act = _ACT[config.mlp]
        h = config.intermediate_size
        self.fc = nn.Linear(config.n_embd, 2 * h if self.gated else h, bias=config.bias)
        self.proj = nn.Linear(h, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        if self.gated:
            gate, up = x.chunk(2, dim=-1)
            x = self.act(gate) * up
        else:
            x = self.act(x)
        return self.proj(x)


class KernelMLP(nn.Module):
    """Feature map phi = Linear-ReLU-Linear on the head dim, shared by queries and keys (paper Table 15)."""

    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d, bias=bias)
        self.fc2 = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


# ---------------------------------------------------------------------------- attention
def use_flex(cfg: Config, q: torch.Tensor, full_causal: bool) -> bool:
    """FlexAttention for a full-sequence softmax forward: always with attn_impl='flex' (on CUDA, or on CPU
    without grad: it has no CPU backward); with attn_impl='auto' on CUDA where it measured faster than SDPA on an
    H100 (windows, prefix masks, ALiBi, k*/v* slots, sink logits; see benchmarks/results/train_step.json).
    Plain causal attention stays on SDPA's flash kernel, T5 relative biases on SDPA (the learned-table score_mod
    exceeded Triton's shared memory at d=96; the fixed-bucket score_mod has not been timed on a GPU yet)."""
    from lit_gpt.flex import flex_available
    if cfg.attn_impl == "flex":
        return (q.is_cuda or not torch.is_grad_enabled()) and flex_available(cfg)
    if cfg.attn_impl != "auto" or not q.is_cuda or not flex_available(cfg):
        return False
    needs_dense = (not full_causal or cfg.pos_encoding == "alibi" or cfg.kv_bias in ("k", "kv") or cfg.sink_logit)
    return needs_dense and cfg.pos_encoding not in RELATIVE_POSITIONS


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        H, G, d = config.n_head, config.n_query_groups, config.head_size
        self.n_head, self.n_kv, self.head_size = H, G, d
        self.qkv = nn.Linear(config.n_embd, (H + 2 * G) * d, bias=config.bias)
        self.proj = nn.Linear(H * d if config.head_output == "concat" else d, config.n_embd, bias=config.bias)
        self.scale = 1.0 / math.sqrt(d)
        nb = 1 if config.kv_bias_shared else H
        # extra key/value parameters (paper §7.3)
        if config.kv_bias in ("k", "kv"):
            da = d if config.kv_bias_key_dims is None else config.kv_bias_key_dims
            self.k_star = nn.Parameter(torch.empty(nb, da))
            if config.kv_bias == "kv":
                self.v_star = nn.Parameter(torch.empty(nb, d))
            else:
                fixed = torch.zeros(nb, d)
                if config.kv_bias_value == "one_hot":
                    fixed[:, 0] = config.kv_bias_value_scale
                elif config.kv_bias_value == "uniform":
                    fixed[:] = config.kv_bias_value_scale / math.sqrt(d)
                self.register_buffer("v_star", fixed)
        elif config.kv_bias == "v":
            self.v_bias = nn.Parameter(torch.empty(1 if config.kv_bias_shared else G, d))
        if config.sink_logit:
            self.sink_logit = nn.Parameter(torch.zeros(H))
        if config.attn_op == "mlp_kernel":
            self.kernel = KernelMLP(d, config.bias)
        self.kv_cache: Optional[nn.Module] = None    # a lit_gpt.streaming.StreamingCache (set_kv_cache, set_caches)
        self.last_impl: Optional[str] = None        # the attention path of the last forward (see attend)
        self._select_path()

    # -- pieces reusable by streaming code
    def project(self, x: torch.Tensor, cos_sin: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                full_forward: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> q (B, H, T, d), k, v (B, G, T, d): before positional encoding, or with ``cos_sin`` (RoPE
        tables (B|1, 1, T, n)) q and k rotated, by the fused op of :mod:`lit_gpt.kernels.rope` where
        ``config.rope_impl`` picks it for this call (``full_forward``: no cache; its backward writes the qkv
        gradient in one pass), else :func:`apply_rope`."""
        B, T, _ = x.shape
        H, G, d = self.n_head, self.n_kv, self.head_size
        qkv = self.qkv(x)
        op = _fused_rope_op(self.config, qkv, full_forward) if cos_sin is not None else None
        if op is not None:
            q, k, v = op(qkv, *cos_sin, H, G, d)
        else:
            q, k, v = qkv.split((H * d, G * d, G * d), dim=-1)
            q = q.view(B, T, H, d).transpose(1, 2)
            k = k.view(B, T, G, d).transpose(1, 2)
            v = v.view(B, T, G, d).transpose(1, 2)
            if cos_sin is not None:
                q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        if self.config.kv_bias == "v":
            v = v + self.v_bias.to(v.dtype).view(1, -1, 1, d)
        return q, k, v

    def slots(self) -> Dict[str, Optional[torch.Tensor]]:
        """Extra-slot tensors for the attention functions: slot_k/slot_v (1, H, 1, d), slot_logit (H,)."""
        cfg, H, d = self.config, self.n_head, self.head_size
        out: Dict[str, Optional[torch.Tensor]] = {"slot_k": None, "slot_v": None, "slot_logit": None}
        if cfg.kv_bias in ("k", "kv"):
            k_star = self.k_star
            if k_star.shape[-1] < d:
                k_star = torch.cat([k_star, k_star.new_zeros(k_star.shape[0], d - k_star.shape[-1])], dim=-1)
            out["slot_k"] = k_star.expand(H, d).reshape(1, H, 1, d)
            out["slot_v"] = self.v_star.expand(H, d).reshape(1, H, 1, d)
        if cfg.sink_logit:
            out["slot_logit"] = self.sink_logit
        return out

    def feature_map(self) -> Optional[Callable]:
        if self.config.attn_op == "elu_kernel":
            return elu_feature_map
        if self.config.attn_op == "mlp_kernel":
            return self.kernel
        return None

    def operation(self) -> AttentionOp:
        """This layer's attention operation with its current slot tensors, as every path and cache takes it."""
        cfg = self.config
        return AttentionOp(op=cfg.attn_op, normalize=cfg.attn_normalize, alpha=cfg.softmax_alpha, scale=self.scale,
                           feature_map=self.feature_map(), **self.slots())

    # -- the attention paths of a cache-free forward, one picked per layer by _select_path
    def _select_path(self) -> None:
        """Pick the path from attn_op and attn_impl once: at construction, and again only when ``config.attn_impl``
        is reassigned (tests and benchmarks switch paths on a built model). What is left per call depends on the
        call: maps requested (eager), the device, the mask, a cache."""
        cfg, cls = self.config, type(self)
        if cfg.attn_op in ("sigmoid", "elu") and cfg.attn_impl in ("auto", "triton"):
            path = cls._triton_or_eager
        elif cfg.attn_op != "softmax" or cfg.attn_impl == "eager":
            path = cls._eager
        elif cfg.attn_impl == "sdpa":
            path = cls._sdpa
        else:                                   # softmax, attn_impl auto | flex
            path = cls._flex_or_sdpa
        # the function, not a bound method: a bound method would make the module a reference cycle, freed (with its
        # GPU memory) only when the cycle collector runs
        self._path, self._path_impl = path, cfg.attn_impl

    def attend(self, q, k, v, ctx: ForwardContext, op: AttentionOp, need_weights: bool,
               full_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention of this call's position-encoded q (B,H,T,d) over its k/v (B,G,T,d) at positions ``ctx.pos``.

        Paths (:meth:`_select_path`): eager when maps are requested or the operation is not softmax; softmax on
        FlexAttention when :func:`use_flex` says so (a full forward), otherwise SDPA; sigmoid / elu on a full
        forward: the fused Triton kernel on CUDA where it supports the layout (lit_gpt.kernels.sim_attention). The
        path taken is recorded in ``last_impl``. A Flex failure raises, except a Triton resource limit under
        ``attn_impl='auto'``, which warns and uses SDPA for that layout from then on
        (:func:`lit_gpt.flex.flex_failed`)."""
        if self._path_impl != self.config.attn_impl:
            self._select_path()
        return self._path(self, q, k, v, ctx, op, need_weights, full_causal)

    def _triton_or_eager(self, q, k, v, ctx, op, need_weights, full_causal):
        cfg = self.config
        if not need_weights and ctx.no_cache and (q.is_cuda or cfg.attn_impl == "triton"):
            from lit_gpt.kernels import sim_attention as sim
            if sim.supports(cfg, q, ctx.mask_fn):
                self._record("triton")
                return sim.sim_attention(
                    q, k, v, ctx.mask_fn, op=op.op, normalize=op.normalize, scale=op.scale,
                    alibi_slopes=alibi_slopes(cfg.n_head) if cfg.pos_encoding == "alibi" else None,
                    slot_k=op.slot_k, slot_v=op.slot_v), None
        return self._eager(q, k, v, ctx, op, need_weights, full_causal)

    def _flex_or_sdpa(self, q, k, v, ctx, op, need_weights, full_causal):
        cfg = self.config
        if not need_weights and ctx.no_cache and use_flex(cfg, q, full_causal):
            from lit_gpt.flex import flex_attention_forward, flex_failed
            try:
                y = flex_attention_forward(
                    q, k, v, ctx.mask_fn, scale=op.scale, alpha=op.alpha,
                    alibi_slopes=alibi_slopes(cfg.n_head) if cfg.pos_encoding == "alibi" else None,
                    rel_bias=ctx.rel_bias, **op.slots())
                self._record("flex")
                return y, None
            except Exception as e:
                flex_failed(cfg, e)      # re-raises unless it is a resource limit that 'auto' may route to SDPA
        return self._sdpa(q, k, v, ctx, op, need_weights, full_causal)

    def _sdpa(self, q, k, v, ctx, op, need_weights, full_causal):
        if need_weights:
            return self._eager(q, k, v, ctx, op, need_weights, full_causal)
        self._record("sdpa")
        mask = None if full_causal else self._mask(ctx)
        y = sdpa_attention(q, k, v, mask=mask, is_causal=full_causal, alpha=op.alpha, scale=op.scale,
                           bias=self._bias(ctx), **op.slots())
        return y, None

    def _eager(self, q, k, v, ctx, op, need_weights, full_causal):
        self._record("eager")
        return eager_attention(q, k, v, mask=self._mask(ctx), op=op.op, normalize=op.normalize, alpha=op.alpha,
                               scale=op.scale, bias=self._bias(ctx), kernel=op.feature_map,
                               need_weights=need_weights, **op.slots())

    @staticmethod
    def _mask(ctx: ForwardContext) -> torch.Tensor:
        return ctx.cached("mask", lambda: dense_mask(ctx.mask_fn, ctx.pos, ctx.pos), (ctx.pos, ctx.pos))

    @staticmethod
    def _bias(ctx: ForwardContext) -> Optional[torch.Tensor]:
        if ctx.bias_fn is None:
            return None
        return ctx.cached("bias", lambda: ctx.bias_fn(ctx.pos, ctx.pos), (ctx.pos, ctx.pos))

    def _record(self, impl: str) -> None:
        """Remember which attention path this layer ran last (flex, sdpa, eager, triton, streaming); skipped while
        torch.compile traces, where a Python side effect would only cost graph breaks."""
        if not torch.compiler.is_compiling():
            self.last_impl = impl

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        B, H, T, d = y.shape
        if self.config.head_output == "sum":
            return self.proj(y.sum(1))
        return self.proj(y.transpose(1, 2).reshape(B, T, H * d))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.project(x, ctx.cos_sin, full_forward=ctx.no_cache)
        rec = ctx.analysis
        if rec is not None:
            s = slice(1, None) if ctx.drop_first else slice(None)
            for name, t in (("q", q), ("k", k), ("v", v)):
                if name in ctx.need:
                    getattr(rec, name).append(t[:, :, s].detach())
        cache = None if ctx.no_cache else self.kv_cache       # a full forward leaves the caches untouched
        op, need_weights = self.operation(), "attn" in ctx.need
        if cache is not None:
            # the cache computes attention itself (LM-Infinite's two position systems need it), dense or streaming
            self._record("streaming")
            y, w = cache.attend(q, k, v, ctx.pos, op, mask_fn=ctx.mask_fn, bias_fn=ctx.bias_fn,
                                need_weights=need_weights)
        else:
            y, w = self.attend(q, k, v, ctx, op, need_weights, full_causal=ctx.full_causal)
        if rec is not None and "attn" in ctx.need:
            w = w[:, :, 1:] if ctx.drop_first else w
            rec.attn.append((w if w.dtype in (torch.float32, torch.float64) else w.float()).detach())
        return self.merge_heads(y)


class Block(nn.Module):
    def __init__(self, config: Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm_1(x), ctx)
            return x + self.mlp(self.norm_2(x))
        x = self.norm_1(x + self.attn(x, ctx))
        return self.norm_2(x + self.mlp(x))


# ---------------------------------------------------------------------------- model
class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_encoding == "learned":
            self.wpe = nn.Embedding(config.block_size + int(config.sink_token), config.n_embd)
        if config.sink_token:
            self.sink_token = nn.Parameter(torch.empty(config.n_embd))
        if config.pos_encoding in RELATIVE_POSITIONS:
            self.rel_bias = RelativePositionBias(config.n_head, config.relative_buckets, config.relative_max_distance,
                                                 bidirectional=config.attn_mask == "prefix",
                                                 learned=config.pos_encoding == "relative_learned")
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # the final norm of pre-norm models; post-norm blocks end in a norm already and the seed's post-norm model
        # (model_postln.py) has no final norm: an Identity, no parameters, no ln_f.* weights in checkpoints
        self.ln_f = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # RoPE frequencies and ALiBi slopes are recomputed per forward (tiny), never cast by model.to(dtype)
        self.mask_fn = mask_from_config(config)
        self.reset_parameters()

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "GPT":
        return cls(Config.from_name(name, **overrides))

    # ------------------------------------------------------------------ init (the seed's scheme)
    def reset_parameters(self) -> None:
        """The seed's ``_init_weights``: normal(0, sqrt(2 / (5 fan_in))) for linears and embeddings (fan_in = n_embd
        for embeddings); for SwiGLU only (the seed's LLaMAMLP, whose xformers SwiGLU output layer ``w3`` it matches
        by name) the FFN output projection normal(0, 1 / sqrt(fan_in) / n_layer); the relu / gelu / swish / reglu /
        geglu FFNs keep the fan-in init everywhere (the seed's ReluMLP, ..., RegluMLP match neither name). Not in the
        seed: k*/v* normal(0, 0.02), sink logits 0."""
        cfg = self.config
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (5.0 * m.weight.shape[1])))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (5.0 * m.weight.shape[1])))
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.reset_parameters()
        for block in self.blocks:
            if cfg.mlp == "swiglu":
                w = block.mlp.proj.weight
                nn.init.normal_(w, 0.0, 1.0 / math.sqrt(w.shape[1]) / cfg.n_layer)
            attn = block.attn
            for name in ("k_star", "v_bias"):
                if isinstance(getattr(attn, name, None), nn.Parameter):
                    nn.init.normal_(getattr(attn, name), 0.0, 0.02)
            if isinstance(getattr(attn, "v_star", None), nn.Parameter):
                nn.init.normal_(attn.v_star, 0.0, 0.02)
            if cfg.sink_logit:
                nn.init.zeros_(attn.sink_logit)
        if cfg.sink_token:
            nn.init.normal_(self.sink_token, 0.0, math.sqrt(2.0 / (5.0 * cfg.n_embd)))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    # ------------------------------------------------------------------ caches
    def set_kv_cache(self, batch_size: int, max_seq_length: Optional[int] = None) -> None:
        """Dense per-layer caches holding positions [0, max_seq_length) (default block_size): streaming caches whose
        ring never wraps (:func:`lit_gpt.streaming.dense_spec`), allocated here for ``batch_size`` rows; a position
        past the end is refused, nothing is evicted. A prefix LM's prefix must come in one call (as before)."""
        from lit_gpt.streaming import StreamingCache, dense_spec
        cfg = self.config
        n = (max_seq_length or cfg.block_size) + int(cfg.sink_token)
        p = next(self.parameters())
        caches = [StreamingCache(dense_spec(n), cfg, i, max_positions=n) for i in range(len(self.blocks))]
        for c in caches:
            c.kv.allocate(batch_size, cfg.n_query_groups, cfg.head_size, cfg.head_size, p.dtype, p.device)
        self.set_caches(caches)

    def set_caches(self, caches: Sequence[nn.Module]) -> None:
        """Install one cache per layer: :class:`lit_gpt.streaming.StreamingCache` or any object with its ``attend``."""
        if len(caches) != len(self.blocks):
            raise ValueError(f"got {len(caches)} caches for {len(self.blocks)} layers")
        for block, cache in zip(self.blocks, caches):
            block.attn.kv_cache = cache

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    @property
    def has_cache(self) -> bool:
        return any(b.attn.kv_cache is not None for b in self.blocks)

    # ------------------------------------------------------------------ positions
    def bias_fn(self) -> Optional[Callable]:
        cfg = self.config
        if cfg.pos_encoding == "alibi":
            slopes = alibi_slopes(cfg.n_head)
            return lambda qp, kp: alibi_bias(qp, kp, slopes)
        if cfg.pos_encoding in RELATIVE_POSITIONS:
            return self.rel_bias
        return None

    def rope_tables(self, pos: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        if self.config.pos_encoding != "rope":
            return None
        dtype = torch.float64 if self.wte.weight.dtype == torch.float64 else torch.float32
        inv_freq = rope_inv_freq(self.config.rope_n_elem, self.config.rope_base, device=pos.device)
        cos, sin = rope_cos_sin(pos, inv_freq, dtype)          # (B|1, T, n)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None, *,
                return_analysis: Union[bool, Iterable[str]] = False, mask_fn: Optional[MaskFn] = None,
                targets: Optional[torch.Tensor] = None, loss_impl: str = "auto"):
        """Logits (B, T, vocab) or ``(logits, Analysis)`` when ``return_analysis`` is set; with ``targets`` (B, T)
        the mean next-token loss over targets != -100 instead of logits (:mod:`lit_gpt.fused_ce`: ``loss_impl``
        fused | plain | auto; fused forms no fp32 copy of the logits).

        input_pos: None for a full forward from position 0 (caches untouched), or (T,) / (B, T) positions of
            ``idx`` used with the caches set by :meth:`set_kv_cache` / :meth:`set_caches`; a negative position
            marks a padding token (streaming caches neither store it nor let other tokens see it).
        return_analysis: True or a subset of ``("attn", "hidden", "q", "k", "v")``.
        mask_fn: replaces the configured mask (a function of query and key positions).
        """
        cfg = self.config
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        device = idx.device
        if input_pos is None:
            pos = torch.arange(T, device=device).unsqueeze(0)
            starts_at_zero = True
        else:
            if not self.has_cache:
                raise ValueError("input_pos given but no cache is set: call model.set_kv_cache(...) first")
            pos = input_pos.to(device).long()
            pos = pos.unsqueeze(0) if pos.dim() == 1 else pos
            if pos.shape[-1] != T or pos.shape[0] not in (1, B):
                raise ValueError(f"input_pos shape {tuple(input_pos.shape)} does not match idx shape {(B, T)}")
            starts_at_zero = False              # only a sink token needs it (a host sync: keep decoding sync-free)
            if cfg.sink_token:
                first = pos[:, 0] == 0
                starts_at_zero = bool(first.all())
                if bool(first.any()) and not starts_at_zero:
                    raise ValueError("with sink_token=True all rows must start at position 0 together")
        if cfg.pos_encoding == "learned" and int(pos.max()) >= cfg.block_size:
            raise ValueError(f"position {int(pos.max())} >= block_size={cfg.block_size}: learned absolute "
                             "positions cannot extrapolate")
        x = self.wte(idx)
        prepend = cfg.sink_token and starts_at_zero
        if cfg.sink_token:
            pos = pos + 1 if input_pos is None else torch.where(pos >= 0, pos + 1, pos)   # padding stays < 0
            if prepend:
                x = torch.cat([self.sink_token.to(x.dtype).expand(B, 1, -1), x], dim=1)
                pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        if cfg.pos_encoding == "learned":
            x = x + self.wpe(pos if input_pos is None else pos.clamp(min=0))
        elif cfg.pos_encoding == "sinusoidal":
            x = x + sinusoidal_embedding(pos, cfg.n_embd).to(x.dtype)
        need = _parse_need(return_analysis)
        analysis = Analysis(n_extra=cfg.n_extra_slots) if need else None
        effective_mask = mask_fn or self.mask_fn
        ctx = ForwardContext(
            pos=pos, cos_sin=self.rope_tables(pos), mask_fn=effective_mask,
            full_causal=input_pos is None and effective_mask is causal_mask,
            bias_fn=self.bias_fn(), need=need, analysis=analysis, drop_first=prepend, no_cache=input_pos is None,
            rel_bias=getattr(self, "rel_bias", None),
        )
        sl = slice(1, None) if prepend else slice(None)
        for block in self.blocks:
            if analysis is not None and "hidden" in need:
                analysis.hidden.append(x[:, sl].detach())
            x = block(x, ctx)
        if analysis is not None and "hidden" in need:
            analysis.hidden.append(x[:, sl].detach())
        h = self.ln_f(x[:, sl] if prepend else x)
        if targets is not None:
            if analysis is not None:
                raise ValueError("targets and return_analysis cannot be combined (the loss path forms no logits)")
            from lit_gpt.fused_ce import linear_cross_entropy
            return linear_cross_entropy(h, self.lm_head.weight, targets, impl=loss_impl)
        logits = self.lm_head(h)
        return (logits, analysis) if analysis is not None else logits

    def attention_paths(self) -> List[Optional[str]]:
        """The attention path each layer ran in the last forward ('flex', 'sdpa', 'eager', 'triton', 'streaming';
        None before any forward), e.g. to check that a fused kernel really ran."""
        return [block.attn.last_impl for block in self.blocks]

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n
