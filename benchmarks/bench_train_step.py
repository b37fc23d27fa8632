"""Training-step throughput of the one model across variants: tokens/s and peak memory of forward+backward+AdamW.

    python benchmarks/bench_train_step.py                     # GPU: tinyllama_60M, micro batch 8 x 2048, bf16
    python benchmarks/bench_train_step.py --compile           # also with torch.compile
    python benchmarks/bench_train_step.py --quick             # tiny CPU smoke run
Prints a table and writes JSON (command, git commit, hardware) to --out.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from common import print_table, time_fn, write_json
from lit_gpt import GPT, Config

VARIANTS = {
    "default (rope, swiglu, softmax sdpa)": {},
    "eager softmax": dict(attn_impl="eager"),
    "window 256 sdpa": dict(attn_mask="window", window_size=256),
    "window 256 flex": dict(attn_mask="window", window_size=256, attn_impl="flex"),
    "alibi sdpa": dict(pos_encoding="alibi"),
    "alibi flex": dict(pos_encoding="alibi", attn_impl="flex"),
    "relative bias sdpa": dict(pos_encoding="relative"),
    "relative bias flex": dict(pos_encoding="relative", attn_impl="flex"),
    "kv bias (k* slot) sdpa": dict(kv_bias="kv"),
    "kv bias (k* slot) flex": dict(kv_bias="kv", attn_impl="flex"),
    "sink logit sdpa": dict(sink_logit=True),
    "sink logit flex": dict(sink_logit=True, attn_impl="flex"),
    "sigmoid Z=1 (eager)": dict(attn_op="sigmoid", attn_normalize=False),
    "elu kernel (eager)": dict(attn_op="elu_kernel"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tinyllama_60M")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    ap.add_argument("--only-compiled", action="store_true", help="time torch.compile(model) only")
    ap.add_argument("--variants", nargs="*", default=None, help="subset of variant names")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.quick:
        a.model, a.micro_batch, a.seq = "tiny", 2, 64
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    rows = []
    names = a.variants or list(VARIANTS)
    for name in names:
        overrides = dict(VARIANTS[name])
        if "window_size" in overrides:
            overrides["window_size"] = min(overrides["window_size"], a.seq // 4)
        for compiled in ([True] if a.only_compiled else [False, True] if a.compile else [False]):
            torch.manual_seed(0)
            cfg = Config.from_name(a.model, block_size=max(a.seq, 64), **overrides)
            model = GPT(cfg).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                    fused=device.type == "cuda")
            fwd = torch.compile(model) if compiled else model
            x = torch.randint(0, cfg.vocab_size, (a.micro_batch, a.seq + 1), device=device)

            def step():
                with autocast:
                    logits = fwd(x[:, :-1])
                    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                sec = time_fn(step, device, warmup=3 if not compiled else 5, repeat=10 if not a.quick else 2)
                mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                rows.append({"variant": name, "compile": compiled, "ms/step": round(sec * 1e3, 1),
                             "tokens/s": int(a.micro_batch * a.seq / sec), "peak_GiB": round(mem, 2)})
            except Exception as e:
                rows.append({"variant": name, "compile": compiled, "ms/step": f"error: {type(e).__name__}: {str(e)[:100]}"})
            print(rows[-1], flush=True)
            del model, opt, fwd
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, ["variant", "compile", "ms/step", "tokens/s", "peak_GiB"])
    write_json(a.out, rows, {"model": a.model, "micro_batch": a.micro_batch, "seq": a.seq,
                             "precision": "bf16 autocast" if device.type == "cuda" else "fp32"})


if __name__ == "__main__":
    main()
