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

:func:`evaluate_model` is the per-checkpoint evaluation: it runs a model (ours or a Hugging Face causal LM)
over token batches and returns Sink_k^ε (through :class:`lit_gpt.sink_metrics.SinkMeter`), the next-token
loss and the activation statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lit_gpt.sink_metrics import DEFAULT_EPS, DEFAULT_K, SinkMeter

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


def expand_groups(k: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, G, T, d) -> (B, H, T, d): head h reads group h // (H / G) (the layout of every family we load)."""
    G = k.shape[1]
    if G == n_head:
        return k
    if n_head % G:
        raise ValueError(f"{n_head} query heads cannot share {G} key/value groups (must divide)")
    return k.repeat_interleave(n_head // G, dim=1)


def cos_and_norm_product(q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos(q_t, k_j) and ‖q_t‖‖k_j‖ for every query t and key j: q (B, H, T, d), k (B, G, Tk, d) ->
    two (B, H, T, Tk) float32 tensors."""
    k = expand_groups(k, q.shape[1])
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

        hist = {k: None if d[k] is None else torch.tensor(d[k], dtype=torch.float64) for k in ("hist_first", "hist_rest")}
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


# ---------------------------------------------------------------------------- probe inputs
def probe_inputs(kind: str, n: int, T: int, *, encode: Optional[Callable[[str], List[int]]] = None,
                 texts: Optional[Sequence[str]] = None, vocab_size: Optional[int] = None,
                 prefix: Sequence[int] = (), exclude: Sequence[int] = (), seed: int = 0,
                 repeat_token: Optional[int] = None) -> torch.Tensor:
    """(n, T) token ids for one of the paper's three inputs (§3).

    natural:  ``encode(text)`` (which adds BOS if the tokenizer does) truncated to T; needs ``texts``.
    random:   T uniformly random ids in [0, vocab_size) without the ``exclude`` ids (pass the special ids).
    repeated: one token repeated T times; ``repeat_token`` for all samples, or (None) a different random
              non-excluded token per sample, drawn with ``seed``.
    The paper's random and repeated inputs have nothing in front of them (no BOS), which is the default here
    and what :func:`lit_gpt.hf.hf_probe_tokens` feeds Hugging Face models. ``prefix`` (e.g. ``[bos]``) puts ids
    before the random / repeated tokens for callers that want to measure that other input on purpose; it is not
    the paper's input (a different first token brings the sink back on a repeated input).
    """
    from lit_gpt.probe import natural_tokens, random_tokens, repeated_tokens

    if kind == "natural":
        if encode is None or texts is None:
            raise ValueError("input 'natural' needs encode= and texts=")
        if len(texts) < n:
            raise ValueError(f"the probe file holds {len(texts)} texts; n={n} requested")
        return natural_tokens(encode, list(texts)[:n], T=T)
    if kind in ("random", "repeated") and vocab_size is None:
        raise ValueError(f"input {kind!r} needs vocab_size=")
    if kind == "random":
        return random_tokens(n, T, vocab_size, seed=seed, prefix=prefix, exclude=exclude)
    if kind == "repeated":
        if repeat_token is not None:
            if not 0 <= repeat_token < vocab_size:
                raise ValueError(f"repeat_token={repeat_token} is out of range; allowed: 0..{vocab_size - 1}")
            return repeated_tokens(n, T, repeat_token, prefix=prefix)
        picks = random_tokens(n, 1, vocab_size, seed=seed + 1, exclude=exclude)[:, 0]
        return torch.cat([repeated_tokens(1, T, int(t), prefix=prefix) for t in picks], dim=0)
    raise ValueError(f"input={kind!r} is invalid; allowed: natural, random, repeated")


INPUT_KINDS = ("natural", "random", "repeated")


# ---------------------------------------------------------------------------- per-checkpoint evaluation
def is_lit_gpt(model: torch.nn.Module) -> bool:
    """Our GPT, possibly inside Fabric / DDP / FSDP / torch.compile wrappers."""
    from lit_gpt.model import GPT

    for _ in range(8):
        if isinstance(model, GPT):
            return True
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return False
        model = inner
    return False


def model_forward(model: torch.nn.Module, idx: torch.Tensor, need: Iterable[str]):
    """(logits, Analysis) for our GPT or a Hugging Face causal LM (through lit_gpt.hf's capture)."""
    if is_lit_gpt(model):
        return model(idx, return_analysis=set(need))   # through the wrapper: FSDP / DDP / Fabric keep their hooks
    from lit_gpt.hf import hf_forward

    return hf_forward(model, idx, need)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, batches: Iterable[torch.Tensor], *, T: Optional[int] = None,
                   eps: float = DEFAULT_EPS, k_max: int = DEFAULT_K, activations: bool = True,
                   attention_maps: Sequence[Tuple[int, int]] = (), device: Optional[torch.device] = None) -> dict:
    """Sink_k^ε, next-token loss and activation statistics of ``model`` over token ``batches``.

    batches: (B, >= T) long tensors. The first T tokens are the input (T defaults to the first batch's width);
        the loss is the mean cross-entropy of predicting tokens 2..T+1 from the inputs, so a batch one token
        wider than T is scored on T targets, a batch of exactly T on T-1. A batch may also be an
        ``(inputs, targets)`` pair (targets[:, t] is scored against the prediction at position t), for inputs
        that differ from the shifted targets (lit_gpt.evaluate.probe_view).
    activations: also measure norms, massive activations and cos/norm statistics (needs hidden, q, k, v).
    attention_maps: (layer, head) pairs whose attention map, averaged over samples, is returned for plots.

    Returns ``{"sink": SinkResult, "activations": ActivationResult | None, "loss": float | None,
    "n_loss_tokens": int, "attention_maps": {(l, h): (T, S+T) tensor}}``.
    """
    need = {"attn"} | ({"hidden", "q", "k", "v"} if activations else set())
    sink: Optional[SinkMeter] = None      # made at the first batch: the analysis says how many extra slots
    act = ActivationMeter() if activations else None
    maps: Dict[Tuple[int, int], torch.Tensor] = {}
    loss_sum, loss_n = 0.0, 0
    if device is None:
        device = next(model.parameters()).device
    for batch in batches:
        batch, targets = batch if isinstance(batch, tuple) else (batch, None)
        if batch.dim() != 2:
            raise ValueError(f"token batch must be (B, T), got shape {tuple(batch.shape)}")
        T = T or batch.shape[1]
        if batch.shape[1] < T:
            raise ValueError(f"token batch has {batch.shape[1]} tokens < T={T}")
        idx = batch[:, :T].to(device)
        logits, an = model_forward(model, idx, need)
        targets = (batch[:, 1:T + 1] if targets is None else targets[:, :T]).to(device)
        n_t = targets.shape[1]
        if n_t:
            lf = logits[:, :n_t].float()
            loss_sum += float(F.cross_entropy(lf.reshape(-1, lf.shape[-1]), targets.reshape(-1), reduction="sum"))
            loss_n += targets.numel()
        if sink is None:
            sink = SinkMeter(eps=eps, k_max=k_max, n_extra=getattr(an, "n_extra", 0))
        sink.update(an.attn)
        for (layer, head) in attention_maps:
            if not (0 <= layer < len(an.attn) and 0 <= head < an.attn[layer].shape[1]):
                raise ValueError(f"attention map ({layer}, {head}) is out of range: {len(an.attn)} layers, "
                                 f"{an.attn[0].shape[1]} heads")
            m = an.attn[layer][:, head].double().sum(0).cpu()
            maps[(layer, head)] = maps.get((layer, head), 0) + m
        if act is not None:
            act.update(hidden=an.hidden, q=an.q, k=an.k, v=an.v)
    if sink is None:
        raise ValueError("evaluate_model: no batches")
    result = sink.compute()
    return {
        "sink": result,
        "activations": act.compute() if act is not None else None,
        "loss": loss_sum / loss_n if loss_n else None,
        "n_loss_tokens": loss_n,
        "attention_maps": {key: (m / result.n_samples).float() for key, m in maps.items()},
    }


def batched(tokens, batch_size: int) -> list:
    """Split (n, T) rows, or an (inputs, targets) pair of them, into batches of ``batch_size`` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid; allowed: >= 1")
    if isinstance(tokens, tuple):
        return list(zip(*(t.split(batch_size, dim=0) for t in tokens)))
    return list(tokens.split(batch_size, dim=0))


def evaluation_to_dict(ev: dict) -> dict:
    """JSON-ready form of :func:`evaluate_model`'s result (attention maps as nested lists)."""
    return {
        "sink": ev["sink"].to_dict(),
        "loss": ev["loss"],
        "n_loss_tokens": ev["n_loss_tokens"],
        "activations": ev["activations"].to_dict() if ev["activations"] is not None else None,
        "attention_maps": {f"L{l}H{h}": m.tolist() for (l, h), m in ev["attention_maps"].items()},
    }
