"""Decoding latency and cache memory of the streaming cache vs dense attention, and chunked-prefill throughput,
on any device; also checks on that device that chunked prefill equals token-by-token streaming.

For each stream position P in --positions: fill the cache to P with chunked prefill, then time --steps decoding
steps (median ms/step) for each of --methods: dense attention (a never-wrapping ring of P + steps keys) and
sinks + window by default.

  python benchmarks/streaming_speed.py --model tinyllama_demo --positions 1024,4096 --cache-size 256 --chunk 512 \\
      --out out/bench_cpu.json
  python benchmarks/streaming_speed.py --model tinyllama_60M --device cuda --dtype bfloat16 \\
      --positions 4096,16384,65536 --cache-size 1024 --chunk 2048 --out $OUT/streaming_speed.json         # (GPU)
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt import GPT, Config  # noqa: E402
from lit_gpt.results import environment  # noqa: E402
from lit_gpt.generate import GPTRunner, prefill  # noqa: E402
from lit_gpt.streaming import StreamingSpec, dense_spec  # noqa: E402
from lit_gpt.streaming_io import MethodArgs, add_method_args  # noqa: E402
from lit_gpt.utils import ArgumentParser, atomic_write_text, parse_dtype  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_ms(runner, spec, P, steps, chunk, vocab, device):
    runner.start(1, spec)
    ids = torch.randint(0, vocab, (P,), device=device).tolist()
    sync(device)
    t0 = time.perf_counter()
    prefill(runner, [ids], chunk_size=chunk)
    sync(device)
    t_prefill = time.perf_counter() - t0
    times = []
    tok = torch.randint(0, vocab, (1, 1), device=device)
    for i in range(steps):
        t0 = time.perf_counter()
        runner.step(tok, torch.tensor([[P + i]], device=device))
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    nbytes = runner.cache_bytes()
    runner.stop()
    return statistics.median(times[2:] or times), P / t_prefill, nbytes


@torch.no_grad()
def chunk_equals_tokens(runner, spec, n, chunk, vocab, device):
    ids = torch.randint(0, vocab, (1, n), device=device)
    outs = []
    for c in (1, chunk):
        runner.start(1, spec)
        outs.append(torch.cat([runner.step(ids[:, i:i + c], torch.arange(i, min(n, i + c), device=device))
                               for i in range(0, n, c)], 1).float())
        runner.stop()
    return float((outs[0] - outs[1]).abs().max()), float(outs[0].abs().max())


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tinyllama_demo", help="a named lit_gpt config (random weights)")
    ap.add_argument("--positions", default="1024,4096")
    ap.add_argument("--steps", type=int, default=20)
    add_method_args(ap, allowed=("dense", "window", "sink", "sink_original", "lminfinite"), methods="dense,sink")
    ap.add_argument("--check-tokens", type=int, default=300, help="stream length of the chunk == token check")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(Config.from_name(args.model)).to(device=device, dtype=parse_dtype(args.dtype)).eval()
    runner = GPTRunner(model)
    V = model.config.vocab_size
    opts = MethodArgs.from_args(args)
    rows = []
    for P in (int(x) for x in args.positions.split(",")):
        for m in opts.methods():
            name, spec = m.label, m.spec if m.spec is not None else dense_spec(P + args.steps + 1)
            ms, tps, nbytes = decode_ms(runner, spec, P, args.steps, opts.chunk, V, device)
            rows.append(dict(position=P, method=name, decode_ms=ms, prefill_tok_s=tps, cache_mib=nbytes / 2**20))
            print(f"P={P:>6} {name:>18}: decode {ms:7.2f} ms/step, prefill {tps:9.0f} tok/s, cache {nbytes / 2**20:8.2f} MiB",
                  flush=True)
    diff, scale = chunk_equals_tokens(runner, StreamingSpec(args.start_size, 64), args.check_tokens, 50, V, device)
    print(f"chunked (50) vs token-by-token logits, {args.check_tokens} tokens through a 4+64 cache: "
          f"max |diff| {diff:.3g} (max |logit| {scale:.3g})")
    result = dict(model=args.model, device=str(device), dtype=args.dtype, torch=torch.__version__,
                  gpu=torch.cuda.get_device_name() if device.type == "cuda" else None, rows=rows,
                  chunk_vs_token_max_abs_diff=diff, max_abs_logit=scale, command=" ".join(sys.argv),
                  environment=environment())
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
