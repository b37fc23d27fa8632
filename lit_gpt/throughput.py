"""What keeps the training loop as fast as the bare step: host->device copies that do not stall the GPU, and the
phase timer behind ``pretrain.py --profile`` that shows where the loop loses time against the bare step.

* :class:`PinnedBatches` copies each CPU batch into one of two page-locked buffers and from there to the device
  asynchronously: a copy from pageable memory makes the host wait until the GPU has drained its queue, once per
  micro-batch.
* :class:`PhaseTimer` adds the time between marks to named phases (data, forward+backward, clip+optimizer,
  logging, evaluation); it synchronises the device at every mark, so it runs only in profile mode.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Optional

import torch


class PinnedBatches:
    """``to_device(cpu_batch)`` through two reusable pinned buffers (CUDA); a plain ``.to(device)`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.bufs: List[Optional[torch.Tensor]] = [None, None]
        self.done: List[Optional[torch.cuda.Event]] = [None, None]
        self.i = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return batch.to(self.device)
        i, self.i = self.i, self.i ^ 1
        buf = self.bufs[i]
        if buf is None or buf.shape != batch.shape or buf.dtype != batch.dtype:
            buf = self.bufs[i] = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)
        elif self.done[i] is not None:
            self.done[i].synchronize()          # the copy out of this buffer (two batches ago) has finished
        buf.copy_(batch)
        out = buf.to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.done[i] = ev
        return out


class PhaseTimer:
    """Seconds per named phase over the steps after ``skip`` warm-up steps (compilation); no-op when disabled."""

    def __init__(self, device: torch.device, enabled: bool = False, skip: int = 3) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self.skip = skip
        self.seconds: Dict[str, float] = {}
        self.steps = 0
        self.tokens = 0
        self._seen = 0
        self._t: Optional[float] = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        if self.enabled:
            self._t = self._now()

    def mark(self, phase: str) -> None:
        if not self.enabled or self._t is None:
            return
        t = self._now()
        if self._seen >= self.skip:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + t - self._t
        self._t = t

    def end_step(self, tokens: int) -> None:
        if not self.enabled:
            return
        if self._seen >= self.skip:
            self.steps += 1
            self.tokens += tokens
        self._seen += 1

    def summary(self) -> Dict:
        total = sum(self.seconds.values())
        rows = [{"phase": k, "ms_per_step": round(1e3 * v / max(self.steps, 1), 2),
                 "share_%": round(100 * v / total, 1) if total else 0.0} for k, v in self.seconds.items()]
        return {"steps": self.steps, "tokens_per_s_synced": self.tokens / total if total else None,
                "phases": rows}


def time_steps(step, n: int, device: torch.device) -> float:
    """Seconds per call of ``step()`` over n calls, one synchronisation at each end (after one warm-up call)."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / n


def compile_blocks(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """``torch.compile`` each transformer block in place (regional compilation): identical blocks share their
    compiled code, so compiling takes about one block's time instead of the whole model's; the embedding, the final
    norm and the loss (:mod:`lit_gpt.fused_ce`) stay eager. Returns the model."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in model.blocks:
        block.compile(**kwargs)
    return model


COMPILE_SCOPES = ("auto", "blocks", "model")     # train.compile_scope


def compile_model(model: torch.nn.Module, scope: str = "auto", **kwargs) -> torch.nn.Module:
    """``train.compile`` with ``train.compile_scope``:

    * ``blocks``: each block compiled in place (:func:`compile_blocks`); compiles in about one block's time.
    * ``model``: ``torch.compile(model)``: one graph from the embedding to the final norm, so inductor fuses across
      block edges (the residual add + RMSNorm of the next block, RoPE tables computed once) at the cost of compiling
      every layer; the fused loss (:mod:`lit_gpt.fused_ce`) runs eagerly after it either way.
    * ``auto``: ``blocks`` where attention takes SDPA, ``model`` where it may take FlexAttention (windows, prefix
      masks, ALiBi, k*/v* slots, sink logits on CUDA), whose compiled kernel was measured under a whole-model compile.

    ``kwargs`` go to ``torch.compile`` (e.g. ``backend``). Returns the model to call."""
    if scope not in COMPILE_SCOPES:
        from lit_gpt.utils import invalid_choice
        raise ValueError(invalid_choice("compile_scope", scope, COMPILE_SCOPES))
    if scope == "auto":
        cfg = model.config
        flex = cfg.attn_impl == "flex" or (cfg.attn_impl == "auto" and cfg.attn_op == "softmax" and (
            cfg.attn_mask != "causal" or cfg.pos_encoding == "alibi" or cfg.kv_bias in ("k", "kv") or cfg.sink_logit))
        scope = "model" if flex else "blocks"
    return torch.compile(model, **kwargs) if scope == "model" else compile_blocks(model, **kwargs)


def eager() -> contextlib.AbstractContextManager:
    """Run compiled code eagerly inside the block (evaluation and sink probes: other shapes and the analysis path
    would each cost a compilation for a few calls)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()
