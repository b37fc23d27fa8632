"""Independent reference maths for the tests: explicit Python loops in float64, written from the papers'
definitions and sharing no code with lit_gpt (so a bug in lit_gpt cannot hide in its own reference)."""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch


def rope_rotate(x: torch.Tensor, pos: int, n_elem: int, base: float) -> torch.Tensor:
    """Rotate one vector x (d,) at position ``pos``: dims (i, i + n/2) form the pair rotated by pos * base^(-2i/n)."""
    out = x.clone().double()
    half = n_elem // 2
    for i in range(half):
        theta = pos * base ** (-2.0 * i / n_elem)
        a, b = float(x[i]), float(x[i + half])
        out[i] = a * math.cos(theta) - b * math.sin(theta)
        out[i + half] = a * math.sin(theta) + b * math.cos(theta)
    return out


def sinusoid(pos: int, dim: int) -> torch.Tensor:
    half = dim // 2
    out = torch.zeros(dim, dtype=torch.float64)
    for i in range(half):
        w = math.exp(-math.log(10000.0) * i / half)
        out[i] = math.sin(pos * w)
        out[half + i] = math.cos(pos * w)
    return out


def alibi_slope_list(n: int) -> List[float]:
    """ALiBi slopes for a power-of-two head count: 2^(-8/n), 2^(-16/n), ..."""
    assert n & (n - 1) == 0
    return [2 ** (-8.0 * (h + 1) / n) for h in range(n)]


def t5_bucket(rel: int, num_buckets: int, max_distance: int, bidirectional: bool) -> int:
    """T5 relative bucket of rel = k - q, written from the T5 paper's description."""
    ret = 0
    n = -rel
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


def paper_relative_bias(i: int, j: int, num_buckets: int = 32, max_distance: int = 128) -> float:
    """The paper's relative PE (Appendix B, eq. 6; the seed's model_relpos.py): the logit of query i and key j gets
    the bucket index g(i - j) itself, no parameters. Distance n = max(i - j, 0) (the seed clamps keys after the
    query to 0); n < B/2 is its own bucket, larger n fall into B/2 log-spaced buckets up to D, the last one open."""
    n = max(i - j, 0)
    half = num_buckets // 2
    if n < half:
        return float(n)
    return float(min(num_buckets - 1, half + math.floor(math.log(n / half) / math.log(max_distance / half) * half)))


def attention_loop(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Callable[[int, int], bool], *,
    op: str = "softmax", normalize: bool = True, alpha: float = 1.0, scale: Optional[float] = None,
    bias: Optional[Callable[[int, int, int], float]] = None, phi: Optional[Callable] = None,
    slot_keys: Optional[torch.Tensor] = None, slot_values: Optional[torch.Tensor] = None,
    slot_logits: Optional[torch.Tensor] = None, q_pos: Optional[Sequence[int]] = None,
    k_pos: Optional[Sequence[int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """v_i = Z_i^-1 sum_j sim(q_i, k_j) v_j, one (batch, head, query) at a time.

    q (B, H, Tq, d), k/v (B, H, Tk, d) (heads already matched); ``allowed(qpos, kpos)``; bias(h, qpos, kpos).
    Slots (each seen by every query, no positional bias): slot_logits (H,) with value 0, then slot_keys /
    slot_values (H, d). Returns (out (B, H, Tq, d), weights (B, H, Tq, S + Tk)) where weights are the
    probabilities for softmax (before the alpha scaling: rows sum to 1) and |sim| / sum |sim| otherwise.
    """
    B, H, Tq, d = q.shape
    Tk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_pos = list(range(Tk - Tq, Tk)) if q_pos is None else list(q_pos)
    k_pos = list(range(Tk)) if k_pos is None else list(k_pos)
    n_slots = (0 if slot_logits is None else 1) + (0 if slot_keys is None else 1)
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=torch.float64)
    weights = torch.zeros(B, H, Tq, n_slots + Tk, dtype=torch.float64)
    f = phi if phi is not None else (lambda t: t)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                qi = f(q[b, h, i].double())
                raw, vals, cols = [], [], []
                if slot_logits is not None:
                    raw.append(float(slot_logits[h]))
                    vals.append(torch.zeros(v.shape[-1], dtype=torch.float64))
                    cols.append(0)
                if slot_keys is not None:
                    raw.append(float(qi @ f(slot_keys[h].double())) * scale)
                    vals.append(slot_values[h].double())
                    cols.append(len(cols))
                for j in range(Tk):
                    if k_pos[j] < 0 or not allowed(q_pos[i], k_pos[j]):
                        continue
                    s = float(qi @ f(k[b, h, j].double())) * scale
                    if bias is not None:
                        s += bias(h, q_pos[i], k_pos[j])
                    raw.append(s)
                    vals.append(v[b, h, j].double())
                    cols.append(n_slots + j)
                raw_t = torch.tensor(raw, dtype=torch.float64)
                if op == "softmax":
                    p = torch.exp(raw_t - raw_t.max())
                    p = p / p.sum()
                    w = p * alpha                     # rows of the output weights sum to alpha
                    proxy = p                         # the map: the distribution before the alpha scaling
                else:
                    if op == "sigmoid":
                        sim = 1.0 / (1.0 + torch.exp(-raw_t))
                    elif op == "elu":
                        sim = torch.where(raw_t > 0, raw_t, torch.exp(raw_t) - 1.0) + 1.0
                    else:
                        sim = raw_t
                    if normalize:
                        z = sim.sum()
                        z = max(abs(float(z)), 1.0) if op in ("identity", "mlp_kernel") else float(z)
                        w = sim / z
                    else:
                        w = sim
                    proxy = sim.abs() / sim.abs().sum()
                for c, wc, vc, pc in zip(cols, w, vals, proxy):
                    out[b, h, i] += wc * vc
                    weights[b, h, i, c] = pc
    return out, weights


def cross_entropy_loop(h: torch.Tensor, weight: torch.Tensor, targets: Sequence[int], ignore_index: int = -100
                       ) -> Tuple[float, torch.Tensor, torch.Tensor]:
    """Mean next-token loss of logits h @ weight.T over the targets != ignore_index, and its gradients w.r.t. h and
    weight, row by row in float64: d loss / d logit_j = (softmax_j - [j == t]) / n_valid."""
    h64, w64 = h.detach().double(), weight.detach().double()
    rows = [i for i, t in enumerate(targets) if int(t) != ignore_index]
    n = max(len(rows), 1)
    loss, gh, gw = 0.0, torch.zeros_like(h64), torch.zeros_like(w64)
    for i in rows:
        t = int(targets[i])
        z = [float(h64[i] @ w64[j]) for j in range(w64.shape[0])]
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        loss += (lse - z[t]) / n
        for j, v in enumerate(z):
            g = (math.exp(v - lse) - (1.0 if j == t else 0.0)) / n
            gh[i] += g * w64[j]
            gw[j] += g * h64[i]
    return loss, gh, gw
