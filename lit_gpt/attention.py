"""Attention: masks as small pure functions, the attention operations of the paper, extra key/value slots.

Masks
-----
A mask is a function ``f(q_pos, k_pos) -> bool tensor`` over *positions* that broadcast against each
other (``q_pos[..., :, None]`` and ``k_pos[..., None, :]``). The same functions build a dense boolean mask
for SDPA / the eager path and a block mask for FlexAttention, and they stay correct when a cache holds keys
at arbitrary positions (ring buffers, sink + window caches). Compose them with :func:`and_masks` /
:func:`or_masks`.

Operations
----------
``v_i = Z_i^-1 sum_j sim(q_i, k_j) v_j`` for every ``attn_op`` of :mod:`lit_gpt.config`. Softmax runs
through ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU); every
operation, softmax included, also has the plain eager implementation :func:`eager_attention`, which is the
reference in the tests and the path used when attention maps are requested.

Extra slots
-----------
Columns placed before the token keys, seen by every query and carrying no position:
``slot_logit`` (H,) a learned logit with a zero value (gpt-oss sinks), and ``slot_k``/``slot_v``
(1|B, H, S, d) learned key/value vectors (the paper's k*, v*).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from lit_gpt.config import CHOICES
from lit_gpt.utils import invalid_choice

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------- masks
def _banded(f: MaskFn, window: Optional[int] = None, n_sink: int = 0, prefix: int = 0) -> MaskFn:
    """Tag a mask with the parameters of allowed(q, k) = (k <= q and (q - k < window or k < n_sink)) or
    (q < prefix and k < prefix), the form the fused kernels compute (lit_gpt.kernels.sim_attention)."""
    f.band = (window, n_sink, prefix)
    return f


def causal_mask(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return k <= q


_banded(causal_mask)


def window_mask(window: int) -> MaskFn:
    """Sliding ("shifted") window: query at q sees keys in (q - window, q]."""
    def f(q, k):
        return (k <= q) & (q - k < window)
    f.__name__ = f"window_{window}"
    return _banded(f, window=window)


def prefix_mask(prefix: int) -> MaskFn:
    """Prefix LM: the first ``prefix`` positions attend bidirectionally among themselves, the rest causally."""
    def f(q, k):
        return (k <= q) | ((q < prefix) & (k < prefix))
    f.__name__ = f"prefix_{prefix}"
    return _banded(f, prefix=prefix)


def sink_window_mask(n_sink: int, window: int) -> MaskFn:
    """StreamingLLM / LM-Infinite Λ shape: the first ``n_sink`` positions plus a causal window of ``window``."""
    def f(q, k):
        return (k <= q) & ((k < n_sink) | (q - k < window))
    f.__name__ = f"sink{n_sink}_window_{window}"
    return _banded(f, window=window, n_sink=n_sink)


def and_masks(*fns: MaskFn) -> MaskFn:
    def f(q, k):
        out = fns[0](q, k)
        for g in fns[1:]:
            out = out & g(q, k)
        return out
    return f


def or_masks(*fns: MaskFn) -> MaskFn:
    def f(q, k):
        out = fns[0](q, k)
        for g in fns[1:]:
            out = out | g(q, k)
        return out
    return f


def mask_from_config(config) -> MaskFn:
    if config.attn_mask == "causal":
        return causal_mask
    if config.attn_mask == "window":
        return window_mask(config.window_size)
    return prefix_mask(config.prefix_size)


def dense_mask(mask_fn: MaskFn, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B|1, 1, Tq, Tk) from q_pos (B|1, Tq) and k_pos (B|1, Tk); negative k_pos = empty slot."""
    q = q_pos.unsqueeze(-1)
    k = k_pos.unsqueeze(-2)
    return (mask_fn(q, k) & (k >= 0)).unsqueeze(1)


# ---------------------------------------------------------------------------- SDPA kernel choice
SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "default")
_SDPA_DEFAULT_ORDER: Optional[list] = None


def set_sdpa_backend(name: str, device: Optional[torch.device] = None) -> str:
    """Put one SDPA kernel first in torch's process-wide priority order (the others stay as fallbacks for inputs
    it cannot take). ``auto``: cuDNN's attention on Hopper GPUs (compute capability 9.x), where it measured
    1.5-1.7x faster than the flash kernel at T = 2048-4096 on an H200 (5 % slower at T = 16k; benchmarks/README.md),
    torch's default order elsewhere; ``default``: torch's
    order (flash, efficient, math, cuDNN). Takes effect for calls (and ``torch.compile`` traces) made after it.
    Returns the backend put first."""
    global _SDPA_DEFAULT_ORDER
    if name not in SDPA_BACKENDS:
        raise ValueError(invalid_choice("sdpa_backend", name, SDPA_BACKENDS))
    get, put = getattr(torch._C, "_get_sdp_priority_order", None), getattr(torch._C, "_set_sdp_priority_order", None)
    if get is None or put is None:
        return "default"
    if _SDPA_DEFAULT_ORDER is None:
        _SDPA_DEFAULT_ORDER = list(get())
    if name == "auto":
        hopper = torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 9
        name = "cudnn" if hopper else "default"
    from torch.nn.attention import SDPBackend
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(name)
    order = list(_SDPA_DEFAULT_ORDER)
    if first is not None:
        order = [int(first)] + [b for b in order if b != int(first)]
    put(order)
    return name


# ---------------------------------------------------------------------------- operations
KERNEL_OPS = ("elu_kernel", "identity", "mlp_kernel")  # sim = phi(q).phi(k) (phi = identity for "identity")


def repeat_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, Hkv, T, d) -> (B, n_head, T, d) for grouped-query attention."""
    if x.shape[1] == n_head:
        return x
    return x.repeat_interleave(n_head // x.shape[1], dim=1)


@dataclass(frozen=True)
class AttentionOp:
    """What one layer's attention computes besides masks and positions, handed explicitly to whatever runs it (the
    eager / SDPA / Flex / Triton paths of the model, the caches of :mod:`lit_gpt.streaming`).

    ``feature_map`` is phi of the kernel operations (elu_kernel, mlp_kernel); the slots are the extra columns of
    the module docstring (slot_k/slot_v (1|B, H, S, d), slot_logit (H,)), read from the layer's parameters at
    every forward (:meth:`lit_gpt.model.CausalSelfAttention.operation`)."""

    op: str = "softmax"
    normalize: bool = True
    alpha: float = 1.0
    scale: Optional[float] = None
    feature_map: Optional[Callable] = None
    slot_k: Optional[torch.Tensor] = None
    slot_v: Optional[torch.Tensor] = None
    slot_logit: Optional[torch.Tensor] = None

    def slots(self) -> dict:
        return {"slot_k": self.slot_k, "slot_v": self.slot_v, "slot_logit": self.slot_logit}


def prepend_slots(k, v, mask, bias, slot_k=None, slot_v=None, slot_logit=None):
    """The extra-slot columns put before the token keys, as keys every query sees (the one place they are built).

    k, v (B, H, Tk, d) with the heads already repeated for GQA; mask bool (..., Tq, Tk); bias additive scores
    (..., H|1, Tq, Tk) or None. A sink logit becomes a zero key with a zero value whose score is its logit (a bias
    column); a k* slot the key k* with the value v*. Returns (k, v, mask, bias, n_slot): columns
    [sink logit][k* slots][tokens], the slot columns always visible, with bias 0 except the sink logit's."""
    if slot_k is None and slot_logit is None:
        return k, v, mask, bias, 0
    B, H, _, d = k.shape
    keys, vals, n_slot = [], [], 0
    if slot_logit is not None:
        keys.append(k.new_zeros(B, H, 1, d))
        vals.append(v.new_zeros(B, H, 1, v.shape[-1]))
        n_slot += 1
    if slot_k is not None:
        keys.append(slot_k.to(k.dtype).expand(B, H, -1, -1))
        vals.append(slot_v.to(v.dtype).expand(B, H, -1, -1))
        n_slot += slot_k.shape[-2]
    k = torch.cat(keys + [k], dim=-2)
    v = torch.cat(vals + [v], dim=-2)
    mask = torch.cat([mask.new_ones(mask.shape[:-1] + (n_slot,)), mask], dim=-1)
    if bias is not None:
        bias = torch.cat([bias.new_zeros(bias.shape[:-1] + (n_slot,)), bias], dim=-1)
    if slot_logit is not None:
        bdt = torch.float64 if k.dtype == torch.float64 else torch.float32
        col = slot_logit.to(bdt).view(1, H, 1, 1)
        lead = torch.cat([col, torch.zeros(1, H, 1, k.shape[-2] - 1, device=k.device, dtype=bdt)], dim=-1)
        bias = lead if bias is None else bias + lead
    return k, v, mask, bias, n_slot


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor, op: str = "softmax",
    normalize: bool = True, alpha: float = 1.0, scale: Optional[float] = None, bias: Optional[torch.Tensor] = None,
    slot_k: Optional[torch.Tensor] = None, slot_v: Optional[torch.Tensor] = None,
    slot_logit: Optional[torch.Tensor] = None, kernel: Optional[Callable] = None, need_weights: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Plain implementation of every attention operation.

    q (B, H, Tq, d); k, v (B, Hkv, Tk, d); mask bool broadcastable to (B, H, Tq, Tk); bias additive scores.
    ``kernel`` is the feature map phi for kernel operations (applied to q, k and slot keys).
    Returns the output (B, H, Tq, d) and, if ``need_weights``, the attention map (B, H, Tq, S + Tk): the
    softmax probabilities before the ``alpha`` scaling (rows sum to 1), else the paper's proxy |sim| / sum |sim|.
    """
    H = q.shape[1]
    k, v = repeat_kv(k, H), repeat_kv(v, H)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if op in ("elu_kernel", "mlp_kernel"):
        q, k = kernel(q), kernel(k)
        if slot_k is not None:
            slot_k = kernel(slot_k)
    k, v, mask, bias, _ = prepend_slots(k, v, mask, bias, slot_k, slot_v, slot_logit)
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if op == "softmax":
        w = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        y = w @ v
        # the map is the attention distribution before the alpha scaling (rows sum to 1), so the sink threshold
        # means the same for every alpha (paper Table 14); only the output carries alpha
        return (y * alpha if alpha != 1.0 else y), (w if need_weights else None)
    if op == "sigmoid":
        sim = torch.sigmoid(scores)
    elif op == "elu":
        sim = F.elu(scores) + 1.0
    elif op in KERNEL_OPS:
        sim = scores
    else:
        raise ValueError(invalid_choice("attn_op", op, CHOICES["attn_op"]))
    sim = sim.masked_fill(~mask, 0.0)
    if normalize:
        total = sim.sum(-1, keepdim=True)
        z = total.abs().clamp_min(1.0) if op in ("identity", "mlp_kernel") else total.clamp_min(1e-8)
        y = (sim / z) @ v
    else:
        y = sim @ v
    weights = None
    if need_weights:
        mag = sim.abs()
        weights = mag / mag.sum(-1, keepdim=True).clamp_min(1e-30)
    return y, weights


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor], is_causal: bool = False,
    alpha: float = 1.0, scale: Optional[float] = None, bias: Optional[torch.Tensor] = None,
    slot_k: Optional[torch.Tensor] = None, slot_v: Optional[torch.Tensor] = None,
    slot_logit: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax attention through the fused kernels; extra slots become leading key columns."""
    B, H, Tq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    has_slots = slot_k is not None or slot_logit is not None
    if mask is None and (has_slots or bias is not None or not is_causal or Tq != k.shape[-2]):
        Tk = k.shape[-2]   # causal over the token keys, the last query aligned with the last key
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq).view(1, 1, Tq, Tk)
    gqa = k.shape[1] != H
    if has_slots and gqa:
        k, v = repeat_kv(k, H), repeat_kv(v, H)
        gqa = False
    if has_slots:
        k, v, mask, bias, _ = prepend_slots(k, v, mask, bias, slot_k, slot_v, slot_logit)
        is_causal = False
    # SDPA's is_causal aligns top-left: only use it when queries and keys are the same positions
    attn_mask = None if (is_causal and bias is None and Tq == k.shape[-2]) else mask
    if bias is not None:
        attn_mask = torch.where(mask, bias.to(q.dtype), float("-inf"))     # no host tensor: CUDA-graph safe
    if attn_mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
    return y * alpha if alpha != 1.0 else y
