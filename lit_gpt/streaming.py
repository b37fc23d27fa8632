"""Streaming attention over unbounded input: attention sinks + a recent window (StreamingLLM, Xiao et al. 2023)
and LM-Infinite's Λ-shaped attention with a distance ceiling (Han et al. 2024). One implementation of the cache
bookkeeping and of the attention over it serves our GPT (:class:`StreamingCache`) and Hugging Face models
(:mod:`lit_gpt.hf_streaming`).

The cache (:class:`SinkWindowKV`, one per layer)
-------------------------------------------------
``start_size`` sink slots hold the first tokens forever; ``recent_size`` ring slots hold the last tokens
(token at position p lives in ring slot p mod recent_size and is overwritten in place by p + recent_size: no
copy per token). The query at position p attends to

* every token j with p - j < recent_size (the recent window, itself included), from the ring and the chunk;
* every sink i < start_size that has left the window (p - i >= recent_size);

so a full cache holds start_size + recent_size keys, the query's own key included (StreamingLLM's "4 + 252"
is a 256-key cache). Rows of a batch carry their own positions; a negative position marks padding (not
written, its output is finite and meaningless).

Position policies (``StreamingSpec.policy``)
--------------------------------------------
* ``reindex`` (StreamingLLM): positions are re-indexed inside the cache: sinks at 0..s-1, the recent tokens
  after them, the query last. For a recent key j the distance p - j is unchanged, so ring keys keep the
  rotation of their original position; only the distance to sink i changes, to min(p, s + r - 1) - i.
* ``lminfinite`` (LM-Infinite): original positions with a distance ceiling L = ``max_distance`` (L_pretrain,
  default recent_size): sink ("global") keys are stored un-rotated (position 0) and the query that sees them is
  rotated to min(p, L), i.e. every key beyond the local window is at distance L (the reference code's
  "stationary" branch). Optional: ``topk`` middle tokens (keys neither global nor local), from layer
  ``topk_from_layer`` on (the paper's k=5 from layer 4, for retrieval): the k with the largest logits when
  placed at distance ``topk_insert_at`` (LM-Infinite's ``top_k_insert_at``; default L // 2, i.e. its 2048 for
  Llama-2's L = 4096), attended at that distance, and only once at least k middle tokens exist (LM-Infinite's
  ``col_high >= global_branch + top_k_attention``); this keeps all keys (O(n) cache memory), the Λ part stays
  O(s + r). Unlike LM-Infinite, which applies top-k to the last query of a forward call only, every query
  gets it, so chunked prefill equals token-by-token.
* ``original``: no re-indexing, no ceiling (ablation; the only policy for absolute position embeddings).

So both policies have the same two-group structure: sink keys at key position g(i) (i, or 0 for LM-Infinite)
seen by the query at f(p) (min(p, s+r-1), min(p, L), or p), and local keys at their positions seen by the query
at p. With RoPE this is done without re-rotating the cache: for one query per row (decoding) the s sink keys
are re-rotated by p - f(p) into their slots (O(start_size) work per step, rotation is orthogonal so
q_f . k = q_p . R(p - f) k); for several queries (chunked prefill) one fused SDPA call takes
[q rotated to f(p) | q] on a doubled head dim against [k_sink | 0] and [0 | k_local] keys. ALiBi / T5
biases take (f(p), g(i)) and (p, j) as their positions. Chunked prefill attends over [ring, chunk] before
writing the chunk, so any chunk length gives the token-by-token result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from lit_gpt.attention import AttentionOp, MaskFn, eager_attention, prepend_slots, repeat_kv, sdpa_attention
from lit_gpt.config import SCORE_BIAS_POSITIONS
from lit_gpt.positional import apply_rope, rope_cos_sin, rope_inv_freq
from lit_gpt.utils import invalid_choice

POLICIES = ("reindex", "original", "lminfinite")
STATIC_ATTENTION = ("sdpa", "matmul")                # softmax of a graph-safe decoding step (enter_static)
FEATURE_MAP_OPS = ("elu_kernel", "mlp_kernel")      # phi(q).phi(k): the rotation cannot move to the key side


def _bad(name: str, value: Any, allowed: Union[str, Iterable[Any]]) -> ValueError:
    return ValueError(invalid_choice(f"StreamingSpec.{name}", value, allowed))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class StreamingSpec:
    """What a streaming cache keeps and how it positions the keys (see the module docstring)."""

    start_size: int = 4                    # sinks (LM-Infinite's n_global)
    recent_size: int = 252                 # recent window, the query itself included (LM-Infinite's n_local)
    policy: str = "reindex"                # reindex | original | lminfinite
    max_distance: Optional[int] = None     # lminfinite: L_pretrain, the distance ceiling (default recent_size)
    topk: int = 0                          # lminfinite: middle tokens attended per query and head (0 = off)
    topk_from_layer: int = 4               # ... in layers with index >= this (0-based)
    topk_insert_at: Optional[int] = None   # ... placed at this distance from the query (default ceiling // 2)

    def __post_init__(self) -> None:
        if not _is_int(self.start_size) or self.start_size < 0:
            raise _bad("start_size", self.start_size, "an integer >= 0")
        if not _is_int(self.recent_size) or self.recent_size < 1:
            raise _bad("recent_size", self.recent_size, "an integer >= 1 (the query sees itself)")
        if self.policy not in POLICIES:
            raise _bad("policy", self.policy, POLICIES)
        if self.max_distance is not None:
            if self.policy != "lminfinite":
                raise _bad("max_distance", self.max_distance,
                           f"null unless policy='lminfinite' (policy={self.policy!r})")
            if not _is_int(self.max_distance) or self.max_distance < 1:
                raise _bad("max_distance", self.max_distance, "a positive integer (L_pretrain)")
        if not _is_int(self.topk) or self.topk < 0:
            raise _bad("topk", self.topk, "an integer >= 0")
        if self.topk and self.policy != "lminfinite":
            raise _bad("topk", self.topk, f"0 unless policy='lminfinite' (policy={self.policy!r})")
        if not _is_int(self.topk_from_layer) or self.topk_from_layer < 0:
            raise _bad("topk_from_layer", self.topk_from_layer, "an integer >= 0")
        if self.topk_insert_at is not None:
            if not self.topk:
                raise _bad("topk_insert_at", self.topk_insert_at, "null unless topk > 0")
            if not _is_int(self.topk_insert_at) or self.topk_insert_at < 0:
                raise _bad("topk_insert_at", self.topk_insert_at, "an integer >= 0 (a query-key distance)")

    @property
    def cache_size(self) -> int:
        return self.start_size + self.recent_size

    @property
    def ceiling(self) -> int:
        return self.max_distance if self.max_distance is not None else self.recent_size

    @property
    def insert_at(self) -> int:
        """The distance at which top-k middle tokens are scored and attended (LM-Infinite's top_k_insert_at)."""
        return self.topk_insert_at if self.topk_insert_at is not None else self.ceiling // 2

    def sink_query_pos(self, p: torch.Tensor) -> torch.Tensor:
        """f(p): the position of the query when it looks at sink keys."""
        if self.policy == "reindex":
            return p.clamp(max=self.cache_size - 1)
        if self.policy == "lminfinite":
            return p.clamp(max=self.ceiling)
        return p

    def sink_key_pos(self, i: torch.Tensor) -> torch.Tensor:
        """g(i): the position a sink key is stored at (0 = un-rotated for LM-Infinite)."""
        return torch.zeros_like(i) if self.policy == "lminfinite" else i

    def key_distance(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The distance at which the query at original position q_pos sees the key at k_pos under this policy:
        q_pos - k_pos inside the recent window, f(q_pos) - g(k_pos) beyond it (sinks, LM-Infinite's middle
        tokens). A model's own sliding window (Gemma-3, Mistral, ...) is applied to this distance, so that
        ``reindex`` equals the model's own forward over the cache content."""
        d = q_pos - k_pos
        return torch.where(d < self.recent_size, d, self.sink_query_pos(q_pos) - self.sink_key_pos(k_pos))

    def window_mask(self, window: int) -> MaskFn:
        """The model's sliding window of ``window`` keys (the query itself included) at :meth:`key_distance`."""
        return lambda q_pos, k_pos: (k_pos <= q_pos) & (self.key_distance(q_pos, k_pos) < window)

    def uses_topk(self, layer_idx: int) -> bool:
        return self.topk > 0 and layer_idx >= self.topk_from_layer

    def describe(self) -> str:
        s = f"{self.policy} sinks={self.start_size} recent={self.recent_size}"
        if self.policy == "lminfinite":
            s += f" L={self.ceiling}" + (f" topk={self.topk}@layer>={self.topk_from_layer} at distance "
                                          f"{self.insert_at}" if self.topk else "")
        return s


def dense_spec(max_len: int) -> StreamingSpec:
    """A ring that never wraps: plain dense causal attention over up to ``max_len`` tokens (supports padding)."""
    return StreamingSpec(start_size=0, recent_size=max_len, policy="original")


@dataclass
class PositionOps:
    """How a model encodes positions, as far as the streaming attention needs to know.

    kind: ``rope`` (on the first 2*len(inv_freq) dims), ``bias`` (additive score bias
    ``bias_fn(q_pos (B|1, Tq), k_pos (B|1, Tk)) -> (B|1, H, Tq, Tk)``), ``none`` (NoPE) or ``absolute``
    (added to the input embedding; only the ``original`` policy is meaningful). ``layout`` of the RoPE pairs:
    ``half`` (dims i and i + n/2, Llama / NeoX) or ``interleaved`` (dims 2i and 2i + 1, GPT-J / Cohere / GLM).
    """

    kind: str
    inv_freq: Optional[torch.Tensor] = None
    bias_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    layout: str = "half"

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """RoPE of x (B, heads, T, d) by integer offsets ``delta`` (B|1, T); identity unless kind == 'rope'."""
        if self.kind != "rope":
            return x
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = rope_cos_sin(delta, self.inv_freq, dtype)
        if self.layout == "half":
            return apply_rope(x, cos.unsqueeze(1), sin.unsqueeze(1))
        n = cos.shape[-1]                       # interleaved: rotate in the half layout, then put the dims back
        perm = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)]).to(x.device)
        out = x.clone()
        out[..., perm] = apply_rope(x[..., perm], cos.unsqueeze(1), sin.unsqueeze(1))
        return out


# ---------------------------------------------------------------------------- the cache
class SinkWindowKV:
    """One layer's sink + recent-window keys/values and the attention over them.

    Buffers (allocated on first use, batch size fixed until :meth:`reset`):
      k, v    (B, G, s + r, d): slots [0, s) sinks (for decoding: sink keys rotated for the current query),
              [s, s + r) the ring (keys rotated at their original positions);
      pos     (B, s + r): original position of each slot, -1 = empty;
      sink_k  (B, G, s, d): sink keys rotated at g(i) (never modified after writing);
      mid_k/v (B, G, N, d), mid_pos: only with top-k: every token's un-rotated key, indexed by position.
    """

    def __init__(self, spec: StreamingSpec, layer_idx: int = 0) -> None:
        self.spec = spec
        self.layer_idx = layer_idx
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.pos: Optional[torch.Tensor] = None
        self.sink_k: Optional[torch.Tensor] = None
        self.mid_k: Optional[torch.Tensor] = None
        self.mid_v: Optional[torch.Tensor] = None
        self.mid_pos: Optional[torch.Tensor] = None
        self.filled = 0                 # ring slots used so far (attention never looks past them)
        self.static = False             # graph-safe decoding (see :meth:`enter_static`)
        self.static_attention = "sdpa"

    @property
    def topk(self) -> bool:
        return self.spec.uses_topk(self.layer_idx)

    def reset(self) -> None:
        """Empty the cache (keeps the allocation)."""
        if self.pos is not None:
            self.pos.fill_(-1)
        self.mid_k = self.mid_v = self.mid_pos = None
        self.filled = 0
        self.static = False

    def enter_static(self, attention: str = "sdpa") -> None:
        """Decode steps (one token per row) without a host synchronisation or a shape that depends on the data,
        so that a step can be captured as a CUDA graph and replayed (:class:`GraphDecoder`): the token is written to
        its ring slot by a device-side index write (kept in place under torch.compile) and attention looks at all
        s + r slots (empty ones are masked).
        Needs allocated buffers and every decoded position >= start_size (the sinks are written already).
        ``attention`` of a softmax step: ``matmul`` (two batched matrix products around a masked softmax, spread
        over the whole GPU) or ``sdpa`` (with a mask SDPA takes its memory-efficient kernel, one thread block per
        row and head for a single query)."""
        if attention not in STATIC_ATTENTION:
            raise ValueError(invalid_choice("attention", attention, STATIC_ATTENTION))
        if self.k is None:
            raise ValueError("enter_static() needs a filled cache: prefill at least start_size tokens first")
        self.static = True
        self.static_attention = attention
        self.filled = self.spec.recent_size

    def nbytes(self) -> int:
        ts = (self.k, self.v, self.pos, self.sink_k, self.mid_k, self.mid_v, self.mid_pos)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def allocate(self, B: int, G: int, d: int, dv: int, dtype: torch.dtype, device: torch.device) -> None:
        s, S = self.spec.start_size, self.spec.cache_size
        if self.k is not None and self.k.shape[0] == B and self.k.shape[1] == G and self.k.shape[-1] == d \
                and self.v.shape[-1] == dv and self.k.dtype == dtype and self.k.device == device:
            return
        if self.pos is not None and bool((self.pos >= 0).any()):
            raise ValueError(f"batch/heads/dtype changed from {tuple(self.k.shape)} {self.k.dtype} to "
                             f"{(B, G, S, d)} {dtype} on a non-empty streaming cache: reset() it first")
        self.k = torch.zeros(B, G, S, d, dtype=dtype, device=device)
        self.v = torch.zeros(B, G, S, dv, dtype=dtype, device=device)
        self.pos = torch.full((B, S), -1, dtype=torch.long, device=device)
        self.sink_k = torch.zeros(B, G, s, d, dtype=dtype, device=device)

    # -- writes
    def _write_sinks(self, k, v, p, valid, ops: PositionOps) -> None:
        m = valid & (p < self.spec.start_size)
        if not bool(m.any()):
            return
        b, t = m.nonzero(as_tuple=True)
        slot = p[b, t]
        ks = k[b, :, t]                                           # (N, G, d)
        delta = self.spec.sink_key_pos(slot) - slot
        if ops.kind == "rope" and bool((delta != 0).any()):
            ks = ops.rotate(ks.unsqueeze(2), delta.unsqueeze(1)).squeeze(2)
        self.sink_k[b, :, slot] = ks.to(self.sink_k.dtype)
        self.k[b, :, slot] = ks.to(self.k.dtype)
        self.v[b, :, slot] = v[b, :, t].to(self.v.dtype)
        self.pos[b, slot] = slot

    def _write_ring(self, k, v, p, valid) -> None:
        s, r = self.spec.start_size, self.spec.recent_size
        last = torch.where(valid, p, torch.full_like(p, -1)).max(dim=1, keepdim=True).values
        m = valid & (p > last - r)                                # only the last r tokens of each row survive
        if not bool(m.any()):
            return
        b, t = m.nonzero(as_tuple=True)
        pp = p[b, t]
        slot = s + pp % r
        self.k[b, :, slot] = k[b, :, t].to(self.k.dtype)
        self.v[b, :, slot] = v[b, :, t].to(self.v.dtype)
        self.pos[b, slot] = pp
        self.filled = max(self.filled, min(r, int(pp.max()) + 1))

    def _write_ring_static(self, k, v, p, valid) -> None:
        """One token per row (T = 1) into ring slot s + p mod r, on the device (padding rows keep the slot)."""
        s, r = self.spec.start_size, self.spec.recent_size
        B = k.shape[0]
        slot = s + p.clamp(min=0) % r                              # (B, 1)
        rows = torch.arange(B, device=k.device).view(B, 1)
        keep = valid.view(B, 1, 1)
        for buf, new in ((self.k, k), (self.v, v)):                # buf[b, :, slot[b]] (B, 1, G, d): advanced first
            buf[rows, :, slot] = torch.where(keep.unsqueeze(-1), new.transpose(1, 2).to(buf.dtype), buf[rows, :, slot])
        self.pos[rows, slot] = torch.where(valid, p, self.pos[rows, slot])

    def _write_middle(self, k, v, p, valid, ops: PositionOps) -> None:
        B, G, _, d = k.shape
        need = int(p.max()) + 1
        if self.mid_k is None or self.mid_k.shape[2] < need:
            cap = max(need, 2 * (0 if self.mid_k is None else self.mid_k.shape[2]), 64)
            mk = k.new_zeros(B, G, cap, d)
            mv = v.new_zeros(B, G, cap, v.shape[-1])
            mp = torch.full((B, cap), -1, dtype=torch.long, device=k.device)
            if self.mid_k is not None:
                n = self.mid_k.shape[2]
                mk[:, :, :n], mv[:, :, :n], mp[:, :n] = self.mid_k, self.mid_v, self.mid_pos
            self.mid_k, self.mid_v, self.mid_pos = mk, mv, mp
        if not bool(valid.any()):
            return
        b, t = valid.nonzero(as_tuple=True)
        pp = p[b, t]
        ks = ops.rotate(k[b, :, t].unsqueeze(2), (-pp).unsqueeze(1)).squeeze(2)   # un-rotated ("position 0")
        self.mid_k[b, :, pp] = ks
        self.mid_v[b, :, pp] = v[b, :, t]
        self.mid_pos[b, pp] = pp

    # -- attention
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, ops: PositionOps, *,
               scale: float, op: str = "softmax", normalize: bool = True, alpha: float = 1.0,
               kernel: Optional[Callable] = None, slot_k: Optional[torch.Tensor] = None,
               slot_v: Optional[torch.Tensor] = None, slot_logit: Optional[torch.Tensor] = None,
               mask_fn: Optional[MaskFn] = None, need_weights: bool = False
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attend q (B, H, T, d) over the cache plus this chunk's k, v (B, G, T, d), then store the chunk.

        q and k arrive rotated at their original positions ``pos`` (B|1, T) (RoPE models). ``mask_fn`` (the
        model's own mask in original positions, causality included; plain causal when None) decides which of the
        keys the policy keeps a query sees (a prefix LM's bidirectional prefix in a dense cache, a model's
        window). Returns (B, H, T, dv) and the attention map over columns [extra slots][sinks][ring slots used so
        far][chunk] when ``need_weights``.
        """
        spec = self.spec
        s, r = spec.start_size, spec.recent_size
        B, H, T, d = q.shape
        G, dv = k.shape[1], v.shape[-1]
        p = pos.to(q.device).long().expand(B, T)
        valid = p >= 0
        self.allocate(B, G, d, dv, k.dtype, k.device)
        single = T == 1 and not self.topk and op not in FEATURE_MAP_OPS
        static = single and self.static
        if not static:
            self._write_sinks(k, v, p, valid, ops)
        if self.topk:
            if op != "softmax":
                raise ValueError(f"StreamingSpec.topk={spec.topk} needs softmax attention (attn_op={op!r})")
            self._write_middle(k, v, p, valid, ops)
        fq = spec.sink_query_pos(p)
        rotate_sinks = ops.kind == "rope" and spec.policy != "original" and s > 0
        phi = kernel if op in FEATURE_MAP_OPS else None
        if single:
            # decoding: write first (slot p mod r held p - r, which this query no longer sees), then rotate the
            # s sink keys for this query: q_{f(p)} . k_i == q_p . R(p - f(p)) k_i
            if static:
                self._write_ring_static(k, v, p, valid)
            else:
                self._write_ring(k, v, p, valid)
            if rotate_sinks:         # an index write: torch.compile keeps it in place (a slice write copies the cache)
                self.k[:, :, torch.arange(s, device=q.device)] = ops.rotate(self.sink_k, (p - fq).expand(B, s)).to(
                    self.k.dtype)
            n = s + self.filled
            qq, keys, vals, kp = q, self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :n]
            sk = slot_k
        else:
            n = s + self.filled
            k_loc = torch.cat([self.k[:, :, s:n], k.to(self.k.dtype)], dim=2)
            vals = torch.cat([self.v[:, :, :n], v.to(self.v.dtype)], dim=2)
            kp = torch.cat([self.pos[:, :n], p], dim=1)
            k_sink = self.sink_k
            if phi is not None:
                k_sink, k_loc = phi(k_sink), phi(k_loc)
            if rotate_sinks:
                q_far = ops.rotate(q, fq - p)
                if phi is not None:
                    q_far, q = phi(q_far), phi(q)
                qq = torch.cat([q_far, q], dim=-1)
                keys = torch.cat([torch.cat([k_sink, torch.zeros_like(k_sink)], -1),
                                  torch.cat([torch.zeros_like(k_loc), k_loc], -1)], dim=2)
            else:
                qq = phi(q) if phi is not None else q
                keys = torch.cat([k_sink, k_loc], dim=2)
            sk = slot_k
            if sk is not None and phi is not None:
                sk = phi(sk)
            if sk is not None and rotate_sinks:
                sk = torch.cat([torch.zeros_like(sk), sk], dim=-1)    # slots pair with the query at p
        # visibility: sinks once they left the window, everything else inside the window
        S = kp.shape[1]
        is_sink = (torch.arange(S, device=q.device) < s).view(1, 1, S)
        qp, kq = p.unsqueeze(-1), kp.unsqueeze(-2)
        near = (qp - kq) < r
        allowed = mask_fn(qp, kq) if mask_fn is not None else kq <= qp
        vis = (kq >= 0) & torch.where(is_sink, ~near, near) & allowed
        vis = vis | ~valid.unsqueeze(-1)                          # padding queries: anything finite
        bias = None
        if ops.kind == "bias":
            b_sink = ops.bias_fn(fq, spec.sink_key_pos(kp[:, :s])).expand(B, -1, -1, -1)
            b_loc = ops.bias_fn(p, kp[:, s:]).expand(B, -1, -1, -1)
            bias = torch.cat([b_sink, b_loc], dim=-1)
        if self.topk:
            y, w = self._attend_topk(qq, keys, vals, vis, bias, q, p, ops, scale, alpha, sk, slot_v,
                                     slot_logit, mask_fn, need_weights)
        elif static and op == "softmax" and not need_weights and self.static_attention == "matmul":
            y = _decode_attention(qq, keys, vals, vis.unsqueeze(1), scale=scale, bias=bias, alpha=alpha, slot_k=sk,
                                  slot_v=slot_v, slot_logit=slot_logit)
            w = None
        elif op == "softmax" and not need_weights:
            y = sdpa_attention(qq, keys, vals, mask=vis.unsqueeze(1), scale=scale, bias=bias, alpha=alpha,
                               slot_k=sk, slot_v=slot_v, slot_logit=slot_logit)
            w = None
        else:
            y, w = eager_attention(qq, keys, vals, mask=vis.unsqueeze(1), op=op, normalize=normalize, alpha=alpha,
                                   scale=scale, bias=bias, slot_k=sk, slot_v=slot_v, slot_logit=slot_logit,
                                   kernel=(lambda t: t) if phi is not None else kernel, need_weights=need_weights)
        if not single:
            self._write_ring(k, v, p, valid)
        return y, w

    def _attend_topk(self, qq, keys, vals, vis, bias, q, p, ops, scale, alpha, slot_k, slot_v, slot_logit,
                     mask_fn, need_weights):
        """Λ attention plus, per query and head, the top-k middle keys by their logit at distance ``insert_at``."""
        s, r, topk = self.spec.start_size, self.spec.recent_size, self.spec.topk
        B, H, T, _ = q.shape
        kr, vr = repeat_kv(keys, H), repeat_kv(vals, H)
        kr, vr, mask, bias, _ = prepend_slots(kr, vr, vis.unsqueeze(1).expand(B, H, -1, -1), bias,
                                              slot_k, slot_v, slot_logit)
        scores = (qq @ kr.transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        scores = scores.masked_fill(~mask, float("-inf"))
        d_ins = torch.full_like(p, self.spec.insert_at)
        q_ins = ops.rotate(q, d_ins - p)                          # the query at insert_at vs un-rotated keys
        mk, mv, mpos = repeat_kv(self.mid_k, H), repeat_kv(self.mid_v, H), self.mid_pos
        mid = (q_ins @ mk.transpose(-1, -2)) * scale              # (B, H, T, N)
        if ops.kind == "bias":
            mid = mid + ops.bias_fn(d_ins, torch.zeros_like(mpos)).to(mid.dtype)
        qp, kq = p.unsqueeze(-1), mpos.unsqueeze(-2)
        cand = (kq >= s) & (kq <= qp) & (qp - kq >= r)
        if mask_fn is not None:
            cand = cand & mask_fn(qp, kq)
        cand = cand & (cand.sum(-1, keepdim=True) >= topk)        # LM-Infinite: no top-k before k candidates exist
        mid = mid.masked_fill(~cand.unsqueeze(1), float("-inf"))
        kk = min(topk, mid.shape[-1])
        top, idx = mid.topk(kk, dim=-1)                           # (B, H, T, kk); -inf where no candidates
        w = torch.softmax(torch.cat([scores, top], dim=-1), dim=-1)
        n_main = scores.shape[-1]
        dv = mv.shape[-1]
        picked = torch.gather(mv.unsqueeze(2).expand(B, H, T, mv.shape[2], dv), 3,
                              idx.unsqueeze(-1).expand(B, H, T, kk, dv))
        y = w[..., :n_main] @ vr + (w[..., n_main:].unsqueeze(-1) * picked).sum(-2)
        if alpha != 1.0:
            y = y * alpha                                         # the map stays the unscaled distribution
        return y, (w if need_weights else None)


def _decode_attention(q, keys, vals, mask, *, scale, bias, alpha, slot_k, slot_v, slot_logit) -> torch.Tensor:
    """Softmax attention of one query per row (B, H, 1, d) over the cache (B, G, S, d) as plain matrix products
    (:func:`lit_gpt.attention.eager_attention`); with grouped queries and nothing per head (slots, bias) the H / G
    query heads of a group become rows of one product, so the cache is not copied per step."""
    B, H, _, d = q.shape
    G = keys.shape[1]
    if G != H and slot_k is None and slot_logit is None and bias is None:
        y, _ = eager_attention(q.reshape(B, G, H // G, d), keys, vals, mask=mask, scale=scale, alpha=alpha)
        return y.reshape(B, H, 1, vals.shape[-1])
    return eager_attention(q, keys, vals, mask=mask, scale=scale, bias=bias, alpha=alpha, slot_k=slot_k,
                           slot_v=slot_v, slot_logit=slot_logit)[0]


# ---------------------------------------------------------------------------- our GPT
def gpt_position_ops(config, bias_fn: Optional[Callable] = None, device=None) -> PositionOps:
    pe = config.pos_encoding
    if pe == "rope":
        return PositionOps("rope", inv_freq=rope_inv_freq(config.rope_n_elem, config.rope_base, device=device))
    if pe in SCORE_BIAS_POSITIONS:
        return PositionOps("bias", bias_fn=bias_fn)
    if pe == "nope":
        return PositionOps("none")
    return PositionOps("absolute")


def check_streaming_config(spec: StreamingSpec, config) -> None:
    """One-line errors for the combinations of model config and streaming spec that have no meaning."""
    pe = config.pos_encoding
    if pe in ("learned", "sinusoidal") and spec.policy != "original":
        raise ValueError(f"StreamingSpec.policy={spec.policy!r} is invalid with pos_encoding={pe!r}; allowed: "
                         "'original' (absolute positions are added to the token embedding, so cached keys can be "
                         "neither re-indexed nor given a distance ceiling)")
    if config.attn_mask == "prefix":
        raise ValueError("Config.attn_mask='prefix' is invalid for streaming; allowed: causal, window "
                         "(a bidirectional prefix cannot be processed chunk by chunk from a cache)")
    if spec.topk and config.attn_op != "softmax":
        raise ValueError(f"StreamingSpec.topk={spec.topk} is invalid with attn_op={config.attn_op!r}; allowed: "
                         "0, or attn_op='softmax' (top-k joins the softmax)")


class StreamingCache(nn.Module):
    """Our GPT's per-layer cache, the one cache protocol of the model (``CausalSelfAttention.forward`` calls
    :meth:`attend`): sink + window keys (:class:`SinkWindowKV`) and the attention over them. A dense cache
    (``GPT.set_kv_cache``) is one whose ring never wraps (:func:`dense_spec`) with ``max_positions`` set: a position
    past it is refused instead of evicting. ``config`` gives the positional encoding (:func:`gpt_position_ops`)."""

    def __init__(self, spec: StreamingSpec, config, layer_idx: int = 0, max_positions: Optional[int] = None) -> None:
        super().__init__()
        self.spec, self.config, self.max_positions = spec, config, max_positions
        self.kv = SinkWindowKV(spec, layer_idx)

    def attend(self, q, k, v, pos, op: AttentionOp, *, mask_fn: Optional[MaskFn] = None,
               bias_fn: Optional[Callable] = None, need_weights: bool = False):
        """q (B, H, T, d), k/v (B, G, T, d) rotated at their positions ``pos`` (B|1, T) (negative = padding),
        ``op`` the layer's operation, ``mask_fn`` / ``bias_fn`` the model's mask and score bias over positions.
        Returns (B, H, T, d) and the map when ``need_weights`` (see :meth:`SinkWindowKV.attend`)."""
        if self.max_positions is not None and int(pos.max()) >= self.max_positions:
            raise ValueError(f"input_pos out of range: max {int(pos.max())}, cache holds positions "
                             f"[0, {self.max_positions})")
        ops = gpt_position_ops(self.config, bias_fn, device=q.device)
        return self.kv.attend(q, k, v, pos, ops, scale=op.scale, op=op.op, normalize=op.normalize, alpha=op.alpha,
                              kernel=op.feature_map, mask_fn=mask_fn, need_weights=need_weights, **op.slots())

    def forward(self, k, v, pos):  # pragma: no cover - the model calls attend()
        raise TypeError("StreamingCache computes attention itself (attend()); it does not return keys/values")

    def reset(self) -> None:
        self.kv.reset()

    def nbytes(self) -> int:
        return self.kv.nbytes()


def install_streaming(model, spec: StreamingSpec) -> List[StreamingCache]:
    """Give every layer of our GPT a fresh streaming cache; returns them (``model.clear_kv_cache()`` removes)."""
    check_streaming_config(spec, model.config)
    caches = [StreamingCache(spec, model.config, i) for i in range(len(model.blocks))]
    model.set_caches(caches)
    return caches
