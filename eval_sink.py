"""Sink_1..10, probe-set loss and per-layer norms of our checkpoints (config and weights from the checkpoint).

    python eval_sink.py checkpoints/tinyllama_60M/final
    python eval_sink.py checkpoints/run_a checkpoints/run_b --inputs natural random repeated --out results/sink.json
    python eval_sink.py checkpoints/tinyllama_60M --run-probe --out checkpoints/tinyllama_60M/sink_eval.json

--run-probe measures a checkpoint the way its training run did (lit_gpt.evaluate.probe_run): the run's probe
(probe.source: a text file, `shards` or `auto`; probe.n, T, eps, k_max, batch_size; --probe, --eps, --k-max
override them), Sink_1..k and the probe loss, and --out writes that one SinkResult record (sink_eval.json).

Inputs: the natural-text probe (JSONL; n samples, the first T+1 tokens each: T as input, loss on predicting
tokens 2..T+1 as in the seed), uniformly random tokens, one repeated token. The checkpoint describes its run:
the tokenizer is --tokenizer when given, else the run's data.tokenizer, else ../shared's GPT-NeoX; the run's data
transforms are applied as the seed's evaluation does and as training does (lit_gpt.probe.probe_view): a
fixed-token run gets its fixed token in place in every input, a random-token run is probed on the inputs as they
are. Attention maps come from the model's analysis path and go batch by batch through
lit_gpt.sink_metrics.SinkMeter (lit_gpt.evaluate.evaluate_model).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from lit_gpt.analysis import first_vs_rest
from lit_gpt.evaluate import batched, evaluate_model, evaluation_to_dict
from lit_gpt.probe import INPUT_KINDS, probe_inputs
from lit_gpt.sink_metrics import format_sink
from lit_gpt.utils import DTYPES, atomic_write_text, default_device, parse_dtype

DEFAULT_TOKENIZER = str(Path(__file__).resolve().parent.parent / "shared" / "tokenizers" / "gpt-neox-20b")


def evaluate_checkpoint(path: str, args, texts) -> dict:
    from lit_gpt.checkpoint import checkpoint_tokenizer, load_model
    from lit_gpt.data import make_transforms
    from lit_gpt.probe import probe_transform_names, probe_view
    from lit_gpt.run_config import from_dict
    from lit_gpt.tokenizer import Tokenizer

    device = args.device or default_device()
    model, payload = load_model(path, device=device, dtype=parse_dtype(args.dtype))
    cfg = model.config
    rc = payload.get("run_config") or {}
    run = from_dict(rc) if "data" in rc else None          # a training run's config (else a hand-written record)
    tok_path = args.tokenizer or checkpoint_tokenizer(payload) or DEFAULT_TOKENIZER
    try:
        tok = Tokenizer(tok_path)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer {tok_path!r} of {payload['_path']} cannot be loaded ({e}); "
                         "pass --tokenizer") from e
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has vocab_size={tok.vocab_size} > the model's {cfg.vocab_size}; "
                         "pass the checkpoint's tokenizer with --tokenizer")
    transforms = make_transforms(run.data, tok.vocab_size, cfg.vocab_size) if run else []
    prefix = [tok.bos_id] if args.bos else []
    exclude = [i for i in (tok.bos_id, tok.eos_id) if i is not None]
    record = {"checkpoint": payload["_path"], "config": cfg.name, "step": payload.get("step"),
              "tokenizer": str(tok_path), "bos": bool(args.bos), "probe_transforms": probe_transform_names(transforms),
              "inputs": {}}
    print(f"== {payload['_path']} ({cfg.name}, step {payload.get('step')}, tokenizer {tok.name}"
          + (f", probe inputs with {', '.join(record['probe_transforms'])}" if record["probe_transforms"] else "")
          + ")")
    for kind in args.inputs:
        tokens = probe_inputs(kind, args.n, args.T + 1, encode=lambda t: tok.encode(t, bos=args.bos), texts=texts,
                              vocab_size=tok.vocab_size, prefix=prefix, exclude=exclude, seed=args.seed,
                              repeat_token=args.repeat_token)
        ev = evaluate_model(model, batched(probe_view(tokens, transforms), args.batch_size), T=args.T, eps=args.eps,
                            k_max=args.k_max, activations=True,
                            attention_maps=[(l, 0) for l in sorted({0, cfg.n_layer - 1})])
        ev["sink"].meta = {"input": kind, "n": args.n, "T": args.T}
        print(f"  {kind:9s} {format_sink(ev['sink'])}  loss {ev['loss']:.4f}")
        act = ev["activations"]
        first, rest = first_vs_rest(act.hidden_norm)
        rows = ["  layer | ‖h_1‖ | mean ‖h_t>1‖ | ratio | Sink_1 in layer (%)"]
        for l in range(len(first)):
            s1 = f"{float(ev['sink'].per_layer[l, ev['sink'].n_extra]):.1f}" if l < cfg.n_layer else "-"
            rows.append(f"  {l:5d} | {float(first[l]):9.2f} | {float(rest[l]):12.2f} | "
                        f"{float(first[l] / rest[l]):6.2f} | {s1}")
        print("\n".join(rows))
        record["inputs"][kind] = evaluation_to_dict(ev)
        if args.plots:
            _plots(ev, Path(args.plots) / Path(payload["_path"]).stem, kind, cfg)
    return record


def evaluate_as_trained(path: str, args) -> dict:
    """--run-probe: Sink_1..k and the probe loss of one checkpoint on its run's probe
    (lit_gpt.evaluate.probe_run_checkpoint); returns the SinkResult record with ``probe_loss``."""
    from lit_gpt.evaluate import probe_run_checkpoint

    rp = probe_run_checkpoint(path, device=args.device or default_device(), dtype=parse_dtype(args.dtype),
                              source=args.probe, eps=args.eps, k_max=args.k_max)
    result, loss, where, payload = rp.result, rp.loss, rp.where, rp.payload
    result.meta.update({"checkpoint": payload["_path"], "step": payload.get("step")})
    print(f"{payload['_path']} (step {payload.get('step')}), probe: {where}")
    print(format_sink(result))
    if loss is not None:
        print(f"probe loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f})")
    rec = result.to_dict()
    rec["probe_loss"] = loss
    return rec


def _plots(ev, folder: Path, kind: str, cfg) -> None:
    from lit_gpt.plots import plot_attention_maps, plot_cos_norm, plot_norms, plot_sink

    res = ev["sink"]
    col = res.n_extra
    plot_sink({kind: (res.eps_grid, res.sink_vs_eps[col])}, {kind: res.per_layer[:, col]},
              folder / f"sink_{kind}.png", title=f"{cfg.name} ({kind})", eps=res.eps)
    plot_norms(ev["activations"], folder / f"norms_{kind}.png", title=f"{cfg.name} ({kind})")
    plot_cos_norm(ev["activations"], folder / f"cos_norm_{kind}.png", title=f"{cfg.name} ({kind})")
    plot_attention_maps({f"layer {l} head {h}": m for (l, h), m in ev["attention_maps"].items()},
                        folder / f"attention_{kind}.png", title=f"{cfg.name} ({kind})", n_extra=res.n_extra)


def main(argv=None) -> int:
    from lit_gpt.probe import DEFAULT_PROBE, load_probe_texts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="checkpoint folders or run folders (final/, else the latest step)")
    ap.add_argument("--tokenizer", default=None,
                    help="default: the checkpoint's data.tokenizer, else ../shared/tokenizers/gpt-neox-20b")
    ap.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS (off: as in pretraining)")
    ap.add_argument("--inputs", nargs="+", default=["natural"], choices=INPUT_KINDS)
    ap.add_argument("--run-probe", action="store_true",
                    help="measure as the checkpoint's training run did: its probe, n, T, eps, k_max and batch size "
                         "(--probe, --eps, --k-max override); --out writes its SinkResult record; one checkpoint")
    ap.add_argument("--probe", default=None,
                    help=f"natural-text JSONL probe (default {DEFAULT_PROBE}); with --run-probe: auto | shards | a "
                         "JSONL file (default: the run's probe.source)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--eps", type=float, default=None, help="default 0.3 (--run-probe: the run's probe.eps)")
    ap.add_argument("--k-max", type=int, default=None, help="default 10 (--run-probe: the run's probe.k_max)")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat-token", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="JSON file with every number (and the per-layer arrays)")
    ap.add_argument("--plots", default=None, help="folder for PNG plots (one sub-folder per checkpoint)")
    args = ap.parse_args(argv)
    from lit_gpt.checkpoint import CheckpointError

    if args.run_probe:
        if len(args.checkpoints) > 1 and args.out:
            ap.error(f"--run-probe --out writes one record; got {len(args.checkpoints)} checkpoints (give one)")
        try:
            records = [evaluate_as_trained(p, args) for p in args.checkpoints]
        except (CheckpointError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.out:
            atomic_write_text(args.out, json.dumps(records[0], indent=1) + "\n")
            print(f"wrote {args.out}")
        return 0
    args.probe = args.probe or str(DEFAULT_PROBE)
    args.eps = 0.3 if args.eps is None else args.eps
    args.k_max = 10 if args.k_max is None else args.k_max
    texts = load_probe_texts(args.probe) if "natural" in args.inputs else None
    try:
        records = [evaluate_checkpoint(p, args, texts) for p in args.checkpoints]
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_text(args.out, json.dumps({"args": vars(args), "checkpoints": records}))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
