"""Sink on a probe set: the one function training and the eval scripts call.

``sink_on_probe(model, tokens)`` runs a :class:`lit_gpt.GPT` (or anything with its ``return_analysis``
forward) over probe rows and feeds the attention maps to :class:`lit_gpt.sink_metrics.SinkMeter`:

    from lit_gpt.evaluate import sink_on_probe
    result, loss = sink_on_probe(model, tokens)        # tokens (n, T+1): loss on tokens 1..T; (n, T): loss None
    result.sink[1]                                      # Sink_1^eps in %
    result, _ = sink_on_probe(model, inputs, has_targets=False)   # (n, T) inputs only

``probe_tokens`` builds the probe rows a run uses (held-out natural text or held-out chunks), and
``probe_view(rows, transforms)`` turns them into what the model is fed, following the seed's
``pretrain/eval_sink_pretrain.py``: the run's fixed token is put in place in the inputs (its ``--mode fix``),
random-token runs are probed on the natural text (its ``--mode base``), and the targets are the natural next
tokens. ``sink_on_probe`` (training, ``python -m lit_gpt.evaluate``) and ``eval_sink.py`` both go through it.

Command line (evaluate a checkpoint the way training did)::

    python -m lit_gpt.evaluate --checkpoint checkpoints/tinyllama_60m [--probe auto|shards|FILE] [--out sink.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Optional, Sequence, Tuple

import torch

from lit_gpt.sink_metrics import DEFAULT_EPS, DEFAULT_K, SinkResult, format_sink


def probe_view(rows: torch.Tensor, transforms: Sequence = (), has_targets: bool = True
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(inputs, targets)`` of probe rows as the seed's ``pretrain/eval_sink_pretrain.py`` feeds a run's model.

    rows: ``(n, T + 1)`` natural-text ids when ``has_targets`` (inputs ``[:, :T]``, targets ``[:, 1:]``), else
    ``(n, T)`` inputs and ``targets = None``. transforms: the run's data transforms
    (:func:`lit_gpt.data.make_transforms`); those with ``on_probe`` are applied to the inputs only. That is the
    fixed token: the seed sets ``inputs[:, fix_position] = 1`` after slicing, so its labels stay the natural next
    tokens. Random tokens are not applied: the seed evaluates random-token runs with ``--mode base`` on the
    natural-text probe. The result never aliases ``rows``.
    """
    if rows.dim() != 2:
        raise ValueError(f"probe rows must be (n, T) or (n, T+1), got shape {tuple(rows.shape)}")
    T = rows.shape[1] - int(has_targets)
    inputs = rows[:, :T].clone()
    for t in transforms:
        if getattr(t, "on_probe", False):
            inputs = torch.as_tensor(t(inputs.numpy(), keys=range(len(inputs))))
    return inputs, (rows[:, 1:].clone() if has_targets else None)


@torch.no_grad()
def sink_on_probe(model: torch.nn.Module, tokens: torch.Tensor, eps: float = DEFAULT_EPS, k_max: int = DEFAULT_K,
                  batch_size: int = 20, has_targets: bool = True, transforms: Sequence = ()
                  ) -> Tuple[SinkResult, Optional[float]]:
    """Sink_1..k_max^eps (in %) of ``model`` on probe rows, and the mean next-token loss on them: the training-time
    view of :func:`lit_gpt.analysis.evaluate_model` (which also serves eval_sink.py and the HF scripts).

    Args:
        model: our GPT or a Hugging Face causal LM.
        tokens: ``(n, T + 1)`` ids when ``has_targets`` (inputs ``[:, :T]``, loss on ``[:, 1:]``, as the seed
            reported next to the sink), else ``(n, T)`` inputs and no loss.
        eps, k_max: the metric's threshold and how many leading positions to report.
        batch_size: probe rows per forward.
        transforms: the run's data transforms, applied as the seed's probe does (:func:`probe_view`).

    Returns:
        ``(SinkResult, loss)``; the model is left in the train/eval mode it came in.
    """
    from lit_gpt.analysis import batched, evaluate_model

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


def probe_tokens(source: str, n: int, T: int, tokenizer=None, valid_set=None) -> Tuple[torch.Tensor, str]:
    """``(n, T + 1)`` natural probe rows and a description of where they came from.

    source: a JSONL file of held-out texts (the first T+1 tokens of each, no BOS), ``"shards"`` (evenly spaced
    held-out chunks of the validation shards, via ``valid_set.rows``), or ``"auto"``: the default natural
    probe ``datasets/probe_valid_natural.jsonl`` (built from ../shared/corpus validation files when present),
    else ``"shards"``. The rows are untransformed: :func:`probe_view` applies the run's probe transforms.
    """
    from lit_gpt.probe import DEFAULT_PROBE, default_probe_sources, load_probe_texts, natural_tokens

    if source == "auto":
        source = str(DEFAULT_PROBE) if (tokenizer is not None and (DEFAULT_PROBE.is_file() or default_probe_sources())) \
            else "shards"
    if source == "shards":
        if valid_set is None:
            raise ValueError("probe.source=shards needs validation shards (data.valid)")
        return valid_set.rows(n, T + 1), f"{n} held-out chunks of the validation shards"
    if tokenizer is None:
        raise ValueError(f"probe.source={source!r} is a text file: set data.tokenizer to tokenise it")
    texts = load_probe_texts(source)
    if len(texts) < n:
        raise ValueError(f"probe file {source} has {len(texts)} texts; probe.n={n} are needed")
    return natural_tokens(tokenizer.encode, texts[:n], T=T + 1), f"{n} texts of {source}"


def probe_transform_names(transforms: Sequence) -> list:
    """The transforms :func:`probe_view` applies, for the records ("FixedToken(position=1, token_id=1)")."""
    return [repr(t) for t in transforms if getattr(t, "on_probe", False)]


def sink_summary(result: SinkResult, loss: Optional[float]) -> dict:
    """The compact record training logs (Sink_k in %, extra slots, probe loss)."""
    out = {f"sink_{k}": v for k, v in result.sink.items()}
    if result.sink_extra:
        out.update({f"sink_extra_{i}": v for i, v in enumerate(result.sink_extra)})
    if loss is not None:
        out["probe_loss"] = loss
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from lit_gpt.checkpoint import CheckpointError, load_model
    from lit_gpt.run_config import from_dict
    from lit_gpt.trainer import make_probe, open_run_data
    from lit_gpt.utils import atomic_write_text

    ap = argparse.ArgumentParser(description="Sink_1..k and probe loss of a pretraining checkpoint")
    ap.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run folder (final/, else the newest step)")
    ap.add_argument("--probe", default=None, help="auto | shards | probe JSONL (default: the run's probe.source)")
    ap.add_argument("--eps", type=float, default=None)
    ap.add_argument("--k_max", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the full SinkResult as JSON here")
    a = ap.parse_args(argv)
    try:
        model, payload = load_model(a.checkpoint, device=a.device, attn_impl="eager")
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "run_config" not in payload:
        print(f"error: {payload['_path']} has no run_config; evaluate it with eval_sink.py and a probe file",
              file=sys.stderr)
        return 2
    cfg = from_dict(payload["run_config"])
    if a.probe:
        cfg.probe.source = a.probe
    pc = cfg.probe
    rd = open_run_data(cfg, model.config, need_train=False)
    tokens, where = make_probe(cfg, rd)
    result, loss = sink_on_probe(model, tokens, eps=a.eps if a.eps is not None else pc.eps,
                                 k_max=a.k_max or pc.k_max, batch_size=pc.batch_size, transforms=rd.transforms)
    result.meta.update({"checkpoint": payload["_path"], "step": payload.get("step"), "probe": where,
                        "probe_transforms": probe_transform_names(rd.transforms)})
    print(f"{payload['_path']} (step {payload.get('step')}), probe: {where}")
    print(format_sink(result))
    if loss is not None:
        print(f"probe loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f})")
    if a.out:
        rec = result.to_dict()
        rec["probe_loss"] = loss
        atomic_write_text(a.out, json.dumps(rec, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
