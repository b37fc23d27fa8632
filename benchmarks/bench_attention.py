"""Attention implementations head to head: forward+backward time and peak memory of one attention call.

    python benchmarks/bench_attention.py                      # GPU sizes (B=8, H=8, d=96, T=1024..4096)
    python benchmarks/bench_attention.py --quick              # tiny CPU smoke run
    python benchmarks/bench_attention.py --curve              # cost over T: full causal vs window / Λ (sink + window)
Prints a table and writes JSON (command, git commit, hardware) to --out.
"""
from __future__ import annotations

import argparse
import math

import torch

from common import environment, print_table, time_fn, write_json  # noqa: F401
from lit_gpt.attention import (causal_mask, dense_mask, eager_attention, sdpa_attention, set_sdpa_backend,
                               sink_window_mask, window_mask)
from lit_gpt.positional import alibi_bias, alibi_slopes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--curve", action="store_true", help="attention cost over T at a fixed number of tokens")
    ap.add_argument("--tokens", type=int, default=32768, help="--curve: batch = tokens / T")
    ap.add_argument("--sinks", type=int, default=4, help="--curve: sink tokens of the Λ mask")
    ap.add_argument("--budget-s", type=float, default=1e9, help="--curve: stop starting new lengths after this")
    a = ap.parse_args()
    if a.curve:
        return curve(a)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, H, d = (8, 8, 96) if not a.quick else (1, 2, 16)
    lengths = a.lengths or ([1024, 2048, 4096] if not a.quick else [64, 128])
    rows = []
    for T in lengths:
        q, k, v = (torch.randn(B, H, T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        pos = torch.arange(T, device=device).unsqueeze(0)
        cmask = dense_mask(causal_mask, pos, pos)
        w = min(a.window, T // 2)
        wfn = window_mask(w)
        wmask = dense_mask(wfn, pos, pos)
        bias = alibi_bias(pos, pos, alibi_slopes(H)).to(device)
        cases = {
            "eager softmax causal": lambda: eager_attention(q, k, v, mask=cmask)[0],
            "sdpa causal (is_causal)": lambda: sdpa_attention(q, k, v, mask=None, is_causal=True),
            f"eager softmax window{w}": lambda: eager_attention(q, k, v, mask=wmask)[0],
            f"sdpa window{w} (dense mask)": lambda: sdpa_attention(q, k, v, mask=wmask),
            "sdpa alibi (float mask)": lambda: sdpa_attention(q, k, v, mask=cmask, bias=bias),
            "eager sigmoid causal (Z=1)": lambda: eager_attention(q, k, v, mask=cmask, op="sigmoid", normalize=False)[0],
        }
        if device.type == "cuda":
            from lit_gpt.flex import flex_attention_forward
            cases[f"flex window{w} (block sparse)"] = lambda: flex_attention_forward(q, k, v, wfn, scale=1 / math.sqrt(d))
            cases["flex causal"] = lambda: flex_attention_forward(q, k, v, causal_mask, scale=1 / math.sqrt(d))
        for name, fn in cases.items():
            def step():
                out = fn()
                out.float().sum().backward()
                q.grad = k.grad = v.grad = None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                sec = time_fn(step, device, warmup=3, repeat=10 if not a.quick else 3)
                mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
                flops = 4 * B * H * T * T * d * 3 / 2 * (1 if "window" not in name else 2 * w / T)  # fwd+bwd, causal
                rows.append({"T": T, "impl": name, "ms": round(sec * 1e3, 3), "peak_MiB": round(mem, 1),
                             "TFLOP/s(useful)": round(flops / sec / 1e12, 1)})
            except Exception as e:  # report, don't hide
                rows.append({"T": T, "impl": name, "ms": f"error: {type(e).__name__}: {str(e)[:80]}"})
    print_table(rows, ["T", "impl", "ms", "peak_MiB", "TFLOP/s(useful)"])
    write_json(a.out, rows, {"shape": {"B": B, "H": H, "d": d, "dtype": str(dtype)}})


def curve(a) -> None:
    """Forward + backward of one attention layer (H=8, d=96, bf16) at batch tokens/T for each T: full causal
    (SDPA's flash kernel, and cuDNN's), the sliding window and the Λ mask (sinks + window) through our FlexAttention
    path (block-sparse; the Λ mask as window + merged sink columns, and as one Flex call over the whole mask), and the window as a dense mask through SDPA (what the cost would be without sparsity)."""
    import time

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    H, d = (8, 96) if not a.quick else (2, 16)
    lengths = a.lengths or ([16384, 2048, 4096, 8192, 1024] if not a.quick else [128, 64])
    tokens = a.tokens if not a.quick else 256
    rows, t_start = [], time.perf_counter()
    meta = {"shape": {"tokens": tokens, "H": H, "d": d, "dtype": str(dtype), "window": a.window, "sinks": a.sinks},
            "pass": "forward + backward of one layer"}
    for T in lengths:
        if time.perf_counter() - t_start > a.budget_s:
            rows.append({"T": T, "impl": "skipped (time budget)"})
            continue
        B = max(1, tokens // T)
        w = min(a.window, T // 4)
        q, k, v = (torch.randn(B, H, T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        scale = 1 / math.sqrt(d)
        cases = {"causal sdpa (default kernel)": ("default", lambda: sdpa_attention(q, k, v, mask=None, is_causal=True))}
        if device.type == "cuda":
            from lit_gpt.flex import flex_attention_forward
            cases["causal sdpa (cudnn)"] = ("cudnn", cases["causal sdpa (default kernel)"][1])
            wfn, lfn = window_mask(w), sink_window_mask(a.sinks, w)      # one function each: one block mask each
            cases[f"window {w} flex"] = ("default", lambda: flex_attention_forward(q, k, v, wfn, scale=scale))
            # the Λ split (opt-in: window part + sink columns merged, lit_gpt.flex.split_sinks) and the default
            # one Flex call over the whole Λ (the sink key block in every query block)
            cases[f"sink {a.sinks} + window {w} flex"] = (
                "default", lambda: flex_attention_forward(q, k, v, lfn, scale=scale, split_lambda=True))
            cases[f"sink {a.sinks} + window {w} flex, one call"] = (
                "default", lambda: flex_attention_forward(q, k, v, lfn, scale=scale))
            # smaller key blocks of the block mask (flex_attention_forward(block_size=...)): the sinks' partial key
            # block costs less when it is narrower
            for bs in ((128, 64), (64, 64)):
                cases[f"sink {a.sinks} + window {w} flex, one call, blocks {bs[0]}x{bs[1]}"] = (
                    "default", lambda bs=bs: flex_attention_forward(q, k, v, lfn, scale=scale, block_size=bs))
            cases[f"window {w} flex, blocks 128x64"] = (
                "default", lambda: flex_attention_forward(q, k, v, wfn, scale=scale, block_size=(128, 64)))
        pos = torch.arange(T, device=device).unsqueeze(0)
        wmask = dense_mask(window_mask(w), pos, pos)
        cases[f"window {w} sdpa dense mask"] = ("default", lambda: sdpa_attention(q, k, v, mask=wmask))
        base = None
        for name, (backend, fn) in cases.items():
            set_sdpa_backend(backend)

            def step():
                out = fn()
                out.backward(torch.ones_like(out))
                q.grad = k.grad = v.grad = None
            try:
                sec = time_fn(step, device, warmup=3, repeat=10 if not a.quick else 2)
                if name.startswith("causal sdpa (default"):
                    base = sec
                rows.append({"T": T, "B": B, "impl": name, "ms": round(sec * 1e3, 3),
                             "x_causal": round(sec / base, 3) if base else None})
            except Exception as e:
                rows.append({"T": T, "B": B, "impl": name, "ms": f"error: {type(e).__name__}: {str(e)[:100]}"})
            print(rows[-1], flush=True)
        set_sdpa_backend("default")
        write_json(a.out, rows, meta)            # after every length: a command stopped at its limit keeps it
    print_table(rows, ["T", "B", "impl", "ms", "x_causal"])
    write_json(a.out, rows, meta)


if __name__ == "__main__":
    main()
