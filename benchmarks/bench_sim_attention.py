"""The fused sigmoid / elu+1 attention kernel (lit_gpt/kernels/sim_attention.py) against softmax, in one command:

1. training step of a named model (forward, backward, AdamW), tokens/s: softmax (SDPA flash, causal) vs sigmoid and
   elu+1, each Z=1 and normalised, sigmoid with a k*/v* slot, sigmoid with a window (--window) and a prefix-LM mask
   (--prefix) (all through the fused kernel), and sigmoid through the eager path, each as a ratio to the causal
   softmax model measured in the same process;
2. one attention call, forward and forward + backward, fused vs SDPA's flash kernel (causal), and a window;
3. peak memory of one attention call's forward + backward over T (fused, SDPA flash, eager): linear vs quadratic;
4. bf16 accuracy of the fused kernel and of SDPA against a float64 reference.

    python benchmarks/bench_sim_attention.py                  # GPU: tinyllama_60M, micro batch 16 x 2048, bf16
    python benchmarks/bench_sim_attention.py --warmup-only    # compile / tune everything once, write nothing
    python benchmarks/bench_sim_attention.py --quick          # tiny CPU smoke run (Triton's interpreter)
Prints tables and writes JSON (command, git commit, GPU, library versions) to --out after each part (parts_done
lists them: a run stopped by a time limit keeps what it finished). Ratios "x vs SDPA" are
SDPA's time / this time (> 1: faster than SDPA); "vs softmax" is tokens/s / softmax's tokens/s.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F

from common import print_table, time_fn, write_json
from lit_gpt import GPT, Config
from lit_gpt.attention import causal_mask, dense_mask, eager_attention, sdpa_attention, window_mask
from lit_gpt.kernels import sim_attention as sim

def train_variants(window: int, prefix: int) -> dict:
    """Training-step variants: name -> Config overrides (window and prefix masks at the given sizes)."""
    return {
        "softmax (SDPA flash)": {},
        "sigmoid Z=1 (fused)": dict(attn_op="sigmoid", attn_normalize=False),
        "sigmoid normalised (fused)": dict(attn_op="sigmoid"),
        "elu+1 Z=1 (fused)": dict(attn_op="elu", attn_normalize=False),
        "elu+1 normalised (fused)": dict(attn_op="elu"),
        "sigmoid Z=1 + k*/v* slot (fused)": dict(attn_op="sigmoid", attn_normalize=False, kv_bias="kv"),
        f"sigmoid Z=1, window {window} (fused)": dict(attn_op="sigmoid", attn_normalize=False, attn_mask="window",
                                                      window_size=window),
        f"sigmoid Z=1, prefix {prefix} (fused)": dict(attn_op="sigmoid", attn_normalize=False, attn_mask="prefix",
                                                      prefix_size=prefix),
        "sigmoid Z=1 (eager)": dict(attn_op="sigmoid", attn_normalize=False, attn_impl="eager"),
    }


def train_rows(a, device, warmup, repeat):
    rows = []
    for name, overrides in train_variants(a.window, a.prefix).items():
        if a.only not in name:
            continue
        torch.manual_seed(0)
        if device.type == "cpu" and "(fused)" in name:
            overrides = dict(overrides, attn_impl="triton")       # the interpreter runs only when asked for
        cfg = Config.from_name(a.model, block_size=a.seq, **overrides)
        model = GPT(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                fused=device.type == "cuda")
        x = torch.randint(0, cfg.vocab_size, (a.micro_batch, a.seq + 1), device=device)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())

        def step():
            with autocast:
                logits = model(x[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        calls = sim.STATS["forward"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            sec = time_fn(step, device, warmup=warmup, repeat=repeat)
            rows.append({"variant": name, "fused_kernel_ran": sim.STATS["forward"] > calls,
                         "ms/step": round(sec * 1e3, 1), "tokens/s": int(a.micro_batch * a.seq / sec),
                         "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda"
                         else ""})
        except Exception as e:   # report, don't hide
            rows.append({"variant": name, "ms/step": f"error: {type(e).__name__}: {str(e)[:200]}", "tokens/s": 0})
        print(rows[-1], flush=True)
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["tokens/s"] if rows and rows[0]["variant"].startswith("softmax") else float("nan")
    for r in rows:
        r["vs softmax"] = round(r["tokens/s"] / base, 3)
    return rows


def _qkv(B, H, T, d, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return [torch.randn(B, H, T, d, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3)]


def attention_cases(q, k, v, window):
    pos = torch.arange(q.shape[2], device=q.device).unsqueeze(0)
    cases = {
        "SDPA flash softmax (causal)": lambda: sdpa_attention(q, k, v, mask=None, is_causal=True),
        "fused sigmoid Z=1": lambda: sim.sim_attention(q, k, v, causal_mask, op="sigmoid", normalize=False),
        "fused sigmoid normalised": lambda: sim.sim_attention(q, k, v, causal_mask, op="sigmoid", normalize=True),
        "fused elu+1 Z=1": lambda: sim.sim_attention(q, k, v, causal_mask, op="elu", normalize=False),
        "fused elu+1 normalised": lambda: sim.sim_attention(q, k, v, causal_mask, op="elu", normalize=True),
        f"fused sigmoid Z=1 window {window}": lambda: sim.sim_attention(q, k, v, window_mask(window), op="sigmoid",
                                                                         normalize=False),
    }
    if q.shape[2] <= 4096:
        cases["eager sigmoid Z=1"] = lambda: eager_attention(q, k, v, mask=dense_mask(causal_mask, pos, pos),
                                                             op="sigmoid", normalize=False)[0]
    return cases


def attention_rows(a, device, warmup, repeat):
    B, H, d = a.shape
    rows = []
    for T in a.lengths:
        q, k, v = _qkv(B, H, T, d, device)
        dy = torch.randn_like(q)
        sdpa = {}
        for name, fn in attention_cases(q, k, v, a.window).items():
            def fwd():
                with torch.no_grad():
                    fn()

            def fwd_bwd():
                torch.autograd.grad(fn(), (q, k, v), dy)

            try:
                f_ms = time_fn(fwd, device, warmup=warmup, repeat=repeat) * 1e3
                fb_ms = time_fn(fwd_bwd, device, warmup=warmup, repeat=repeat) * 1e3
            except Exception as e:
                rows.append({"T": T, "impl": name, "fwd_ms": f"error: {type(e).__name__}: {str(e)[:200]}"})
                print(rows[-1], flush=True)
                continue
            if name.startswith("SDPA"):
                sdpa = {"fwd": f_ms, "fwd_bwd": fb_ms}
            frac = min(1.0, 2 * a.window / T) if "window" in name else 1.0
            flops = 2 * 2 * B * H * T * T * d / 2 * frac           # causal: QK^T and PV over half the matrix
            rows.append({"T": T, "impl": name, "fwd_ms": round(f_ms, 3), "fwd_bwd_ms": round(fb_ms, 3),
                         "fwd vs SDPA": round(sdpa["fwd"] / f_ms, 2), "fwd_bwd vs SDPA": round(sdpa["fwd_bwd"] / fb_ms, 2),
                         "fwd TFLOP/s": round(flops / f_ms / 1e9, 1), "fwd_bwd TFLOP/s": round(3.5 * flops / fb_ms / 1e9, 1)})
            print(rows[-1], flush=True)
        del q, k, v, dy
    return rows


def memory_rows(a, device):
    B, H, d = 1, 8, 96
    rows = []
    for T in a.memory_lengths:
        q, k, v = _qkv(B, H, T, d, device)
        dy = torch.randn_like(q)
        pos = torch.arange(T, device=device).unsqueeze(0)
        impls = {"fused sigmoid normalised": lambda: sim.sim_attention(q, k, v, causal_mask, op="sigmoid",
                                                                      normalize=True),
                 "SDPA flash softmax": lambda: sdpa_attention(q, k, v, mask=None, is_causal=True)}
        if T <= 8192:
            impls["eager sigmoid normalised"] = lambda: eager_attention(
                q, k, v, mask=dense_mask(causal_mask, pos, pos), op="sigmoid", normalize=True)[0]
        for name, fn in impls.items():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            try:
                torch.autograd.grad(fn(), (q, k, v), dy)
                torch.cuda.synchronize()
            except Exception as e:
                rows.append({"T": T, "impl": name, "peak_extra_MiB": f"error: {type(e).__name__}: {str(e)[:200]}"})
                continue
            extra = torch.cuda.max_memory_allocated() - base
            rows.append({"T": T, "impl": name, "peak_extra_MiB": round(extra / 2**20, 1),
                         "bytes/token": int(extra / T), "fwd_bwd_ms(1 run)": round((time.perf_counter() - t) * 1e3, 2)})
            print(rows[-1], flush=True)
        del q, k, v, dy
    return rows


def accuracy_rows(device, T, d):
    B, H = 1, 8
    q, k, v = _qkv(B, H, T, d, device)
    dy = torch.randn_like(q)
    pos = torch.arange(T, device=device).unsqueeze(0)
    mask = dense_mask(causal_mask, pos, pos)
    rows = []
    for name, op, norm in (("fused sigmoid normalised", "sigmoid", True), ("fused sigmoid Z=1", "sigmoid", False),
                           ("fused elu+1 Z=1", "elu", False), ("fused elu+1 normalised", "elu", True),
                           ("SDPA flash softmax", "softmax", True)):
        try:
            if op == "softmax":
                y = sdpa_attention(q, k, v, mask=None, is_causal=True)
            else:
                y = sim.sim_attention(q, k, v, causal_mask, op=op, normalize=norm)
            grads = torch.autograd.grad(y, (q, k, v), dy)
        except Exception as e:
            rows.append({"impl": name, "rel_err_out": f"error: {type(e).__name__}: {str(e)[:200]}"})
            continue
        l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        y64, _ = eager_attention(*l64, mask=mask, op=op, normalize=norm)
        g64 = torch.autograd.grad(y64, l64, dy.double())
        rel = lambda x, r: float((x.detach().double() - r.detach()).norm() / r.detach().norm())
        rows.append({"impl": name, "dtype": str(q.dtype).replace("torch.", ""), "rel_err_out": f"{rel(y, y64):.2e}",
                     "rel_err_dq": f"{rel(grads[0], g64[0]):.2e}", "rel_err_dk": f"{rel(grads[1], g64[1]):.2e}",
                     "rel_err_dv": f"{rel(grads[2], g64[2]):.2e}"})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tinyllama_60M")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--memory-lengths", type=int, nargs="*", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--prefix", type=int, default=512, help="prefix size of the prefix-LM training variant")
    ap.add_argument("--warmup-only", action="store_true", help="run everything once (compile, tune), write nothing")
    ap.add_argument("--out", default="benchmarks/results/sim_attention.json")
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    ap.add_argument("--parts", default="train,attention,memory,accuracy", help="which of the four to run")
    ap.add_argument("--only", default="", help="training-step variants whose name contains this")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.shape = (8, 8, 96)
    if a.quick:
        a.model, a.micro_batch, a.seq, a.lengths, a.memory_lengths, a.window, a.shape = "tiny", 1, 32, [32], [], 8, (1, 2, 16)
        a.prefix = 8
    elif device.type != "cuda":
        raise SystemExit("bench_sim_attention.py needs CUDA (or --quick: the CPU runs Triton's interpreter)")
    torch.backends.cuda.matmul.allow_tf32 = True
    warmup, repeat = (1, 1) if a.warmup_only or a.quick else (3, 10)
    t0 = time.time()
    parts = a.parts.split(",")
    train, attn, mem, acc, done = [], [], [], [], []

    def save():   # after every part: a run stopped by its time limit keeps the parts it finished
        if a.warmup_only:
            return
        import triton
        write_json(a.out, train, {"attention": attn, "memory": mem, "accuracy": acc, "parts_done": list(done),
                                  "triton": triton.__version__, "model": a.model, "micro_batch": a.micro_batch,
                                  "seq": a.seq, "window": a.window, "prefix": a.prefix,
                                  "attention_shape_BHd": a.shape, "precision": "bf16 autocast", "compiled": False})

    for part, rows, run in (("train", train, lambda: train_rows(a, device, warmup, repeat)),
                            ("attention", attn, lambda: attention_rows(a, device, warmup, repeat)),
                            ("memory", mem, lambda: memory_rows(a, device) if device.type == "cuda" else []),
                            ("accuracy", acc, lambda: accuracy_rows(device, T=32 if a.quick else 2048, d=a.shape[2]))):
        if part in parts:
            rows.extend(run())
            done.append(part)
            save()
    tables = [
        (f"{a.model}, micro batch {a.micro_batch} x {a.seq}, bf16 autocast, AdamW, not compiled", train,
         ["variant", "fused_kernel_ran", "ms/step", "tokens/s", "vs softmax", "peak_GiB"]),
        (f"one attention call, (B, H, d) = {a.shape}, bf16, causal", attn,
         ["T", "impl", "fwd_ms", "fwd_bwd_ms", "fwd vs SDPA", "fwd_bwd vs SDPA", "fwd TFLOP/s", "fwd_bwd TFLOP/s"]),
        ("peak memory of one forward + backward above its inputs, B=1, H=8, d=96, bf16", mem,
         ["T", "impl", "peak_extra_MiB", "bytes/token", "fwd_bwd_ms(1 run)"]),
        (f"against float64 eager, B=1, H=8, T={32 if a.quick else 2048}, relative Frobenius error", acc,
         ["impl", "dtype", "rel_err_out", "rel_err_dq", "rel_err_dk", "rel_err_dv"]),
    ]
    for title, rows, columns in tables:
        if rows:
            print("\n" + title)
            print_table(rows, columns)
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
