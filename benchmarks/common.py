"""Shared benchmark plumbing: timing on CPU/GPU, environment record, table printing and JSON output."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_gpt.results import environment  # noqa: E402  (command, commit, versions, hardware)


def measure_bf16_peak(device: torch.device, n: int = 8192, repeat: int = 20) -> float:
    """Dense bf16 matrix-product rate (FLOP/s) of this GPU, measured: an n x n x n product on random data, median
    of ``repeat`` timed products after warm-up."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sec = time_fn(lambda: a @ b, device, warmup=5, repeat=repeat)
    return 2.0 * n ** 3 / sec


def measure_copy_bandwidth(device: torch.device, gib: float = 2.0, repeat: int = 20) -> float:
    """Device memory bandwidth (bytes/s, read + write counted) of a large device-to-device copy."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    sec = time_fn(lambda: dst.copy_(src), device, warmup=3, repeat=repeat)
    return 2.0 * src.numel() * src.element_size() / sec


KERNEL_CATEGORIES = (   # first match wins: attention kernels are also CUTLASS kernels
    ("attention (SDPA / flex)", r"flash|fmha|cudnn|attention|attn|sdpa|flex"),
    ("cross-entropy pass (ours)", r"ce_grad_kernel"),
    ("RoPE + qkv split (ours)", r"_rope_heads"),             # lit_gpt/kernels/rope.py, forward and backward
    ("optimizer (fused AdamW)", r"adam"),
    ("matmul (cuBLAS / CUTLASS)", r"gemm|nvjet|cutlass|xmma|sm90|sm80|cublas|gemv|splitk"),
    ("fused elementwise (Triton by inductor)", r"^triton_"),
    ("other (unfused elementwise, reductions, copies)", r"."),
)


DECODE_CATEGORIES = (   # one decoding step: what reads the cache, what reads the weights, and what is neither
    ("attention (SDPA kernels)", r"flash|fmha|cudnn|attention|attn|sdpa|flex|efficient"),
    ("matmul / gemv (weights)", r"gemm|nvjet|cutlass|xmma|sm90|sm80|cublas|gemv|splitk"),
    ("inductor reductions (norms, softmax, argmax)", r"^triton_(red|per)_"),
    ("inductor pointwise (RoPE, cache writes, mask)", r"^triton_poi_"),
    ("index / scatter / gather (cache writes, eager)", r"index|scatter|gather"),
    ("copies and fills", r"memcpy|memset|copy|fill"),
    ("eager reductions", r"reduce"),
    ("eager elementwise", r"elementwise|vectorized|unrolled"),
    ("other", r"."),
)


def kernel_breakdown(step: Callable[[], None], steps: int = 2, categories=KERNEL_CATEGORIES,
                     top: int = 8) -> List[Dict]:
    """GPU kernel time per step of ``step()`` by category (torch.profiler over ``steps`` calls after one more;
    first matching pattern of ``categories`` wins), the ``top`` kernels (time and calls per step) and the count."""
    import re

    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    cat: Dict[str, float] = {}
    by_name: Dict[str, float] = {}
    calls: Dict[str, int] = {}
    launches = 0
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if not us or "CUDA" not in str(getattr(e, "device_type", "CUDA")):
            continue
        launches += e.count
        for label, pattern in categories:
            if re.search(pattern, e.key, flags=re.IGNORECASE):
                cat[label] = cat.get(label, 0.0) + us
                break
        by_name[e.key] = by_name.get(e.key, 0.0) + us
        calls[e.key] = calls.get(e.key, 0) + e.count
    total = sum(cat.values()) or 1.0
    rows = [{"category": k, "ms_per_step": round(v / 1e3 / steps, 2), "share_%": round(100 * v / total, 1)}
            for k, v in sorted(cat.items(), key=lambda kv: -kv[1])]
    rows.append({"category": "top kernels", "kernels": [
        {"name": k[:90], "ms_per_step": round(v / 1e3 / steps, 3), "calls_per_step": round(calls[k] / steps, 1)}
        for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]]})
    rows.append({"category": "kernels per step", "count": round(launches / steps, 1)})
    return rows


def time_fn(fn: Callable[[], None], device: torch.device, warmup: int = 3, repeat: int = 10) -> float:
    """Median seconds per call (CUDA events on GPU, perf_counter + sync elsewhere)."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
    else:
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def print_table(rows: List[Dict], columns: List[str]) -> None:
    widths = [max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def write_json(path: str, rows: List[Dict], extra: Dict = None) -> None:
    out = {"environment": environment(), "results": rows, **(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, path)                 # atomic: a command killed mid-write leaves the previous file
    print(f"wrote {path}")
