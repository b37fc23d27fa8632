"""The fused RoPE + qkv split (lit_gpt/kernels/rope.py) on CPU, in Triton's interpreter: q/k/v against explicit
float64 loops (tests/reference.py's rope_rotate), its backward against finite differences (gradcheck), and the model
with rope_impl='triton' against rope_impl='torch' (tensor ops): logits and every gradient, each variant, and cached
decoding equal to the full forward."""
import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.config import ConfigError
from lit_gpt.positional import rope_cos_sin, rope_inv_freq
from reference import rope_rotate

rope = pytest.importorskip("lit_gpt.kernels.rope")
from lit_gpt.kernels import sim_attention  # noqa: E402

if not sim_attention.available() or not sim_attention.INTERPRETED:
    pytest.skip("needs triton, run in its interpreter (no CUDA, or TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)

BASE = 10000.0


def _tables(pos, n, dtype=torch.float64):
    cos, sin = rope_cos_sin(pos, rope_inv_freq(n, BASE), dtype)
    return cos.unsqueeze(1), sin.unsqueeze(1)


@pytest.mark.parametrize("B,T,H,G,d,n,per_row", [(2, 37, 3, 1, 8, 8, False), (1, 5, 2, 2, 12, 4, False),
                                                 (2, 9, 4, 2, 6, 6, True)])
def test_rope_qkv_matches_a_float64_loop(B, T, H, G, d, n, per_row):
    """q, k rotated pair by pair at their positions (per-row positions: a cache's (B, T) input_pos), v copied; the
    input a column slice of a wider buffer (row stride larger than its width)."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(B, T, (H + 2 * G) * d + 5, dtype=torch.float64, generator=g)
    qkv = wide[..., 5:]
    pos = (torch.arange(T) + 100 * torch.arange(B)[:, None]) if per_row else torch.arange(T)[None]
    q, k, v = rope.rope_qkv(qkv, *_tables(pos, n), H, G, d)
    assert q.shape == (B, H, T, d) and k.shape == v.shape == (B, G, T, d)
    assert rope.STATS["forward"] > 0
    for b in range(B):
        for t in range(T):
            p = int(pos[b if per_row else 0, t])
            row = qkv[b, t]
            for h in range(H):
                torch.testing.assert_close(q[b, h, t], rope_rotate(row[h * d:(h + 1) * d], p, n, BASE))
            for h in range(G):
                kc = row[(H + h) * d:(H + h + 1) * d]
                torch.testing.assert_close(k[b, h, t], rope_rotate(kc, p, n, BASE))
                torch.testing.assert_close(v[b, h, t], row[(H + G + h) * d:(H + G + h + 1) * d])


@pytest.mark.parametrize("n", [8, 4])
def test_rope_qkv_backward_against_finite_differences(n):
    H, G, d, T = 2, 1, 8, 6
    qkv = torch.randn(2, T, (H + 2 * G) * d, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(torch.arange(T)[None] + 3, n)
    before = rope.STATS["backward"]
    assert torch.autograd.gradcheck(lambda x: rope.rope_qkv(x, cos, sin, H, G, d), (qkv,), fast_mode=True)
    assert rope.STATS["backward"] > before


def test_rope_qkv_backward_with_unused_outputs():
    """A gradient for q alone (k and v unused) gives zeros in the k and v columns."""
    H, G, d, T = 2, 2, 4, 3
    qkv = torch.randn(1, T, (H + 2 * G) * d, dtype=torch.float64, requires_grad=True)
    q, _, _ = rope.rope_qkv(qkv, *_tables(torch.arange(T)[None], d), H, G, d)
    (grad,) = torch.autograd.grad(q.sum(), qkv)
    assert torch.all(grad[..., H * d:] == 0) and torch.any(grad[..., :H * d] != 0)


def _pair(**overrides):
    cfg = Config.from_name("tiny", vocab_size=64, padding_multiple=1, n_layer=2, **overrides)
    torch.manual_seed(0)
    ref = GPT(cfg.replace(rope_impl="torch")).double()
    fused = GPT(cfg.replace(rope_impl="triton")).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)         # non-default values for the norms, slots and sink logits too
    fused.load_state_dict(ref.state_dict())
    return ref, fused


VARIANTS = [dict(), dict(n_query_groups=2), dict(n_query_groups=1), dict(rotary_percentage=0.5),
            dict(sink_token=True), dict(kv_bias="v"), dict(kv_bias="kv", sink_logit=True), dict(kv_bias="k"),
            dict(attn_mask="window", window_size=5), dict(pos_encoding="alibi"), dict(pos_encoding="nope"),
            dict(attn_op="sigmoid", attn_normalize=False), dict(head_output="sum")]


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_model_logits_and_gradients_equal_the_tensor_ops_path(overrides):
    ref, fused = _pair(**overrides)
    idx = torch.randint(0, 64, (2, 19))
    calls = rope.STATS["forward"]
    lr, lf = ref(idx), fused(idx)
    assert (rope.STATS["forward"] > calls) == (overrides.get("pos_encoding", "rope") == "rope")
    torch.testing.assert_close(lf, lr, rtol=1e-12, atol=1e-12)
    (lr.square().mean() + lr[:, -1].sum()).backward()
    (lf.square().mean() + lf[:, -1].sum()).backward()
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("overrides", [dict(), dict(n_query_groups=2, sink_token=True), dict(rotary_percentage=0.5)],
                         ids=["default", "gqa_sink_token", "partial"])
def test_cached_decoding_equals_the_full_forward(overrides):
    _, model = _pair(**overrides)
    B, T = 2, 10
    idx = torch.randint(0, 64, (B, T))
    full = model(idx)
    model.set_kv_cache(B, max_seq_length=16)
    outs = [model(idx[:, :4], input_pos=torch.arange(4))]
    outs += [model(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(4, T)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)


def test_rope_impl_is_validated_and_torch_skips_the_op():
    with pytest.raises(ConfigError, match="rope_impl.*'fast'.*auto, triton, torch"):
        Config.from_name("tiny", rope_impl="fast")
    ref, _ = _pair()
    calls = rope.STATS["forward"]
    ref(torch.randint(0, 64, (1, 5)))
    assert rope.STATS["forward"] == calls
    assert not rope.use_fused_rope(Config.from_name("tiny"), torch.zeros(1))   # auto on CPU: tensor ops


def test_auto_takes_the_op_for_full_forwards_on_cuda_only(monkeypatch):
    """rope_impl='auto' on a compiled-Triton (CUDA) machine: the op for full forwards, tensor ops for cache calls
    (decoding steps) and for CPU tensors; 'triton' for every CUDA call; 'torch' and non-RoPE models never."""
    from types import SimpleNamespace
    monkeypatch.setattr(rope, "INTERPRETED", False)
    gpu, cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    auto, forced = Config.from_name("tiny", rope_impl="auto"), Config.from_name("tiny", rope_impl="triton")
    assert rope.use_fused_rope(auto, gpu, full_forward=True)
    assert not rope.use_fused_rope(auto, gpu, full_forward=False)
    assert not rope.use_fused_rope(auto, cpu, full_forward=True)
    assert rope.use_fused_rope(forced, gpu, full_forward=False)
    assert not rope.use_fused_rope(Config.from_name("tiny", rope_impl="torch"), gpu)
    assert not rope.use_fused_rope(Config.from_name("tiny", pos_encoding="alibi"), gpu)


COMPILE_SCRIPT = r"""
import torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from lit_gpt.kernels import rope
assert not rope.INTERPRETED
fn, names = rope._rope_heads, rope._rope_heads.arg_names
B, T, H, d = 2, 256, 8, 96                          # tinyllama_60M's heads
for dtype, n, backward in ((torch.bfloat16, 96, False), (torch.bfloat16, 96, True), (torch.float32, 48, True),
                           (torch.float64, 96, False)):
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    qkv = torch.zeros(B, T, 3 * H * d, dtype=dtype)
    src = qkv[..., :H * d].view(B, T, H, d).transpose(1, 2)
    dst = torch.empty(B, H, T, d, dtype=dtype)
    cos = torch.zeros(1, T, n, dtype=tdt)
    for c in (cos, None):                               # rotate, copy
        grid, args, const = rope.kernel_args(src, dst, c, c, backward)
        sig, attrs = {}, {}
        for i, (name, a) in enumerate(zip(names, args)):
            if isinstance(a, torch.Tensor):
                sig[name] = "*" + {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[a.dtype]
            else:
                sig[name] = "i32"
            if isinstance(a, torch.Tensor) or a % 16 == 0:   # what the launcher specialises on
                attrs[(i,)] = [["tt.divisibility", 16]]
        sig.update({k: "constexpr" for k in const})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32))
        assert "st.global.v" in k.asm["ptx"], f"stores not vectorised: {dtype} n={n} rotate={c is not None}"
print("compiled")
"""


def test_kernel_compiles_for_hopper():
    """The interpreter does not compile: build the kernels for sm_90 (the H200) in a process without it, with the
    arguments the op passes for the 60M shape (no GPU needed: Triton's NVIDIA backend and ptxas ship in its wheel)."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
