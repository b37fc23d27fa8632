"""Activation analysis on plain tensors, shared by our GPT and by Hugging Face captures (lit_gpt.hf).

Everything here consumes the per-layer record of one forward (:class:`lit_gpt.model.Analysis`: hidden states,
q/k/v after positional encoding, attention maps) one batch at a time and keeps running sums, so memory does
not grow with the number of samples.

Conventions (both producers follow them):
* ``hidden``: n_layer + 1 tensors (B, T, C): the input of every block, then the output of the last block before
  the final norm.
* ``q`` (B, H, T, d), ``k``/``v`` (B, G, T, d) with G dividing H (grouped KV: head h reads group h // (H/G));
  keys and queries are the ones the model attends with (after RoPE), scaled so that the attention logit is
  q·k / sqrt(d) (positional biases such as ALiBi aside).

Measured (paper §3 / §4):
* ℓ2 norm of hidden states, queries, keys and values at each position, averaged over samples (and heads);
  "first token vs the rest" = position 1 vs the mean over positions 2..T.
* massive-activation ratio per layer: ‖h_1‖ / mean_{t>1} ‖h_t‖ (a ratio of sample means), and the largest
  |h| entry at position 1 vs elsewhere.
* the logit decomposition q_t·k_j = cos(q_t, k_j) ‖q_t‖ ‖k_j‖ for the first key (j = 1, all queries t) vs the
  other keys (1 < j <= t): per (layer, head) means and per-layer 2-D histograms of (cos, log10 ‖q‖‖k‖).

Pure statistics: nothing here runs a model. :func:`lit_gpt.evaluate.evaluate_model` runs one (ours or a Hugging
Face causal LM) over token batches and feeds these meters; the probe inputs are built in :mod:`lit_gpt.probe`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

from lit_gpt.attention import repeat_kv

COS_BINS = 40
LOGN_BINS = 40
LOGN_RANGE = (-2.0, 5.0)    # log10 of ‖q‖‖k‖; values outside are clipped into the edge bins


# ---------------------------------------------------------------------------- plain-tensor helpers
def position_norms(x: torch.Tensor) -> torch.Tensor:
    """ℓ2 norm over the last dim, summed over every leading dim but the position dim (-2).

    x: (B, T, C) or (B, H, T, d). Returns (T,) float64 sums (divide by the count of summed vectors)."""
    n = x.float().norm(dim=-1).double()                    # (..., T)
    return n.reshape(-1, n.shape[-1]).sum(0)


def first_vs_rest(per_position: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(..., T) -> value at position 1 and the mean over positions 2..T, each (...)."""
    return per_position[..., 0], per_position[..., 1:].mean(-1)


def cos_and_norm_product(q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos(q_t, k_j) and ‖q_t‖‖k_j‖ for every query t and key j: q (B, H, T, d), k (B, G, Tk, d) ->
    two (B, H, T, Tk) float32 tensors."""
    k = repeat_kv(k, q.shape[1])
    qf, kf = q.float(), k.float()
    qn = qf.norm(dim=-1)                                   # (B, H, T)
    kn = kf.norm(dim=-1)                                   # (B, H, Tk)
    prod = qn.unsqueeze(-1) * kn.unsqueeze(-2)
    cos = (qf @ kf.transpose(-1, -2)) / prod.clamp_min(1e-30)
    return cos, prod


# ---------------------------------------------------------------------------- the running meter
@dataclass
class ActivationResult:
    """Per-position means (float64 tensors) and the derived first-vs-rest statistics."""

    n_samples: int
    hidden_norm: Optional[torch.Tensor]  # (L+1, T) mean ‖h_t‖ (input of block l; last = output of the last block)
    hidden_maxabs: Optional[torch.Tensor]  # (L+1, T) mean over samples of max_c |h_t,c|
    query_norm: Optional[torch.Tensor]   # (L, T) mean over samples and heads of ‖q_t‖
    key_norm: Optional[torch.Tensor]     # (L, T)
    value_norm: Optional[torch.Tensor]   # (L, T)
    cos_first: Optional[torch.Tensor]    # (L, H) mean over samples and queries t of cos(q_t, k_1)
    cos_rest: Optional[torch.Tensor]     # (L, H) mean over samples and causal pairs 1 < j <= t of cos(q_t, k_j)
    normprod_first: Optional[torch.Tensor]  # (L, H) mean ‖q_t‖‖k_1‖
    normprod_rest: Optional[torch.Tensor]   # (L, H) mean ‖q_t‖‖k_j‖, 1 < j <= t
    hist_first: Optional[torch.Tensor]   # (L, COS_BINS, LOGN_BINS) counts of (cos, log10 ‖q‖‖k‖) for key 1
    hist_rest: Optional[torch.Tensor]    # (L, COS_BINS, LOGN_BINS) counts for the other keys
    cos_edges: torch.Tensor = field(default_factory=lambda: torch.linspace(-1.0, 1.0, COS_BINS + 1))
    logn_edges: torch.Tensor = field(default_factory=lambda: torch.linspace(*LOGN_RANGE, LOGN_BINS + 1))

    @property
    def massive_ratio(self) -> Optional[torch.Tensor]:
        """(L+1,) ‖h_1‖ / mean_{t>1} ‖h_t‖ per layer (None without hidden states)."""
        if self.hidden_norm is None:
            return None
        first, rest = first_vs_rest(self.hidden_norm)
        return first / rest

    def summary(self) -> dict:
        """First-vs-rest numbers per layer (lists), the compact part of :meth:`to_dict`."""
        out = {}
        for name in ("hidden_norm", "hidden_maxabs", "query_norm", "key_norm", "value_norm"):
            t = getattr(self, name)
            if t is not None:
                first, rest = first_vs_rest(t)
                out[name] = {"first": first.tolist(), "rest_mean": rest.tolist()}
        if self.hidden_norm is not None:
            out["massive_ratio"] = self.massive_ratio.tolist()
        if self.cos_first is not None:
            for name in ("cos_first", "cos_rest", "normprod_first", "normprod_rest"):
                t = getattr(self, name)
                out[name + "_per_layer"] = t.nanmean(-1).tolist()
        return out

    def to_dict(self) -> dict:
        def lst(t):
            return None if t is None else [[None if math.isnan(x) else x for x in row] for row in t.tolist()]

        d = {"n_samples": self.n_samples, "summary": self.summary()}
        for name in ("hidden_norm", "hidden_maxabs", "query_norm", "key_norm", "value_norm", "cos_first",
                     "cos_rest", "normprod_first", "normprod_rest"):
            d[name] = lst(getattr(self, name))
        for name in ("hist_first", "hist_rest"):
            t = getattr(self, name)
            d[name] = None if t is None else t.tolist()
        d["cos_edges"] = self.cos_edges.tolist()
        d["logn_edges"] = self.logn_edges.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ActivationResult":
        """Inverse of :meth:`to_dict` (re-plot from a results JSON without rerunning the model)."""
        def t(x):
            if x is None:
                return None
            return torch.tensor([[math.nan if v is None else v for v in row] for row in x], dtype=torch.float64)

        hist = {k: None if d[k] is None else torch.tensor(d[k], dtype=torch.float64)
                for k in ("hist_first", "hist_rest")}
        return cls(n_samples=d["n_samples"], **{k: t(d[k]) for k in (
            "hidden_norm", "hidden_maxabs", "query_norm", "key_norm", "value_norm", "cos_first", "cos_rest",
            "normprod_first", "normprod_rest")}, **hist,
            cos_edges=torch.tensor(d["cos_edges"]), logn_edges=torch.tensor(d["logn_edges"]))


def _hist2d(cos: torch.Tensor, logn: torch.Tensor) -> torch.Tensor:
    """Counts of (cos, log10 norm product) pairs in the fixed COS_BINS x LOGN_BINS grid (values clipped)."""
    ci = ((cos.clamp(-1.0, 1.0) + 1.0) / 2.0 * COS_BINS).long().clamp(0, COS_BINS - 1)
    lo, hi = LOGN_RANGE
    li = ((logn.clamp(lo, hi) - lo) / (hi - lo) * LOGN_BINS).long().clamp(0, LOGN_BINS - 1)
    flat = torch.bincount((ci * LOGN_BINS + li).reshape(-1), minlength=COS_BINS * LOGN_BINS)
    return flat.view(COS_BINS, LOGN_BINS).double()


class ActivationMeter:
    """Running sums of the statistics above, fed one batch at a time (memory independent of sample count)."""

    def __init__(self) -> None:
        self.n_samples = 0
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, torch.Tensor] = {}

    def _add(self, name: str, value: torch.Tensor, count) -> None:
        value = value.detach().double().cpu()
        count = torch.as_tensor(count, dtype=torch.float64).cpu()
        if name not in self._sums:
            self._sums[name] = torch.zeros_like(value)
            self._counts[name] = torch.zeros_like(count)
        if self._sums[name].shape != value.shape:
            raise ValueError(f"{name}: shape changed between batches: {tuple(self._sums[name].shape)} then "
                             f"{tuple(value.shape)} (use one T and one model per meter)")
        self._sums[name] += value
        self._counts[name] += count

    @torch.no_grad()
    def update(self, hidden: Optional[Sequence[torch.Tensor]] = None, q: Optional[Sequence[torch.Tensor]] = None,
               k: Optional[Sequence[torch.Tensor]] = None, v: Optional[Sequence[torch.Tensor]] = None) -> None:
        """One batch: per-layer lists as in :class:`lit_gpt.model.Analysis` (any of them may be omitted)."""
        B = None
        if hidden:
            B = hidden[0].shape[0]
            self._add("hidden_norm", torch.stack([position_norms(h) for h in hidden]), B)
            maxabs = torch.stack([h.float().abs().amax(-1).double().sum(0) for h in hidden])   # (L+1, T)
            self._add("hidden_maxabs", maxabs, B)
        for name, seq in (("query_norm", q), ("key_norm", k), ("value_norm", v)):
            if seq:
                B = seq[0].shape[0]
                self._add(name, torch.stack([position_norms(t) for t in seq]), B * seq[0].shape[1])
        if q and k:
            self._update_cos(q, k)
        if B is None:
            raise ValueError("ActivationMeter.update: nothing to measure (pass hidden, q, k or v)")
        self.n_samples += B

    def _update_cos(self, q: Sequence[torch.Tensor], k: Sequence[torch.Tensor]) -> None:
        cf, cr, nf, nr, hf, hr = [], [], [], [], [], []
        for ql, kl in zip(q, k):
            B, H, T, _ = ql.shape
            if kl.shape[-2] != T:
                raise ValueError(f"queries ({T}) and keys ({kl.shape[-2]}) cover different positions")
            cos, prod = cos_and_norm_product(ql, kl)                   # (B, H, T, T)
            rest = torch.ones(T, T, dtype=torch.bool, device=cos.device).tril()     # causal pairs j <= t ...
            rest[:, 0] = False                                                        # ... except key 1
            cf.append(cos[..., 0].double().sum((0, 2)))
            nf.append(prod[..., 0].double().sum((0, 2)))
            cr.append((cos * rest).double().sum((0, 2, 3)))
            nr.append((prod * rest).double().sum((0, 2, 3)))
            logp = prod.clamp_min(1e-30).log10()
            hf.append(_hist2d(cos[..., 0].cpu(), logp[..., 0].cpu()))
            hr.append(_hist2d(cos[..., rest].cpu(), logp[..., rest].cpu()))
            n_first, n_rest = B * T, B * int(rest.sum())
        heads = {x.shape[0] for x in cf}
        if len(heads) != 1:
            raise ValueError(f"cos statistics need the same head count in every layer, got {sorted(heads)}")
        self._add("cos_first", torch.stack(cf), n_first)
        self._add("normprod_first", torch.stack(nf), n_first)
        self._add("cos_rest", torch.stack(cr), n_rest)
        self._add("normprod_rest", torch.stack(nr), n_rest)
        self._add("hist_first", torch.stack(hf), 1)
        self._add("hist_rest", torch.stack(hr), 1)

    def compute(self) -> ActivationResult:
        if self.n_samples == 0:
            raise RuntimeError("ActivationMeter.compute() called before any update()")

        def mean(name):
            return self._sums[name] / self._counts[name] if name in self._sums else None

        return ActivationResult(
            n_samples=self.n_samples,
            hidden_norm=mean("hidden_norm"), hidden_maxabs=mean("hidden_maxabs"),
            query_norm=mean("query_norm"), key_norm=mean("key_norm"), value_norm=mean("value_norm"),
            cos_first=mean("cos_first"), cos_rest=mean("cos_rest"),
            normprod_first=mean("normprod_first"), normprod_rest=mean("normprod_rest"),
            hist_first=self._sums.get("hist_first"), hist_rest=self._sums.get("hist_rest"),
        )
