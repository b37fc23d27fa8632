"""The attention-sink metric of Gu et al. (ICLR 2025), written once and used by every script.

Definitions (paper §3, 1-indexed tokens, T tokens per sample):

* importance score of key k in head h of layer l:
      α_k^{l,h} = 1/(T-k+1) · Σ_{i=k..T} A^{l,h}_{i,k}
  i.e. the attention key k receives, averaged over the T-k+1 queries that can see it causally.
* Sink_k^ε = 1/(L·H) · Σ_l Σ_h 1(α_k^{l,h} > ε)   (strict), reported in percent and averaged over samples.

Extra key/value slots (a learned key bias k*, a learnable sink token, ...) are columns placed *before*
the T token columns of an attention map; every query sees them, so their importance score is the mean
over all T queries. The paper reports it as Sink_1^*.

Attention maps are consumed one batch at a time by :class:`SinkMeter`; its memory does not grow with the
number of samples (the seed stored a (samples, layers, heads, T, T) array before computing anything).

Notes on the definition
* Only rows i >= k enter α_k, whatever mask produced the map. Under a causal mask this equals the seed's
  "sum every row, divide by T-k+1"; under a prefix-LM mask (bidirectional prefix) the seed would also count the
  prefix queries i < k that can see key k, the paper's formula (used here) does not.
* The threshold is applied per (sample, layer, head) and the indicator averaged over all of them, which is the
  seed's "per-sample threshold, then average". ``sink_std`` is the spread of the per-sample Sink_k over samples.
* Maps with NaN/inf (e.g. an fp16 overflow) are refused: a NaN α would silently count as "no sink".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from lit_gpt.utils import invalid_choice

DEFAULT_EPS = 0.3
DEFAULT_K = 10
DEFAULT_T = 64


def importance_scores(attn: torch.Tensor, n_extra: int = 0) -> torch.Tensor:
    """Importance score of every key column of an attention map.

    Args:
        attn: ``(..., T, n_extra + T)`` attention probabilities, rows are queries; the first ``n_extra``
            columns are extra slots seen by every query, the remaining ``T`` columns are the tokens.
        n_extra: number of leading extra-slot columns.

    Returns:
        ``(..., n_extra + T)`` float32 scores: for token column k (0-indexed) the mean of rows i >= k,
        for an extra slot the mean of all T rows.
    """
    if attn.dim() < 2:
        raise ValueError(f"attn must have at least 2 dims (..., T, S+T), got shape {tuple(attn.shape)}")
    T = attn.shape[-2]
    if attn.shape[-1] != T + n_extra:
        raise ValueError(
            f"attn has {attn.shape[-1]} key columns but T={T} queries and n_extra={n_extra} "
            f"(expected {T + n_extra})"
        )
    a = attn.float()
    extra = a[..., :n_extra].sum(-2) / T
    tok = a[..., n_extra:]
    # only queries i >= k count for key k (the paper's T-k+1 denominator), whatever mask produced the map
    tri = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    tok_sum = tok.masked_fill(~tri, 0.0).sum(-2)
    counts = torch.arange(T, 0, -1, device=a.device, dtype=torch.float32)
    return torch.cat([extra, tok_sum / counts], dim=-1)


def window_start_scores(attn: torch.Tensor, window: int, n_extra: int = 0) -> torch.Tensor:
    """Attention each query puts on the first token of its own sliding window, averaged over the queries.

    Under a window of ``window`` tokens query i (0-indexed) sees keys i-window+1..i; for the queries i >= window
    that first key is a token other than the absolute first one. A sink "on each window's first token" (the
    alternative the paper rules out, its Fig. 6) would make this large.

    Args:
        attn: ``(..., T, n_extra + T)`` attention probabilities, as for :func:`importance_scores`.
        window: the window size (``Config.window_size``); needs ``window < T``.

    Returns ``(...)`` float32 means over the ``T - window`` queries i = window..T-1 of ``A[i, i - window + 1]``.
    """
    T = attn.shape[-2]
    if not (isinstance(window, int) and 1 <= window < T):
        raise ValueError(invalid_choice("window", window, f"an integer in [1, T-1] = [1, {T - 1}]"))
    q = torch.arange(window, T, device=attn.device)
    tok = attn[..., n_extra:].float()
    return tok[..., q, q - window + 1].mean(-1)


def sink_rate(alpha: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Percentage of entries with α > eps (strict), reduced over every dim but the last."""
    return (alpha > eps).float().reshape(-1, alpha.shape[-1]).mean(0) * 100.0


def default_eps_grid() -> torch.Tensor:
    return torch.linspace(0.0, 1.0, 101, dtype=torch.float64)


@dataclass
class SinkResult:
    """What :class:`SinkMeter` reports. Percentages are in [0, 100]."""

    eps: float
    sink: Dict[int, float]                      # k (1-indexed token) -> Sink_k^eps in %
    sink_extra: Optional[List[float]]           # one value per extra slot (Sink_1^*), None if no slots
    sink_std: Dict[int, float]                  # k -> std over samples of the per-sample Sink_k (in %)
    n_samples: int
    n_layers: int
    n_heads: int
    mean_alpha: torch.Tensor                    # (L, H, n_extra + K): α averaged over samples (NaN where a
                                                #   layer has fewer than H heads)
    eps_grid: torch.Tensor                      # (E,)
    sink_vs_eps: torch.Tensor                   # (n_extra + K, E) in %
    per_layer: torch.Tensor                     # (L, n_extra + K): share of heads with α > eps, in %
    n_extra: int = 0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "eps": self.eps,
            "sink": {f"sink_{k}": v for k, v in self.sink.items()},
            "sink_extra": self.sink_extra,
            "sink_std": {f"sink_{k}": v for k, v in self.sink_std.items()},
            "n_samples": self.n_samples,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_extra": self.n_extra,
            "mean_alpha": [[[None if math.isnan(x) else x for x in head] for head in layer]
                           for layer in self.mean_alpha.tolist()],
            "eps_grid": self.eps_grid.tolist(),
            "sink_vs_eps": self.sink_vs_eps.tolist(),
            "per_layer": self.per_layer.tolist(),
            **({"meta": self.meta} if self.meta else {}),
        }


class SinkMeter:
    """Accumulates Sink_k^ε over batches of per-layer attention maps, in memory independent of sample count.

    ``update`` takes one batch: a sequence of per-layer tensors ``(B, H, T, n_extra + T)``. Heads may differ
    between layers. Everything is summed on the fly: per-(layer, head, k) α sums for the mean map, counts of
    α > ε for the default ε, and counts over a fixed ε grid for Sink-vs-ε curves.
    """

    def __init__(self, eps: float = DEFAULT_EPS, k_max: int = DEFAULT_K, n_extra: int = 0,
                 eps_grid: Optional[torch.Tensor] = None) -> None:
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0.0):
            raise ValueError(invalid_choice("eps", eps, "a finite number >= 0"))
        if k_max < 1:
            raise ValueError(invalid_choice("k_max", k_max, ">= 1"))
        self.eps = float(eps)
        self.k_max = int(k_max)
        self.n_extra = int(n_extra)
        self.eps_grid = (default_eps_grid() if eps_grid is None else eps_grid.to(torch.float64)).cpu()
        self.reset()

    def reset(self) -> None:
        self._alpha_sum: Optional[torch.Tensor] = None     # (L, H, C)
        self._hits: Optional[torch.Tensor] = None          # (L, H, C) count of α > eps
        self._grid_hits: Optional[torch.Tensor] = None     # (C, E)
        self._sample_sum: Optional[torch.Tensor] = None    # (C,) sum over samples of per-sample Sink share
        self._sample_sq: Optional[torch.Tensor] = None     # (C,) sum of squares
        self.n_samples = 0
        self._n_heads: List[int] = []

    @torch.no_grad()
    def update(self, attn_per_layer: Sequence[torch.Tensor]) -> None:
        if len(attn_per_layer) == 0:
            raise ValueError("attn_per_layer is empty: pass one attention map per layer")
        alphas = []
        for layer, a in enumerate(attn_per_layer):
            if a.dim() != 4:
                raise ValueError(f"layer {layer}: attention map must be (B, H, T, S+T), got {tuple(a.shape)}")
            if not bool(torch.isfinite(a).all()):
                raise ValueError(f"layer {layer}: attention map holds NaN/inf (overflow in a low-precision dtype?); "
                                 "rerun in float32 or bfloat16")
            alpha = importance_scores(a, self.n_extra)                     # (B, H, S+T)
            C = self.n_extra + self.k_max
            if alpha.shape[-1] < C:
                raise ValueError(f"layer {layer}: T={a.shape[-2]} is shorter than k_max={self.k_max}")
            alphas.append(alpha[..., :C].cpu().double())
        heads = [x.shape[1] for x in alphas]
        if not self._n_heads:
            self._n_heads = heads
            Hm = max(heads)
            L, C = len(alphas), alphas[0].shape[-1]
            self._alpha_sum = torch.zeros(L, Hm, C, dtype=torch.float64)
            self._hits = torch.zeros(L, Hm, C, dtype=torch.float64)
            self._grid_hits = torch.zeros(C, len(self.eps_grid), dtype=torch.float64)
            self._sample_sum = torch.zeros(C, dtype=torch.float64)
            self._sample_sq = torch.zeros(C, dtype=torch.float64)
        elif heads != self._n_heads:
            raise ValueError(f"layer/head layout changed between batches: {self._n_heads} then {heads}")
        B = alphas[0].shape[0]
        if any(x.shape[0] != B for x in alphas):
            raise ValueError(f"batch sizes differ between layers: {[x.shape[0] for x in alphas]}")
        per_sample = torch.zeros(B, alphas[0].shape[-1], dtype=torch.float64)   # hits per sample over (l, h)
        for layer, alpha in enumerate(alphas):
            H = alpha.shape[1]
            hit = (alpha > self.eps).double()                                   # (B, H, C)
            self._alpha_sum[layer, :H] += alpha.sum(0)
            self._hits[layer, :H] += hit.sum(0)
            per_sample += hit.sum(1)
            # (B, H, C, 1) > (E,) -> count per (C, E)
            self._grid_hits += (alpha.unsqueeze(-1) > self.eps_grid).double().sum((0, 1))
        share = per_sample / sum(heads) * 100.0
        self._sample_sum += share.sum(0)
        self._sample_sq += (share ** 2).sum(0)
        self.n_samples += B

    def compute(self) -> SinkResult:
        if self.n_samples == 0:
            raise RuntimeError("SinkMeter.compute() called before any update()")
        heads = torch.tensor(self._n_heads, dtype=torch.float64)            # (L,)
        total_pairs = heads.sum() * self.n_samples
        mean_alpha = self._alpha_sum / self.n_samples
        for layer, h in enumerate(self._n_heads):
            mean_alpha[layer, h:] = float("nan")
        n = self.n_samples
        mean_s = self._sample_sum / n
        var = (self._sample_sq / n - mean_s ** 2).clamp_min(0.0) * (n / (n - 1) if n > 1 else 0.0)
        std = var.sqrt()
        per_col = self._hits.sum((0, 1)) / total_pairs * 100.0              # (C,)
        per_layer = self._hits.sum(1) / (heads[:, None] * self.n_samples) * 100.0
        sink_vs_eps = self._grid_hits / total_pairs * 100.0
        S = self.n_extra
        return SinkResult(
            eps=self.eps,
            sink={k + 1: float(per_col[S + k]) for k in range(self.k_max)},
            sink_extra=[float(per_col[j]) for j in range(S)] if S else None,
            sink_std={k + 1: float(std[S + k]) for k in range(self.k_max)},
            n_samples=self.n_samples,
            n_layers=len(self._n_heads),
            n_heads=max(self._n_heads),
            mean_alpha=mean_alpha.float(),
            eps_grid=self.eps_grid.float(),
            sink_vs_eps=sink_vs_eps.float(),
            per_layer=per_layer.float(),
            n_extra=S,
        )


def sink_metric(attn_batches: Iterable[Sequence[torch.Tensor]], eps: float = DEFAULT_EPS,
                k_max: int = DEFAULT_K, n_extra: int = 0) -> SinkResult:
    """Convenience: feed an iterable of per-batch, per-layer attention maps through a :class:`SinkMeter`."""
    meter = SinkMeter(eps=eps, k_max=k_max, n_extra=n_extra)
    for batch in attn_batches:
        meter.update(batch)
    return meter.compute()


def format_sink(result: SinkResult, k_show: int = 10) -> str:
    parts = [f"Sink_{k}={result.sink[k]:.2f}%" for k in range(1, min(k_show, len(result.sink)) + 1)]
    if result.sink_extra:
        parts.insert(0, "Sink_1*=" + "/".join(f"{v:.2f}%" for v in result.sink_extra))
    return f"[eps={result.eps}, n={result.n_samples}] " + " ".join(parts)
