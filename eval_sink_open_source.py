"""Sink_k^ε of open-source causal LMs (Hub ids, local folders, GGUF files) on the paper's three inputs.

    python eval_sink_open_source.py                                  # the seed's 30-model pool (needs a GPU)
    python eval_sink_open_source.py --models EleutherAI/pythia-160m facebook/opt-125m --dtype bfloat16
    python eval_sink_open_source.py --models /path/SmolLM2-135M-Instruct.Q4_1.gguf --device cpu

Per model: natural text (the JSONL probe), uniformly random tokens, one repeated token; n samples of T tokens,
natural text with BOS where the model's tokenizer adds one, random and repeated inputs
with nothing in front (the paper's inputs); attention maps from the model's eager attention, fed batch by batch to
lit_gpt.sink_metrics.SinkMeter. Writes <out>/<model>/sink_<input>.json, sink.png (Sink_1 vs ε and per layer),
attention_<input>.png (chosen heads), and <out>/summary.{md,json,csv} with Sink_1 per model and input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from lit_gpt.evaluate import batched, evaluate_model
from lit_gpt.hf import text_config
from lit_gpt.plots import plot_attention_maps, plot_model_bars, plot_sink
from lit_gpt.results import write_record
from lit_gpt.sink_metrics import format_sink
from lit_gpt.sweep import add_common_args, common_meta, run_hf_sweep, write_table
from lit_gpt.utils import atomic_write_text, invalid_choice


def parse_heads(specs: Optional[List[str]]):
    out = []
    for s in specs or []:
        try:
            layer, head = (int(x) for x in s.split(":"))
        except ValueError:
            raise SystemExit(invalid_choice("--plot-heads", s, "LAYER:HEAD pairs such as 0:0 5:3")) from None
        out.append((layer, head))
    return out


def default_heads(n_layer: int):
    return sorted({(0, 0), (n_layer // 2, 0), (n_layer - 1, 0)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "results/sink_open_source", ("natural", "random", "repeated"))
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--k-max", type=int, default=10)
    ap.add_argument("--plot-heads", nargs="*", default=None,
                    help="LAYER:HEAD pairs whose mean attention map is plotted (default: first/middle/last layer, "
                         "head 0)")
    args = ap.parse_args(argv)
    heads = parse_heads(args.plot_heads)

    def per_model(spec: str, model, tok, folder: Path, inputs) -> None:
        chosen = heads or default_heads(int(text_config(model).num_hidden_layers))
        curves, per_layer = {}, {}
        for kind, tokens in inputs:
            ev = evaluate_model(model, batched(tokens, args.batch_size), T=args.T, eps=args.eps, k_max=args.k_max,
                                activations=False, attention_maps=chosen)
            res = ev["sink"]
            res.meta = {"model": spec, "input": kind, **common_meta(args),
                        "first_tokens": tokens[0, :4].tolist()}
            print(f"[{folder.name}] {kind:9s} {format_sink(res, 3)}", flush=True)
            d = res.to_dict()
            d["loss"] = ev["loss"]
            atomic_write_text(folder / f"sink_{kind}.json", json.dumps(d))
            curves[kind] = (res.eps_grid, res.sink_vs_eps[0])
            per_layer[kind] = res.per_layer[:, 0]
            plot_attention_maps({f"layer {l} head {h}": m for (l, h), m in ev["attention_maps"].items()},
                                folder / f"attention_{kind}.png", title=f"{folder.name}, {kind} input")
        plot_sink(curves, per_layer, folder / "sink.png", title=folder.name, eps=args.eps)

    failed = run_hf_sweep(args, "sink", per_model)
    summarize(Path(args.out), record=args.record)
    return 1 if failed else 0


def compact(d: dict) -> dict:
    """The part of one sink_<input>.json the docs report: Sink_1..10 and their spread, the loss, Sink_1 per
    layer, Sink_1 vs ε and the mean α_1 of every (layer, head)."""
    return {"sink": d["sink"], "sink_std": d["sink_std"], "loss": d.get("loss"), "eps": d["eps"],
            "n_samples": d["n_samples"], "n_layers": d["n_layers"], "n_heads": d["n_heads"],
            "meta": d.get("meta", {}), "sink_1_per_layer": [row[d["n_extra"]] for row in d["per_layer"]],
            "eps_grid": d["eps_grid"], "sink_1_vs_eps": d["sink_vs_eps"][d["n_extra"]],
            "alpha_1": [[head[d["n_extra"]] for head in layer] for layer in d["mean_alpha"]]}


def summarize(out: Path, record: Optional[str] = None) -> None:
    """The table over every model folder under ``out`` (so a resumed sweep reports all of them); with ``record``
    also the compact raw record of every model and input (lit_gpt.results)."""
    rows, bars, models = [], {}, {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        for kind in ("natural", "random", "repeated"):
            f = folder / f"sink_{kind}.json"
            if not f.is_file():
                continue
            d = json.loads(f.read_text())
            models.setdefault(folder.name, {})[kind] = compact(d)
            rows.append({"model": folder.name, "input": kind, "sink_1": d["sink"]["sink_1"],
                         "sink_1_std": d["sink_std"]["sink_1"], "sink_2": d["sink"].get("sink_2"),
                         "n": d["n_samples"], "layers": d["n_layers"], "heads": d["n_heads"],
                         "first_tokens": " ".join(map(str, d.get("meta", {}).get("first_tokens", []))),
                         "eps": d["eps"], "T": d.get("meta", {}).get("T"), "dtype": d.get("meta", {}).get("dtype")})
            bars.setdefault(folder.name, {})[kind] = d["sink"]["sink_1"]
    if not rows:
        return
    cols = ["model", "input", "sink_1", "sink_1_std", "sink_2", "n", "T", "eps", "layers", "heads", "dtype",
            "first_tokens"]
    write_table(rows, cols, out, meta={"metric": "Sink_k^eps in % of layer x head pairs, mean over samples; "
                                                 "sink_1_std = std over samples"})
    plot_model_bars(bars, out / "sink_1.png", title=f"Sink_1 (ε={rows[0]['eps']})")
    if record:
        write_record(record, {"what": "Sink_k^eps (%) of open-source LMs on natural / random / repeated inputs "
                                      "(eval_sink_open_source.py)", "models": models})


if __name__ == "__main__":
    sys.exit(main())
