"""FlexAttention path: block-sparse masks, ALiBi / T5 relative bias as score_mods, extra slots via the LSE.

Sliding windows and prefix masks are expressed with the same mask functions as everywhere else
(:mod:`lit_gpt.attention`) and turned into a block mask once per (mask, length, device) (a small LRU keyed by
value, :func:`block_mask_for`), so a window of w tokens costs about T*w instead of T^2 work. k*/v* slots and sink
logits are merged exactly through the log-normaliser that FlexAttention returns (:func:`merge_slots`), so no
variant needs a dense T x T float mask.
FlexAttention has no CPU backward: training with it needs a GPU; it is compiled on first use on CUDA.
``attn_impl='auto'`` picks it on CUDA where it measured faster (see ``lit_gpt.model.use_flex``).

Failures are visible (:func:`flex_failed`): with ``attn_impl='flex'`` every failure raises
:class:`FlexAttentionError`; with ``attn_impl='auto'`` only a Triton resource limit (shared memory, registers: no
kernel configuration fits this layout) falls back to SDPA, with a warning, for that layout; any other error
raises. Each attention layer records the path it ran (``CausalSelfAttention.last_impl``,
``GPT.attention_paths()``), so a check can fail when Flex did not run.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Hashable, Optional, Tuple, Union

import torch

from lit_gpt.attention import repeat_kv

BLOCK_MASK_CACHE_SIZE = 8       # block masks kept per process (a training run uses one or two: train and eval length)
_BLOCK_MASKS: "OrderedDict[Tuple, object]" = OrderedDict()    # LRU: mask_key(mask_fn), T, device -> block mask
_COMPILED: Dict[str, Callable] = {}


def _flex_fn(device: torch.device) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _COMPILED:
        # one compiled kernel per attention layout (mask, score_mod, GQA, head size); a process that trains or
        # checks many layouts would pass dynamo's default of 8 and silently drop to the slow eager reference
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["cuda"]


_FAILED: Dict[str, str] = {}        # layout -> the resource-limit error that sent it to SDPA (attn_impl='auto')

# what a Triton / Inductor resource limit looks like, however torch.compile wraps it (InductorError,
# BackendCompilerFailed keep the original as inner_exception / __cause__)
_RESOURCE_ERRORS = ("OutOfResources", "NoTritonConfigsError", "NoValidChoicesError")
_RESOURCE_TEXT = ("out of resource", "no valid triton configs")


class FlexAttentionError(RuntimeError):
    """The FlexAttention path failed where no fallback applies."""


def flex_available(config) -> bool:
    """FlexAttention is importable and has not hit a resource limit for this config's layout in this process."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return _layout_key(config) not in _FAILED


def _layout_key(config) -> str:
    return f"{config.pos_encoding}|{config.attn_mask}|{config.kv_bias}|{config.sink_logit}|{config.head_size}"


def is_resource_limit(error: BaseException) -> bool:
    """True when ``error`` (or an exception it wraps) is a Triton resource limit: no kernel configuration of this
    layout fits the GPU's shared memory / registers."""
    stack, seen = [error], 0
    while stack and seen < 16:
        e = stack.pop()
        seen += 1
        if type(e).__name__ in _RESOURCE_ERRORS or any(t in str(e).lower() for t in _RESOURCE_TEXT):
            return True
        stack += [x for x in (getattr(e, "inner_exception", None), e.__cause__, e.__context__)
                  if isinstance(x, BaseException)]
    return False


def flex_failed(config, error: Exception) -> None:
    """Handle a failure of the Flex path: under ``attn_impl='auto'`` a resource limit is remembered for the layout
    (bounded: one entry per layout) and warned about, and the caller uses SDPA; everything else raises."""
    import warnings

    key = _layout_key(config)
    what = f"{type(error).__name__}: {str(error)[:300]}"
    if config.attn_impl == "auto" and is_resource_limit(error):
        if key not in _FAILED:
            _FAILED[key] = what
            warnings.warn(f"FlexAttention hit a Triton resource limit for layout {key} ({what}); attn_impl='auto' "
                          "uses SDPA for this layout from now on (same function, dense mask)", RuntimeWarning,
                          stacklevel=3)
        return
    hint = ("a resource limit: attn_impl='auto' would use SDPA for this layout, attn_impl='sdpa' always does"
            if is_resource_limit(error) else "attn_impl='sdpa' or 'eager' runs without FlexAttention")
    raise FlexAttentionError(f"FlexAttention failed for layout {key} with attn_impl={config.attn_impl!r} ({what}); "
                             f"{hint}") from error


def mask_key(mask_fn: Callable) -> Hashable:
    """A value key for a mask: the band (window, n_sink, prefix) of the masks of :mod:`lit_gpt.attention` (two
    models with a window of 64 share one block mask, windows of 64 and 128 never do); any other mask function is
    keyed by itself (the cache holds a reference, so its identity cannot be reused while it is cached)."""
    band = getattr(mask_fn, "band", None)
    return ("band",) + tuple(band) if band is not None else ("fn", mask_fn)


def block_mask_for(mask_fn: Callable, T: int, device: torch.device,
                   block_size: Optional[Union[int, Tuple[int, int]]] = None):
    """The block mask of ``mask_fn`` over T x T positions, from a small LRU (:data:`BLOCK_MASK_CACHE_SIZE` entries)
    keyed by (:func:`mask_key`, T, device). ``block_size``: (query, key) block of the mask (default 128 x 128, or
    the smallest power of two >= T for short sequences); a smaller key block wastes less of a partial block, e.g.
    the few sink columns of a Λ mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (mask_key(mask_fn) if block_size is None else (mask_key(mask_fn), block_size), T, str(device))
    if key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key]

    def mask_mod(b, h, q_idx, kv_idx):
        return mask_fn(q_idx, kv_idx)
    block = block_size or (128 if T >= 128 else max(16, 1 << (T - 1).bit_length()))
    _BLOCK_MASKS[key] = create_block_mask(mask_mod, None, None, T, T, device=str(device), BLOCK_SIZE=block)
    while len(_BLOCK_MASKS) > BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return _BLOCK_MASKS[key]


def merge_slots(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, scale: float,
                slot_k: Optional[torch.Tensor], slot_v: Optional[torch.Tensor],
                slot_logit: Optional[torch.Tensor], sink_k: Optional[torch.Tensor] = None,
                sink_v: Optional[torch.Tensor] = None, sink_add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Add extra key/value columns to a finished softmax over the token keys, exactly.

    With token output ``out`` and log-normaliser ``lse`` (B, H, T), and column logits s_m with values u_m
    (a sink logit: s = learned scalar, u = 0; a k* slot: s = q.k* * scale, u = v*; a sink key of the Λ mask:
    s = q.k_i * scale + sink_add (its position bias, -inf where the query does not see it), u = v_i):
        y = e^(lse - M) out + sum_m e^(s_m - M) u_m,   M = logsumexp(lse, s_1, ..., s_S).
    slot_k/slot_v (1|B, H, S, d); sink_k/sink_v (B, H, S, d) with sink_add (1|B, 1|H, T, S).
    """
    B, H, T, _ = q.shape
    f = torch.float64 if q.dtype == torch.float64 else torch.float32     # merge in fp32 (fp64 stays fp64)
    logits, values = [lse.to(f).unsqueeze(-1)], []
    if slot_logit is not None:
        logits.append(slot_logit.to(f).view(1, H, 1, 1).expand(B, H, T, 1))   # zero value: only renormalises
    # the few columns as broadcast products summed (not matmuls): compiled, each direction is one pass over q / out
    # with no fp32 copy of them in memory
    for k_cols, v_cols, add in ((slot_k, slot_v, None), (sink_k, sink_v, sink_add)):
        if k_cols is not None:
            s = (q.to(f).unsqueeze(-2) * k_cols.to(f).unsqueeze(-3)).sum(-1) * scale    # (B, H, T, S)
            logits.append(s if add is None else s + add.to(f))
            values.append(v_cols)
    w = torch.softmax(torch.cat(logits, dim=-1), dim=-1)                                 # (B, H, T, 1 + S)
    y = w[..., :1] * out.to(f)
    col = 1 if slot_logit is None else 2
    for v_cols in values:
        S = v_cols.shape[-2]
        y = y + (w[..., col:col + S].unsqueeze(-1) * v_cols.to(f).unsqueeze(-3)).sum(-2)
        col += S
    return y.to(out.dtype)


def _merge_fn(device: torch.device) -> Callable:
    """:func:`merge_slots`, compiled on CUDA (one fused kernel each way instead of a dozen fp32 passes over the
    (B, H, T, d) output, which would cost as much as the sparse attention itself at T = 16k)."""
    if device.type != "cuda":
        return merge_slots
    if "merge" not in _COMPILED:
        _COMPILED["merge"] = torch.compile(merge_slots)       # dynamic after a second shape
    return _COMPILED["merge"]


def split_sinks(mask_fn: Callable, T: int) -> Optional[Tuple[Callable, int, int]]:
    """For a Λ mask (sinks + window, :func:`lit_gpt.attention.sink_window_mask`, or any mask tagged with that band)
    over positions 0..T-1: (the window part, its window w, the number of sink columns that some query sees beyond
    its window). allowed(q, k) = [k <= q and q - k < w] or [k < n_sink and q - k >= w]: two disjoint sets, so the
    window runs block-sparse through Flex and the few sink columns join through the log-normaliser. The idea: in
    one Flex call the sink columns add a mostly masked key block to every query block. Measured on an H200 it does
    not pay (T = 16k: 0.356x of full causal split, 0.292x as one call; benchmarks/README.md, run 3), so it is
    opt-in (``flex_attention_forward(split_lambda=True)``). None for any other mask."""
    band = getattr(mask_fn, "band", None)
    if band is None or band[0] is None or not band[1] or band[2]:
        return None
    window, n_sink, _ = band
    part = getattr(mask_fn, "window_part", None)
    if part is None:                     # one function object per Λ mask: one cached block mask
        from lit_gpt.attention import window_mask
        part = mask_fn.window_part = window_mask(window)
    return part, window, max(0, min(n_sink, T - window))


def flex_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_fn: Callable, *,
                           scale: float, alpha: float = 1.0, alibi_slopes: Optional[torch.Tensor] = None,
                           rel_bias: Optional[Callable] = None, slot_k: Optional[torch.Tensor] = None,
                           slot_v: Optional[torch.Tensor] = None, slot_logit: Optional[torch.Tensor] = None,
                           split_lambda: bool = False,
                           block_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
    """Full-sequence softmax attention (positions 0..T-1) under ``mask_fn``; q (B,H,T,d), k/v (B,G,T,d).

    ALiBi and the T5 relative bias become score_mods; k*/v* slots and sink logits are merged exactly through the
    returned log-normaliser (:func:`merge_slots`), so none of them needs a dense T x T mask. A Λ mask (sinks +
    window) runs as one Flex call by default; ``split_lambda=True`` runs it as its window part plus the sink columns
    merged the same way (:func:`split_sinks`), opt-in because on an H200 it measured slower than the one call
    (benchmarks/README.md, run 3). ``block_size``: the block mask's (query, key) block (:func:`block_mask_for`),
    default 128 x 128; opt-in, for the benchmark's Λ rows.
    """
    T = q.shape[-2]
    split = split_sinks(mask_fn, T) if split_lambda else None
    n_sink = 0
    if split is not None:
        mask_fn, window, n_sink = split
    block_mask = block_mask_for(mask_fn, T, q.device, block_size)
    score_mod = None
    sink_add = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(device=q.device, dtype=torch.float32)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * (q_idx - kv_idx).abs()
    elif rel_bias is not None:
        table = rel_bias.offset_table(T, q.device)                       # (H|1, 2T - 1) bias by q - k
        per_head = table.shape[0] > 1

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[h if per_head else 0, q_idx - kv_idx + (T - 1)]
    sink_k = sink_v = None
    if n_sink:
        # the sink columns a query sees beyond its window: the same score_mod bias, -inf elsewhere
        qi = torch.arange(T, device=q.device).view(T, 1)
        ki = torch.arange(n_sink, device=q.device).view(1, n_sink)
        dist = qi - ki
        add = torch.zeros(1, 1, T, n_sink, device=q.device, dtype=torch.float64 if q.dtype == torch.float64
                          else torch.float32)
        if alibi_slopes is not None:
            add = add - slopes.view(1, -1, 1, 1) * dist.abs()
        elif rel_bias is not None:
            add = add + table[:, dist + (T - 1)].unsqueeze(0)
        sink_add = add.masked_fill(dist < window, float("-inf"))
        H = q.shape[1]
        sink_k, sink_v = repeat_kv(k[:, :, :n_sink], H), repeat_kv(v[:, :, :n_sink], H)
    need_lse = slot_k is not None or slot_logit is not None or n_sink > 0
    res = _flex_fn(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                             enable_gqa=k.shape[1] != q.shape[1], return_lse=need_lse)
    y = _merge_fn(q.device)(res[0], res[1], q, scale, slot_k, slot_v, slot_logit, sink_k, sink_v,
                            sink_add) if need_lse else res
    return y * alpha if alpha != 1.0 else y
