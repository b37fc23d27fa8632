"""Training-step throughput (forward, backward, gradient clipping, fused AdamW; bf16 autocast) of our GPT, measured in
one process next to a plain compiled reference model (benchmarks/reference_llama.py) and litgpt's model and loss of
the same shape, with MFU against the GPU's bf16 matmul rate measured in the same command.

    python benchmarks/bench_train_step.py --compare                       # GPU: tinyllama_60M, 16 x 2048: ours, reference, litgpt
    python benchmarks/bench_train_step.py --impls reference,ours --compile blocks,model --micro-batches 16,32 \
        --ref-micro-batches 16,32                                          # the alternatives, each side at its best
    python benchmarks/bench_train_step.py --model tinyllama_1_1b --micro-batch 8 --impls ours
    python benchmarks/bench_train_step.py --variants "window 256 flex" "alibi flex"   # our variants
    python benchmarks/bench_train_step.py --impls reference,ours --variants default rope-fused   # fused RoPE or not
    python benchmarks/bench_train_step.py --quick --compare               # tiny CPU smoke run

Ours: ``model(x, targets=y)`` (lit_gpt/fused_ce.py: no fp32 logits), ``--compile`` scopes (comma list of
``train.compile_scope`` values, through the loop's own ``lit_gpt.throughput.compile_model``: ``blocks`` each block
compiled, ``model`` the whole model; ``none``: eager), ``--sdpa`` kernel (``best``: the faster of cuDNN and flash
on this attention shape, measured here). The reference: ``torch.compile(model)`` with F.cross_entropy on
fp32-upcast logits. litgpt (PyPI): its GPT compiled as its pretrain.py does, with its chunked_cross_entropy.

Micro batches: ``--micro-batch`` is the issue's comparison point (``x_reference`` / ``x_litgpt`` of every row are
against those two at that micro batch); ``--micro-batches`` (ours) and ``--ref-micro-batches`` (the reference and
litgpt) add more, timed after every run at the base micro batch, so that the JSON's ``best`` compares each side at
its own fastest micro batch. Every run starts from a reset compiler (``torch._dynamo.reset()``): each compiles as in
a fresh process, static shapes. ``--budget-s`` skips the runs that would start after it. Prints a table, writes
JSON (command, commit, GPU, library versions).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from common import (kernel_breakdown, measure_bf16_peak, print_table, time_fn, write_json)
from lit_gpt import GPT, Config
from lit_gpt.attention import set_sdpa_backend
from lit_gpt.throughput import COMPILE_SCOPES, compile_model
from reference_llama import RefLlama, flops_per_token, loss_fn

VARIANTS = {
    "default": {},
    "rope-fused": dict(rope_impl="auto"),           # RoPE + qkv split by lit_gpt/kernels/rope.py (opt-in, the default: tensor ops)
    "eager softmax": dict(attn_impl="eager"),
    "window 256 sdpa": dict(attn_mask="window", window_size=256, attn_impl="sdpa"),
    "window 256 flex": dict(attn_mask="window", window_size=256, attn_impl="flex"),
    "alibi sdpa": dict(pos_encoding="alibi", attn_impl="sdpa"),
    "alibi flex": dict(pos_encoding="alibi", attn_impl="flex"),
    "relative bias sdpa": dict(pos_encoding="relative"),
    "kv bias (k* slot) flex": dict(kv_bias="kv", attn_impl="flex"),
    "sink logit flex": dict(sink_logit=True, attn_impl="flex"),
    "sigmoid Z=1 (eager)": dict(attn_op="sigmoid", attn_normalize=False),
    "elu kernel (eager)": dict(attn_op="elu_kernel"),
}


def matmul_params(cfg: Config) -> int:
    """Parameters that take part in matrix products: every linear and the LM head (the embedding is a lookup)."""
    m = GPT(cfg.replace(n_layer=1)) if cfg.n_layer > 1 else GPT(cfg)
    per_block = sum(p.numel() for p in m.blocks[0].parameters() if p.dim() == 2)
    return cfg.n_layer * per_block + m.lm_head.weight.numel()


def build(impl: str, cfg: Config, device, compile_mode: str, loss_impl: str):
    """(module, forward-loss function) of one implementation."""
    if impl == "ours":
        with device:                         # initialise on the device (a 1B model takes seconds on the CPU)
            model = GPT(cfg)
        fwd = model if compile_mode == "none" else compile_model(model, compile_mode)    # as train.compile_scope
        return model, lambda x, y: fwd(x, targets=y, loss_impl=loss_impl)
    if impl == "reference":
        with device:
            model = RefLlama.like(cfg)
        fwd = torch.compile(model) if compile_mode != "none" else model
        return model, lambda x, y: loss_fn(fwd(x), y)
    if impl == "litgpt":
        from litgpt.config import Config as LitConfig
        from litgpt.model import GPT as LitGPT
        from litgpt.utils import chunked_cross_entropy

        lc = LitConfig(name="bench", block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                       padded_vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                       n_query_groups=cfg.n_query_groups, rotary_percentage=1.0, parallel_residual=False, bias=False,
                       norm_class_name="RMSNorm", norm_eps=cfg.norm_eps, mlp_class_name="LLaMAMLP",
                       intermediate_size=cfg.intermediate_size, rope_base=int(cfg.rope_base))
        with device:
            model = LitGPT(lc)
        fwd = torch.compile(model) if compile_mode != "none" else model     # litgpt/pretrain.py: torch.compile(model)
        return model, lambda x, y: chunked_cross_entropy(fwd(x), y)
    raise ValueError(f"impl={impl!r} is invalid; allowed: ours, reference, litgpt")


def attention_backend_times(cfg: Config, B: int, T: int, device) -> dict:
    """fwd+bwd ms of one causal SDPA call of the model's attention shape under each kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, d = cfg.n_head, cfg.head_size
    q, k, v = (torch.randn(B, H, T, d, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out, ys = {}, {}
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]), torch.no_grad():
                ys[name] = F.scaled_dot_product_attention(q, k, v, is_causal=True).float()
        except Exception:
            pass

        def step():
            with sdpa_kernel([be]):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.backward(torch.ones_like(y))
        try:
            out[name] = round(1e3 * time_fn(step, device, warmup=3, repeat=10), 3)
        except Exception as e:       # not available for this shape / build
            out[name] = f"error: {type(e).__name__}: {str(e)[:80]}"
    if len(ys) == 2:
        out["cudnn_vs_flash_rel_diff"] = float((ys["cudnn"] - ys["flash"]).norm() / ys["flash"].norm())
    return out


def loss_times(cfg: Config, rows: int, device) -> dict:
    """fwd+bwd ms of the LM head + loss alone: our fused pass vs the plain expression compiled by inductor."""
    from lit_gpt.fused_ce import linear_cross_entropy

    h = torch.randn(rows, cfg.n_embd, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = (0.02 * torch.randn(cfg.vocab_size, cfg.n_embd, device=device)).requires_grad_(True)
    t = torch.randint(0, cfg.vocab_size, (rows,), device=device)
    plain = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, impl="plain"))
    out = {}
    for name, fn in (("fused (ours)", lambda: linear_cross_entropy(h, w, t, impl="fused")),
                     ("plain, compiled", lambda: plain(h, w, t)), ("plain, eager", lambda: linear_cross_entropy(
                         h, w, t, impl="plain"))):
        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = fn()
            loss.backward()
            h.grad = w.grad = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out[name] = {"ms": round(1e3 * time_fn(step, device, warmup=3, repeat=10), 3),
                     "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}
    # accuracy of the fused bf16 path against the float32 expression (no autocast)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        lf = linear_cross_entropy(h, w, t, impl="fused")
    lf.backward()
    gh, gw = h.grad.float(), w.grad.float()
    h.grad = w.grad = None
    lr = torch.nn.functional.cross_entropy(h.float() @ w.t(), t)
    lr.backward()
    out["fused_bf16_vs_fp32"] = {"loss_abs_diff": abs(float(lf) - float(lr)),
                                 "grad_h_rel": float((gh - h.grad).norm() / h.grad.norm()),
                                 "grad_w_rel": float((gw - w.grad).norm() / w.grad.norm())}
    h.grad = w.grad = None
    return out


def ratios(rows: list, extra: dict, base_mb: int) -> None:
    """``x_reference`` / ``x_litgpt`` of every timed row against those at the base micro batch (the issue's
    comparison), and ``extra['best']``: the fastest default row of each implementation at any micro batch and the
    ratios of our best to theirs (each side at its own best) and to theirs at the base micro batch."""
    timed = [r for r in rows if isinstance(r.get("tokens/s"), int) and r["variant"] == "default"]
    base = {r["impl"]: r["tokens/s"] for r in timed if r["impl"] != "ours" and r["micro_batch"] == base_mb}
    for r in rows:
        for ref in ("reference", "litgpt"):
            if ref in base and isinstance(r.get("tokens/s"), int):
                r[f"x_{ref}"] = round(r["tokens/s"] / base[ref], 3)
    best = {}
    for r in timed:
        if r["impl"] not in best or r["tokens/s"] > best[r["impl"]]["tokens/s"]:
            best[r["impl"]] = {k: r[k] for k in ("compile", "micro_batch", "tokens/s", "ms/step", "peak_GiB", "MFU_%")}
    at_base = [r for r in timed if r["impl"] == "ours" and r["micro_batch"] == base_mb]
    if at_base:
        top = max(at_base, key=lambda r: r["tokens/s"])
        best["ours at the base micro batch"] = {k: top[k] for k in ("compile", "micro_batch", "tokens/s")}
    for ref in ("reference", "litgpt"):
        if "ours" in best and ref in best:
            best[f"ours best / {ref} best"] = round(best["ours"]["tokens/s"] / best[ref]["tokens/s"], 3)
        if at_base and ref in base:
            best[f"ours at micro {base_mb} / {ref} at micro {base_mb}"] = round(
                best["ours at the base micro batch"]["tokens/s"] / base[ref], 3)
    best["complete"] = not any(str(r.get("ms/step", "")).startswith(("skipped", "error")) for r in rows)
    extra["best"] = best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tinyllama_60M")
    ap.add_argument("--micro-batch", type=int, default=16, help="the comparison point of x_reference / x_litgpt")
    ap.add_argument("--micro-batches", default=None, help="ours: comma list of micro batches (default: --micro-batch)")
    ap.add_argument("--ref-micro-batches", default=None, help="reference, litgpt: comma list (default: --micro-batch)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--compare", action="store_true", help="ours vs the reference model vs litgpt")
    ap.add_argument("--impls", default=None, help="comma list of ours, reference, litgpt")
    ap.add_argument("--compile", default="blocks", help=f"ours: comma list of none, {', '.join(COMPILE_SCOPES)}")
    ap.add_argument("--eager-too", action="store_true", help="also time ours without compilation")
    ap.add_argument("--loss", default="fused", choices=["fused", "plain"], help="ours: loss_impl")
    ap.add_argument("--sdpa", default="best", choices=["best", "auto", "cudnn", "flash", "default"])
    ap.add_argument("--variants", nargs="*", default=None, help="our variants (names in VARIANTS)")
    ap.add_argument("--breakdown", action="store_true", help="kernel time by category for ours (torch.profiler)")
    ap.add_argument("--breakdown-all", action="store_true", help="... and for the reference and litgpt")
    ap.add_argument("--micro", action="store_true", help="also time the attention kernels and the loss alone")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.quick:
        a.model, a.micro_batch, a.seq, a.repeat = "tiny", 2, 64, 2
        a.micro_batches = a.micro_batches and "2,3"
        a.ref_micro_batches = a.ref_micro_batches and "2,3"
    scopes = a.compile.split(",")
    for sc in scopes:
        if sc not in ("none",) + COMPILE_SCOPES:
            ap.error(f"--compile={sc!r} is invalid; allowed: none, {', '.join(COMPILE_SCOPES)}")
    ours_mbs = [int(m) for m in a.micro_batches.split(",")] if a.micro_batches else [a.micro_batch]
    ref_mbs = [int(m) for m in a.ref_micro_batches.split(",")] if a.ref_micro_batches else [a.micro_batch]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    cfg0 = Config.from_name(a.model, block_size=a.seq)
    impls = (a.impls.split(",") if a.impls else ["reference", "litgpt", "ours"] if a.compare else ["ours"])
    extra = {"model": a.model, "micro_batch": a.micro_batch, "seq": a.seq, "accum": a.accum, "compile_scopes": scopes,
             "micro_batches_ours": ours_mbs, "micro_batches_reference": ref_mbs,
             "precision": "bf16 autocast" if device.type == "cuda" else "fp32"}
    peak = None
    if device.type == "cuda":
        peak = measure_bf16_peak(device)
        extra["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1)
        print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s", flush=True)
    sdpa = a.sdpa
    if device.type == "cuda" and (a.sdpa == "best" or a.micro):
        extra["attention_fwd_bwd_ms"] = attention_backend_times(cfg0, a.micro_batch, a.seq, device)
        print("attention fwd+bwd ms:", extra["attention_fwd_bwd_ms"], flush=True)
        times = {k: v for k, v in extra["attention_fwd_bwd_ms"].items() if k in ("flash", "cudnn") and isinstance(v, float)}
        if a.sdpa == "best":
            sdpa = min(times, key=times.get) if times else "default"
    elif a.sdpa == "best":
        sdpa = "default"
    extra["sdpa_ours"] = sdpa
    if a.micro:
        extra["loss_fwd_bwd"] = loss_times(cfg0, a.micro_batch * a.seq, device)
        print("lm head + loss fwd+bwd:", extra["loss_fwd_bwd"], flush=True)
    fpt = flops_per_token(cfg0.n_layer, cfg0.n_embd, matmul_params(cfg0), a.seq)
    extra["flops_per_token"] = fpt

    runs = []      # (impl, variant name, overrides, compile mode, micro batch): the base micro batch first
    for impl in impls:
        if impl != "ours":
            runs.append((impl, "default", {}, "whole", a.micro_batch))
            continue
        for name in (a.variants or ["default"]):
            modes = scopes + (["none"] if a.eager_too and "none" not in scopes else [])
            runs += [(impl, name, VARIANTS[name], m, a.micro_batch) for m in modes]
    for mb in sorted(set(ours_mbs + ref_mbs) - {a.micro_batch}):      # then each further micro batch, both sides
        runs += [(impl, "default", {}, "whole", mb) for impl in impls if impl != "ours" and mb in ref_mbs]
        runs += [("ours", "default", {}, m, mb) for m in scopes if "ours" in impls and m != "none" and mb in ours_mbs]
    # our whole-model compile takes every layer's compilation (the blocks scope: one block's), so under a time budget
    # its runs go last: the budget then cuts the dearest runs, not a side's other micro batch
    runs = [r for r in runs if r[3] != "model"] + [r for r in runs if r[3] == "model"]
    rows, t_start = [], time.perf_counter()
    for impl, name, overrides, mode, mb in runs:
        if time.perf_counter() - t_start > a.budget_s:
            rows.append({"impl": impl, "variant": name, "compile": mode, "micro_batch": mb,
                         "ms/step": "skipped (time budget)"})
            continue
        torch._dynamo.reset()                   # compile as a fresh process would (no shapes seen before)
        set_sdpa_backend(sdpa if impl == "ours" else "default")
        ov = dict(overrides)
        if "window_size" in ov:
            ov["window_size"] = min(ov["window_size"], a.seq // 4)
        torch.manual_seed(0)
        row = {"impl": impl, "variant": name, "compile": mode, "micro_batch": mb, "loss": a.loss if impl == "ours" else
               ("chunked_cross_entropy" if impl == "litgpt" else "fp32 F.cross_entropy"),
               "sdpa": sdpa if impl == "ours" else "default"}
        t0 = time.perf_counter()
        try:
            cfg = Config.from_name(a.model, block_size=a.seq, **ov)
            model, fwd_loss = build(impl, cfg, device, mode, a.loss)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
            x = torch.randint(0, cfg.vocab_size, (mb, a.seq + 1), device=device)
            inp, tgt = x[:, :-1], x[:, 1:]

            def step():
                for _ in range(a.accum):
                    with autocast:
                        loss = fwd_loss(inp, tgt)
                    (loss / a.accum).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=device.type == "cuda")
                opt.step()
                opt.zero_grad(set_to_none=True)

            step()                                  # compilation
            if device.type == "cuda":
                torch.cuda.synchronize()
            row["first_step_s"] = round(time.perf_counter() - t0, 1)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sec = time_fn(step, device, warmup=2, repeat=a.repeat)
            tps = a.accum * mb * a.seq / sec
            row.update({"ms/step": round(sec * 1e3, 1), "tokens/s": int(tps),
                        "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
                        "MFU_%": round(100 * tps * fpt / peak, 1) if peak and name == "default" else None,
                        "loss": row["loss"]})
            if a.breakdown and impl == "ours" and name == "default" and mode != "none" and device.type == "cuda":
                key = f"{impl} {mode}" + ("" if mb == a.micro_batch else f" micro {mb}")
                extra.setdefault("kernel_breakdown", {})[key] = kernel_breakdown(step)
            if impl in ("reference", "litgpt") and a.breakdown_all and device.type == "cuda":
                key = impl + ("" if mb == a.micro_batch else f" micro {mb}")
                extra.setdefault("kernel_breakdown", {})[key] = kernel_breakdown(step)
        except Exception as e:          # report, don't hide (e.g. litgpt missing, a kernel failing for a shape)
            row["ms/step"] = f"error: {type(e).__name__}: {str(e)[:160]}"
            if impl == "ours" and sdpa not in ("default", "flash"):
                runs.append((impl, name, overrides, mode, mb))   # once more with torch's default kernel order
                print(f"ours with sdpa={sdpa} failed; from here on sdpa=default", flush=True)
                sdpa = extra["sdpa_ours"] = "default"
        rows.append(row)
        print(row, flush=True)
        ratios(rows, extra, a.micro_batch)
        write_json(a.out, rows, extra)           # after every run: a command stopped at its limit keeps what it measured
        model = opt = fwd_loss = step = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, ["impl", "variant", "compile", "micro_batch", "sdpa", "ms/step", "tokens/s", "MFU_%",
                       "peak_GiB", "x_reference", "x_litgpt", "first_step_s"])
    if extra.get("best"):
        print("each side at its best:", extra["best"])
    for k, v in extra.get("kernel_breakdown", {}).items():
        print(f"kernel time by category, {k}:")
        for r in v:
            if "ms_per_step" in r:
                print(f"  {r['category']:<50} {r['ms_per_step']:>8.2f} ms/step {r['share_%']:>6.1f} %")
    set_sdpa_backend("default")
    write_json(a.out, rows, extra)


if __name__ == "__main__":
    main()
