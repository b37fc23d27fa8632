"""Evaluation: a model (ours or a Hugging Face causal LM) over token batches, and the sink on a probe set.

* :func:`evaluate_model` — Sink_k^ε (through :class:`lit_gpt.sink_metrics.SinkMeter`), the next-token loss and
  the activation statistics (:class:`lit_gpt.analysis.ActivationMeter`) over token batches; :func:`model_forward`
  is the one forward it makes (``GPT(idx, return_analysis=...)`` or :func:`lit_gpt.hf.hf_forward`).
  eval_sink.py, eval_sink_open_source.py and eval_activations_open_source.py are drivers over it.
* :func:`sink_on_probe` — the training-time view: Sink and probe loss on probe rows, fed through
  :func:`lit_gpt.probe.probe_view` (the run's data transforms as the seed's evaluation applies them):

    from lit_gpt.evaluate import sink_on_probe
    result, loss = sink_on_probe(model, tokens)        # tokens (n, T+1): loss on tokens 1..T; (n, T): loss None
    result.sink[1]                                      # Sink_1^eps in %
    result, _ = sink_on_probe(model, inputs, has_targets=False)   # (n, T) inputs only

* :func:`probe_run` — a checkpoint's model on its own run's probe, as training measured it (the run's data,
  probe and transforms; :func:`probe_run_checkpoint` loads the checkpoint first). ``python eval_sink.py
  CHECKPOINT --run-probe`` and :func:`lit_gpt.repro.final_checks` go through it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from lit_gpt.analysis import ActivationMeter
from lit_gpt.data import RunData, open_run_data
from lit_gpt.probe import make_probe, probe_transform_names, probe_view
from lit_gpt.sink_metrics import DEFAULT_EPS, DEFAULT_K, SinkMeter, SinkResult
from lit_gpt.utils import invalid_choice

if TYPE_CHECKING:
    from lit_gpt.run_config import RunConfig


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
        that differ from the shifted targets (lit_gpt.probe.probe_view).
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
        raise ValueError(invalid_choice("batch_size", batch_size, ">= 1"))
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


@torch.no_grad()
def sink_on_probe(model: torch.nn.Module, tokens: torch.Tensor, eps: float = DEFAULT_EPS, k_max: int = DEFAULT_K,
                  batch_size: int = 20, has_targets: bool = True, transforms: Sequence = ()
                  ) -> Tuple[SinkResult, Optional[float]]:
    """Sink_1..k_max^eps (in %) of ``model`` on probe rows, and the mean next-token loss on them: the training-time
    view of :func:`evaluate_model` (which also serves eval_sink.py and the HF scripts).

    Args:
        model: our GPT or a Hugging Face causal LM.
        tokens: ``(n, T + 1)`` ids when ``has_targets`` (inputs ``[:, :T]``, loss on ``[:, 1:]``, as the seed
            reported next to the sink), else ``(n, T)`` inputs and no loss.
        eps, k_max: the metric's threshold and how many leading positions to report.
        batch_size: probe rows per forward.
        transforms: the run's data transforms, applied as the seed's probe does
            (:func:`lit_gpt.probe.probe_view`).

    Returns:
        ``(SinkResult, loss)``; the model is left in the train/eval mode it came in.
    """
    inputs, targets = probe_view(tokens, transforms, has_targets)
    T = inputs.shape[1]
    if T < k_max:
        raise ValueError(f"probe rows of {T} tokens are shorter than k_max={k_max}")
    was_training = model.training
    model.eval()
    try:
        out = evaluate_model(model, batched(inputs if targets is None else (inputs, targets), batch_size), T=T,
                             eps=eps, k_max=k_max, activations=False)
    finally:
        model.train(was_training)
    return out["sink"], (out["loss"] if has_targets else None)


def sink_summary(result: SinkResult, loss: Optional[float]) -> dict:
    """The compact record training logs (Sink_k in %, extra slots, probe loss)."""
    out = {f"sink_{k}": v for k, v in result.sink.items()}
    if result.sink_extra:
        out.update({f"sink_extra_{i}": v for i, v in enumerate(result.sink_extra)})
    if loss is not None:
        out["probe_loss"] = loss
    return out


@dataclass
class RunProbe:
    """A model measured on its own run's probe (:func:`probe_run`, :func:`probe_run_checkpoint`)."""

    model: torch.nn.Module
    cfg: "RunConfig"            # the run's config (its ``probe`` section says eps, k_max, T, batch_size)
    data: RunData               # the run's data (:func:`lit_gpt.data.open_run_data`): tokenizer, transforms
    tokens: torch.Tensor        # (n, T + 1) natural probe rows, before the run's transforms
    where: str                  # where the probe rows came from
    result: SinkResult          # Sink_1..k on the probe (``meta`` names the probe and the transforms applied)
    loss: Optional[float]       # mean next-token loss on the probe
    payload: Optional[dict] = None   # the checkpoint's payload without weights (probe_run_checkpoint)

    @property
    def inputs(self) -> torch.Tensor:
        """``(n, T)`` probe inputs as the model is fed them (the run's transforms applied, :func:`probe_view`)."""
        return probe_view(self.tokens, self.data.transforms)[0]


def probe_run(model: torch.nn.Module, cfg: "RunConfig", source: Optional[str] = None,
              eps: Optional[float] = None, k_max: Optional[int] = None) -> RunProbe:
    """Sink and probe loss of a checkpoint's ``model`` on the probe of its run ``cfg``, as training measured it:
    the run's ``probe`` section (``source``, ``eps``, ``k_max`` override its fields), its validation shards and
    tokenizer (:func:`lit_gpt.data.open_run_data`) and its data transforms (:func:`sink_on_probe`). The one place
    that rule lives: eval_sink.py --run-probe and :func:`lit_gpt.repro.final_checks` go through it."""
    pc = cfg.probe
    rd = open_run_data(cfg, model.config, need_train=False)
    tokens, where = make_probe(cfg, rd, source)
    result, loss = sink_on_probe(model, tokens, eps=eps if eps is not None else pc.eps, k_max=k_max or pc.k_max,
                                 batch_size=pc.batch_size, transforms=rd.transforms)
    result.meta.update({"probe": where, "probe_transforms": probe_transform_names(rd.transforms)})
    return RunProbe(model, cfg, rd, tokens, where, result, loss)


def probe_run_checkpoint(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                         dtype: Optional[torch.dtype] = None, source: Optional[str] = None,
                         eps: Optional[float] = None, k_max: Optional[int] = None) -> RunProbe:
    """:func:`probe_run` of the checkpoint at ``path`` (a checkpoint or run folder, loaded with eager attention so
    the maps are there) on its run's probe, the run read from the checkpoint's ``run_config``."""
    from lit_gpt.checkpoint import CheckpointError, load_model
    from lit_gpt.run_config import from_dict

    model, payload = load_model(path, device=device, dtype=dtype, attn_impl="eager")
    if "run_config" not in payload:
        raise CheckpointError(f"{payload['_path']} has no run_config, so its run's probe is unknown; evaluate it "
                              "on a probe file instead (eval_sink.py without --run-probe, with --probe)")
    rp = probe_run(model, from_dict(payload["run_config"]), source=source, eps=eps, k_max=k_max)
    rp.payload = payload
    return rp


if __name__ == "__main__":
    sys.exit("error: `python -m lit_gpt.evaluate` is now `python eval_sink.py CHECKPOINT --run-probe` "
             "(same options: --probe, --eps, --k-max, --device, --out)")
