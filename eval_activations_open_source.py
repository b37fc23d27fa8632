"""Activations behind the sink in open-source causal LMs: per layer and position, ℓ2 norms of hidden states,
queries, keys and values (token 1 vs the rest), the massive-activation ratio ‖h_1‖ / mean‖h_t‖, and
cos(q_t, k_1) vs ‖q_t‖‖k_1‖.

    python eval_activations_open_source.py --models EleutherAI/pythia-160m openai-community/gpt2
    python eval_activations_open_source.py --models /path/SmolLM2-135M-Instruct.Q4_1.gguf --device cpu

Keys and queries are the ones the model attends with (after RoPE, partial rotary included; before the grouped-KV
repeat), recorded by an attention function registered in transformers' AttentionInterface (lit_gpt.hf).
Writes <out>/<model>/activations_<input>.json, norms_<input>.png, cos_norm_<input>.png and
<out>/summary.{md,json,csv}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from lit_gpt.evaluate import batched, evaluate_model
from lit_gpt.plots import plot_cos_norm, plot_norms
from lit_gpt.results import write_record
from lit_gpt.sweep import add_common_args, common_meta, run_hf_sweep, write_table
from lit_gpt.utils import ArgumentParser, atomic_write_text


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__)
    add_common_args(ap, "results/activations_open_source", ("natural",))
    args = ap.parse_args(argv)

    def per_model(spec: str, model, tok, folder: Path, inputs) -> None:
        for kind, tokens in inputs:
            ev = evaluate_model(model, batched(tokens, args.batch_size), T=args.T, activations=True)
            act = ev["activations"]
            d = act.to_dict()
            d["meta"] = {"model": spec, "input": kind, **common_meta(args)}
            d["sink_1"] = ev["sink"].sink[1]
            atomic_write_text(folder / f"activations_{kind}.json", json.dumps(d))
            ratio = act.massive_ratio
            peak = int(ratio.argmax())
            print(f"[{folder.name}] {kind:9s} massive ratio max {float(ratio[peak]):.1f} at layer input {peak}; "
                  f"Sink_1 {ev['sink'].sink[1]:.1f}%", flush=True)
            title = f"{folder.name}, {kind} input (n={args.n}, T={args.T})"
            plot_norms(act, folder / f"norms_{kind}.png", title=title)
            plot_cos_norm(act, folder / f"cos_norm_{kind}.png", title=title)

    failed = run_hf_sweep(args, "activations", per_model)
    summarize(Path(args.out), record=args.record)
    return 1 if failed else 0


def summarize(out: Path, record: Optional[str] = None) -> None:
    """The table over every model folder under ``out``; with ``record`` also the compact raw record (the
    per-layer first-vs-rest summary of every model and input, lit_gpt.results)."""
    rows, models = [], {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        for f in sorted(folder.glob("activations_*.json")):
            d = json.loads(f.read_text())
            s = d["summary"]
            models.setdefault(folder.name, {})[d["meta"]["input"]] = {
                "n_samples": d["n_samples"], "meta": d["meta"], "sink_1": d.get("sink_1"), "per_layer": s}
            ratio = s["massive_ratio"]
            peak = max(range(len(ratio)), key=lambda i: ratio[i])
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            rows.append({
                "model": folder.name, "input": d["meta"]["input"],
                "massive_ratio_max": ratio[peak], "at_layer_input": peak,
                "h1_norm_at_peak": s["hidden_norm"]["first"][peak],
                "h_rest_norm_at_peak": s["hidden_norm"]["rest_mean"][peak],
                "k1_norm": mean(s["key_norm"]["first"]), "k_rest_norm": mean(s["key_norm"]["rest_mean"]),
                "v1_norm": mean(s["value_norm"]["first"]), "v_rest_norm": mean(s["value_norm"]["rest_mean"]),
                "cos_q_k1": mean(s["cos_first_per_layer"]), "cos_q_krest": mean(s["cos_rest_per_layer"]),
                "qk1_normprod": mean(s["normprod_first_per_layer"]),
                "qkrest_normprod": mean(s["normprod_rest_per_layer"]),
                "sink_1": d.get("sink_1"),
            })
    if rows:
        write_table(rows, list(rows[0]), out, meta={
            "massive_ratio": "‖h_1‖ / mean_{t>1} ‖h_t‖ of the input of layer l (last = output of the last layer)",
            "key/value/cos/normprod": "means over layers (and heads); q scaled so that logit = q·k/sqrt(d)"})
    if record:
        write_record(record, {"what": "activations of open-source LMs (eval_activations_open_source.py): per layer, "
                                      "token 1 ('first') vs the mean over tokens 2..T ('rest_mean')",
                              "summary": rows, "models": models})


if __name__ == "__main__":
    sys.exit(main())
