"""Reference maths for the streaming tests, written from the papers' definitions with explicit loops in float64.

A *plan* says, for the query at original position p, which keys it attends to and at which positions the query
and each key are encoded: ``plan(p) -> [(j, q_pos, k_pos), ...]``. RoPE rotates the query at q_pos and the key
at k_pos (their dot product depends on q_pos - k_pos only); ALiBi adds -slope * (q_pos - k_pos).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from reference import alibi_slope_list, rope_rotate

Plan = Callable[[int], List[Tuple[int, int, int]]]


# ---------------------------------------------------------------------------- the papers' definitions
def streamingllm_plan(start: int, recent: int) -> Plan:
    """StreamingLLM: the cache holds the first ``start`` tokens and the last ``recent`` ones (the query
    included); positions are the indices inside that cache, in order."""
    def plan(p):
        cache = sorted(set(range(min(start, p + 1))) | set(range(max(0, p - recent + 1), p + 1)))
        where = {j: i for i, j in enumerate(cache)}
        return [(j, where[p], where[j]) for j in cache]
    return plan


def lminfinite_plan(n_global: int, n_local: int, ceiling: int) -> Plan:
    """LM-Infinite: Λ mask (the first n_global tokens + the last n_local) and distance min(p - j, L)."""
    def plan(p):
        keys = [j for j in range(p + 1) if j < n_global or p - j < n_local]
        return [(j, j + min(p - j, ceiling), j) for j in keys]
    return plan


def lminfinite_middle(n_global: int, n_local: int) -> Callable[[int], List[int]]:
    """The middle tokens LM-Infinite's top-k may pick from: neither global nor local."""
    return lambda p: [j for j in range(p + 1) if j >= n_global and p - j >= n_local]


# ---------------------------------------------------------------------------- a llama-style GPT in loops
def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def _silu(x):
    return x / (1.0 + torch.exp(-x))


def ref_gpt_logits(model, idx: torch.Tensor, plan: Plan, *, topk: int = 0, topk_from_layer: int = 0,
                   middle: Optional[Callable[[int], List[int]]] = None, ceiling: int = 0) -> torch.Tensor:
    """Logits (B, T, V) of our GPT (pre-norm RMSNorm, SwiGLU, no biases; rope / alibi / nope) where the query
    at position p attends to ``plan(p)``; with ``topk`` (layers >= topk_from_layer) it also attends, per head,
    to the ``topk`` keys of ``middle(p)`` with the largest logits at distance ``ceiling``."""
    cfg = model.config
    assert cfg.norm_class == "rmsnorm" and cfg.norm_position == "pre" and cfg.mlp == "swiglu" and not cfg.bias
    B, T = idx.shape
    H, G, d = cfg.n_head, cfg.n_query_groups, cfg.head_size
    n_rot = cfg.rope_n_elem
    slopes = alibi_slope_list(H) if cfg.pos_encoding == "alibi" else None

    def enc(vec, pos):
        return rope_rotate(vec, pos, n_rot, cfg.rope_base) if cfg.pos_encoding == "rope" else vec.double()

    def bias(h, dist):
        return -slopes[h] * dist if slopes is not None else 0.0

    x = model.wte.weight.double()[idx]
    for li, block in enumerate(model.blocks):
        attn = block.attn
        hdn = _rms(x, block.norm_1.weight, cfg.norm_eps)
        W = attn.qkv.weight.double()
        q = (hdn @ W[: H * d].T).view(B, T, H, d)
        k = (hdn @ W[H * d:(H + G) * d].T).view(B, T, G, d)
        v = (hdn @ W[(H + G) * d:].T).view(B, T, G, d)
        y = torch.zeros(B, T, H, d, dtype=torch.float64)
        use_topk = topk > 0 and li >= topk_from_layer
        for b in range(B):
            for h in range(H):
                g = h // (H // G)
                for p in range(T):
                    scores, vals = [], []
                    for j, qp, kp in plan(p):
                        scores.append(float(enc(q[b, p, h], qp) @ enc(k[b, j, g], kp)) / math.sqrt(d)
                                      + bias(h, qp - kp))
                        vals.append(v[b, j, g])
                    if use_topk:
                        mids = [(float(enc(q[b, p, h], j + ceiling) @ enc(k[b, j, g], j)) / math.sqrt(d)
                                 + bias(h, ceiling), j) for j in middle(p)]
                        for sc, j in sorted(mids, reverse=True)[:topk]:
                            scores.append(sc)
                            vals.append(v[b, j, g])
                    s = torch.tensor(scores, dtype=torch.float64)
                    w = torch.exp(s - s.max())
                    w = w / w.sum()
                    y[b, p, h] = sum(wi * vi for wi, vi in zip(w, vals))
        x = x + y.reshape(B, T, H * d) @ attn.proj.weight.double().T
        hdn = _rms(x, block.norm_2.weight, cfg.norm_eps)
        fc = block.mlp.fc.weight.double()
        n = cfg.intermediate_size
        x = x + (_silu(hdn @ fc[:n].T) * (hdn @ fc[n:].T)) @ block.mlp.proj.weight.double().T
    x = _rms(x, model.ln_f.weight, cfg.norm_eps)
    return x @ model.lm_head.weight.double().T
