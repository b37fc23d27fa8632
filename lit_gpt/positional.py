"""Positional encodings behind one interface.

All functions take *positions* (integer tensors), not sequence indices, so that the same code serves a
full forward, a KV cache indexed by input positions, and streaming caches whose slots hold arbitrary
positions.

* RoPE (rotate-half layout, as litgpt / Hugging Face Llama), optionally on the first ``rotary_percentage``
  of the head dims: :func:`rope_cos_sin` + :func:`apply_rope`.
* sinusoidal absolute (Vaswani et al.) and learned absolute: added to the token embedding.
* ALiBi: additive bias ``-slope_h * |q_pos - k_pos|``.
* T5 relative bias, 32 log-spaced buckets up to distance 128: ``relative`` adds the fixed bucket index
  g(i - j) itself to the logits, with no parameters (the paper's Appendix B eq. 6 and the seed's
  ``model_relpos.py``); ``relative_learned`` looks a learned scalar per (bucket, head) up (T5's own form).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn


# ---------------------------------------------------------------------------- RoPE
def rope_inv_freq(n_elem: int, base: float, device=None) -> torch.Tensor:
    """Inverse frequencies base^(-2i/n) in float64."""
    return 1.0 / (base ** (torch.arange(0, n_elem, 2, device=device, dtype=torch.float64) / n_elem))


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape ``pos.shape + (n_elem,)``. Angles are formed in float64 so that long streams
    (positions of 10^5 and more) keep their precision, then cast to ``dtype`` (float32 by default)."""
    angles = pos.to(torch.float64).unsqueeze(-1) * inv_freq.to(device=pos.device, dtype=torch.float64)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` (B, H, T, d); cos/sin broadcast as (B|1, 1|H, T, n)."""
    n = cos.shape[-1]
    xr, xp = (x[..., :n], x[..., n:]) if n < x.shape[-1] else (x, None)
    xf = xr if xr.dtype == torch.float64 else xr.float()    # rotate in fp32 (fp64 stays fp64)
    half = n // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    out = (xf * cos.to(xf.dtype) + rotated * sin.to(xf.dtype)).to(x.dtype)
    return out if xp is None else torch.cat([out, xp], dim=-1)


# ---------------------------------------------------------------------------- absolute
def sinusoidal_embedding(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. sin/cos absolute encoding of shape ``pos.shape + (dim,)`` (float32)."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    angles = pos.to(torch.float32).unsqueeze(-1) * freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


# ---------------------------------------------------------------------------- ALiBi
def alibi_slopes(n_head: int) -> torch.Tensor:
    """Head slopes of Press et al.: geometric 2^(-8/n) for a power of two, interleaved otherwise."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = power_of_2(n_head)
    else:
        closest = 2 ** math.floor(math.log2(n_head))
        slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(q_pos: torch.Tensor, k_pos: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """``-slope_h * |q - k|`` with q_pos (B|1, Tq), k_pos (B|1, Tk) -> (B|1, H, Tq, Tk) float32.
    (The attention functions cast it to the score dtype.)"""
    dist = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).abs().to(torch.float64)      # (B, Tq, Tk)
    return (-slopes.to(device=dist.device, dtype=torch.float64).view(1, -1, 1, 1) * dist.unsqueeze(1)).float()


# ---------------------------------------------------------------------------- T5 relative
def relative_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    """T5's bucketing of ``rel = k_pos - q_pos``: exact for small distances, log-spaced up to max_distance."""
    ret = torch.zeros_like(rel)
    n = -rel
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    val_large = val_large.clamp(max=num_buckets - 1)
    return ret + torch.where(is_small, n, val_large)


class RelativePositionBias(nn.Module):
    """T5 relative position bias over ``relative_bucket`` of the query-key distance, one for the whole model.

    ``learned=False`` (``pos_encoding='relative'``, the paper and the seed): the bias is the bucket index
    g(max(i - j, 0)) in [0, num_buckets), the same for every head, no parameters; as in the seed's
    ``model_relpos.py`` the distance is one-sided (a key after the query, possible only under a prefix mask,
    counts as distance 0) and the index is added unscaled after the 1/sqrt(d) scaling of q.k.
    ``learned=True`` (``pos_encoding='relative_learned'``, T5): a learned scalar per (bucket, head); under a prefix
    mask the buckets are T5's bidirectional ones.
    """

    def __init__(self, n_head: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = False,
                 learned: bool = False):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.learned = learned
        self.bidirectional = bidirectional and learned
        self.embedding = nn.Embedding(num_buckets, n_head) if learned else None

    def _bias_of_buckets(self, buckets: torch.Tensor) -> torch.Tensor:
        """(..., n) bucket ids -> (..., n, H) learned values or (..., n, 1) the ids themselves (float32)."""
        if self.learned:
            return self.embedding(buckets)
        return buckets.to(torch.float32).unsqueeze(-1)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos (B|1, Tq), k_pos (B|1, Tk) -> (B|1, H, Tq, Tk) (learned) or (B|1, 1, Tq, Tk) (fixed)."""
        rel = k_pos.unsqueeze(-2).long() - q_pos.unsqueeze(-1).long()
        buckets = relative_bucket(rel, self.num_buckets, self.max_distance, self.bidirectional)
        return self._bias_of_buckets(buckets).permute(0, 3, 1, 2)

    def offset_table(self, T: int, device) -> torch.Tensor:
        """Bias by offset for a full sequence: (H|1, 2T - 1), column ``q - k + T - 1`` holds the bias of the
        query at q and the key at k (the FlexAttention score_mod indexes it)."""
        offsets = torch.arange(T - 1, -T, -1, device=device)            # k - q for column c = q - k + T - 1
        buckets = relative_bucket(offsets, self.num_buckets, self.max_distance, self.bidirectional)
        return self._bias_of_buckets(buckets).transpose(0, 1)
