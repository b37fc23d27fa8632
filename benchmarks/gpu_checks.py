"""Correctness on the GPU (fused kernels differ from CPU): every softmax variant's fused path (SDPA / Flex)
against the eager path in float32 on CUDA, forward and gradients, plus a bf16 autocast smoke step.
The ``path`` column is the attention path every layer actually ran (``GPT.attention_paths()``); a ``flex_*``
case whose layers did not all run FlexAttention fails (a Flex error raises with attn_impl='flex', so it shows
as an error row).

    python benchmarks/gpu_checks.py        # exits 1 on any mismatch; prints a table, writes JSON
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import print_table, write_json
from lit_gpt import GPT, Config

CASES = {
    "default": {}, "window64": dict(attn_mask="window", window_size=64), "prefix8": dict(attn_mask="prefix", prefix_size=8),
    "alibi": dict(pos_encoding="alibi"), "relative": dict(pos_encoding="relative"), "kv_bias": dict(kv_bias="kv"),
    "k_bias_shared": dict(kv_bias="k", kv_bias_shared=True), "sink_logit": dict(sink_logit=True),
    "sink_token": dict(sink_token=True), "gqa": dict(n_query_groups=2), "alpha2": dict(softmax_alpha=2.0),
    "flex_window64": dict(attn_mask="window", window_size=64, attn_impl="flex"),
    "flex_alibi_window": dict(pos_encoding="alibi", attn_mask="window", window_size=64, attn_impl="flex"),
    "flex_causal": dict(attn_impl="flex"),
    "flex_relative": dict(pos_encoding="relative", attn_impl="flex"),
    "flex_kv_bias": dict(kv_bias="kv", attn_impl="flex"),
    "flex_sink_logit": dict(sink_logit=True, attn_impl="flex"),
    "flex_slots_gqa_alpha": dict(sink_logit=True, kv_bias="k", n_query_groups=2, softmax_alpha=0.5, attn_impl="flex"),
    "flex_prefix_sink_token": dict(attn_mask="window", window_size=32, sink_token=True, attn_impl="flex"),
}


def run_case(overrides, device, T=256):
    torch.manual_seed(0)
    cfg = Config.from_name("tinyllama_demo", block_size=T, **overrides)
    model = GPT(cfg).to(device)
    idx = torch.randint(0, cfg.vocab_size, (2, T + 1), device=device)

    def loss_grads(impl):
        model.config.attn_impl = impl
        model.zero_grad(set_to_none=True)
        logits = model(idx[:, :-1])
        paths = "+".join(sorted(set(model.attention_paths())))
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads, paths

    torch.backends.cuda.matmul.allow_tf32 = False
    fused_impl = cfg.attn_impl
    lf, gf, path = loss_grads(fused_impl)
    le, ge, _ = loss_grads("eager")
    rel_logit = float((lf - le).norm() / le.norm())
    rel_grad = max(float((gf[n] - ge[n]).norm() / ge[n].norm().clamp_min(1e-30)) for n in ge)
    model.config.attn_impl = fused_impl
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    loss.backward()
    bf16_path = "+".join(sorted(set(model.attention_paths())))
    return rel_logit, rel_grad, float(loss), path if bf16_path == path else f"{path} / bf16 {bf16_path}"


def case_ok(overrides, rel_logit, rel_grad, bf16_loss, path) -> bool:
    """Fused == eager within float32 tolerance, a finite bf16 loss, and for an attn_impl='flex' case every layer
    ran FlexAttention (in float32 and bf16)."""
    ran_flex = path == "flex"
    return (rel_logit < 1e-4 and rel_grad < 1e-3 and bf16_loss == bf16_loss
            and (ran_flex or overrides.get("attn_impl") != "flex"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu_checks.json")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, bad = [], 0
    for name, ov in CASES.items():
        if device.type != "cuda" and "flex" in name:
            continue
        try:
            rl, rg, bl, path = run_case(ov, device)
            ok = case_ok(ov, rl, rg, bl, path)
            rows.append({"case": name, "path": path, "rel_err_logits": f"{rl:.2e}", "rel_err_grads": f"{rg:.2e}",
                         "bf16_loss": round(bl, 4), "ok": ok})
        except Exception as e:
            ok = False
            rows.append({"case": name, "rel_err_logits": f"error {type(e).__name__}: {str(e)[:120]}", "ok": False})
        bad += not ok
    print_table(rows, ["case", "path", "rel_err_logits", "rel_err_grads", "bf16_loss", "ok"])
    write_json(a.out, rows)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
