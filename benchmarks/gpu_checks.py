"""Correctness on the GPU (fused kernels differ from CPU): every variant's fused path (SDPA / Flex for softmax,
the Triton kernel of lit_gpt/kernels/sim_attention.py for sigmoid / elu) against the eager path in float32 on
CUDA, forward and gradients, plus a bf16 autocast smoke step. A sim_* case also fails if the kernel did not run.
A rope_* case compares the fused RoPE + qkv split of lit_gpt/kernels/rope.py (rope_impl='auto', opt-in) against tensor ops
(rope_impl='torch') instead, and fails if the fused op did not run forward and backward.
The ``path`` column is the attention path every layer actually ran (``GPT.attention_paths()``); a ``flex_*``
case whose layers did not all run FlexAttention fails (a Flex error raises with attn_impl='flex', so it shows
as an error row).

    python benchmarks/gpu_checks.py                 # exits 1 on any mismatch; prints a table, writes JSON
    python benchmarks/gpu_checks.py --cases sim_    # only the cases whose name contains "sim_" (a,b: either)
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import print_table, write_json
from lit_gpt import GPT, Config
from lit_gpt.attention import sink_window_mask

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
    # LM-Infinite's Λ mask (4 sinks + window 64) passed as the forward's mask_fn: window part + sink columns merged
    "flex_lambda": dict(attn_impl="flex", mask_fn=("sink_window", 4, 64)),
    "flex_lambda_alibi_slots_gqa": dict(pos_encoding="alibi", kv_bias="k", sink_logit=True, n_query_groups=2,
                                        attn_impl="flex", mask_fn=("sink_window", 4, 64)),
    # the fused sigmoid / elu kernel (attn_impl auto on CUDA)
    "sim_sigmoid_z1": dict(attn_op="sigmoid", attn_normalize=False),
    "sim_sigmoid_norm": dict(attn_op="sigmoid"),
    "sim_d96_sigmoid_norm": dict(attn_op="sigmoid", n_embd=192, n_head=2),     # head size padded to 128 in-kernel
    "sim_elu_norm_alibi_window": dict(attn_op="elu", pos_encoding="alibi", attn_mask="window", window_size=64),
    "sim_sigmoid_kv_prefix": dict(attn_op="sigmoid", kv_bias="kv", attn_mask="prefix", prefix_size=40),
    "sim_elu_z1_sink_token_gqa": dict(attn_op="elu", attn_normalize=False, sink_token=True, n_query_groups=2,
                                      kv_bias="k", kv_bias_value="one_hot"),
    # the fused RoPE + qkv split (rope_impl auto on CUDA) against rope_impl='torch' (REFERENCE: the other side's fields)
    "rope_default": dict(rope_impl="auto", REFERENCE={"rope_impl": "torch"}),
    "rope_d96_gqa": dict(n_embd=192, n_head=2, n_query_groups=1, rope_impl="auto", REFERENCE={"rope_impl": "torch"}),
    "rope_partial_sink_token_vbias": dict(rotary_percentage=0.5, sink_token=True, kv_bias="v", rope_impl="auto",
                                          REFERENCE={"rope_impl": "torch"}),
}


def run_case(overrides, device, T=256):
    torch.manual_seed(0)
    overrides = dict(overrides)
    mask = overrides.pop("mask_fn", None)
    reference = overrides.pop("REFERENCE", {"attn_impl": "eager"})       # the fields of the side compared against
    mask_fn = sink_window_mask(*mask[1:]) if mask else None
    cfg = Config.from_name("tinyllama_demo", block_size=T, **overrides)
    model = GPT(cfg).to(device)
    idx = torch.randint(0, cfg.vocab_size, (2, T + 1), device=device)

    def loss_grads(fields):
        for k, v in fields.items():
            setattr(model.config, k, v)
        model.zero_grad(set_to_none=True)
        logits = model(idx[:, :-1], mask_fn=mask_fn)
        paths = "+".join(sorted(set(model.attention_paths())))
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads, paths

    torch.backends.cuda.matmul.allow_tf32 = False
    fused = {k: getattr(cfg, k) for k in reference}
    lf, gf, path = loss_grads(fused)
    le, ge, _ = loss_grads(reference)
    rel_logit = float((lf - le).norm() / le.norm())
    rel_grad = max(float((gf[n] - ge[n]).norm() / ge[n].norm().clamp_min(1e-30)) for n in ge)
    for k, v in fused.items():
        setattr(model.config, k, v)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(idx[:, :-1], mask_fn=mask_fn)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    loss.backward()
    bf16_path = "+".join(sorted(set(model.attention_paths())))
    return rel_logit, rel_grad, float(loss), path if bf16_path == path else f"{path} / bf16 {bf16_path}"


def case_ok(name, overrides, rel_logit, rel_grad, bf16_loss, path, kernel_calls=(0, 0)) -> bool:
    """Fused == eager within float32 tolerance, a finite bf16 loss; for an attn_impl='flex' case every layer ran
    FlexAttention (in float32 and bf16); for a sim_* case the fused sigmoid / elu kernel ran twice per case
    (float32, bf16), once per layer each time, forward and backward; for a rope_* case the fused RoPE op likewise."""
    ran_flex = path == "flex"
    ran_sim = min(kernel_calls) >= 2 * 4
    return (rel_logit < 1e-4 and rel_grad < 1e-3 and bf16_loss == bf16_loss
            and (ran_flex or overrides.get("attn_impl") != "flex")
            and (ran_sim or not name.startswith(("sim_", "rope_"))))


def fused_calls(name: str = ""):
    """(forward, backward) calls so far in this process of the fused kernel a case checks: the RoPE op for rope_*
    cases, the sigmoid / elu attention kernel otherwise."""
    try:
        if name.startswith("rope_"):
            from lit_gpt.kernels.rope import STATS
        else:
            from lit_gpt.kernels.sim_attention import STATS
    except ImportError:
        return 0, 0
    return STATS["forward"], STATS["backward"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu_checks.json")
    ap.add_argument("--cases", default="", help="run only the cases whose name contains one of these (comma-separated)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, bad = [], 0
    for name, ov in CASES.items():
        if (device.type != "cuda" and ("flex" in name or name.startswith(("sim_", "rope_")))) or not any(
                c in name for c in a.cases.split(",")):
            continue
        try:
            calls = fused_calls(name)
            rl, rg, bl, path = run_case(ov, device)
            ran = [after - before for before, after in zip(calls, fused_calls(name))]
            ok = case_ok(name, ov, rl, rg, bl, path, ran)
            rows.append({"case": name, "path": path, "rel_err_logits": f"{rl:.2e}", "rel_err_grads": f"{rg:.2e}",
                         "bf16_loss": round(bl, 4), "kernel_calls": f"{ran[0]}/{ran[1]}", "ok": ok})
        except Exception as e:
            ok = False
            rows.append({"case": name, "rel_err_logits": f"error {type(e).__name__}: {str(e)[:120]}", "ok": False})
        bad += not ok
        write_json(a.out, rows)          # after every case: a command stopped at its limit keeps the finished ones
    print_table(rows, ["case", "path", "rel_err_logits", "rel_err_grads", "bf16_loss", "kernel_calls", "ok"])
    write_json(a.out, rows)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
