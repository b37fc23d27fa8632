"""RoPE on the fused qkv projection, forward and backward, in Triton (``config.rope_impl``).

What it computes: the qkv linear's output (B, T, (H + 2G) d), split into q (B, H, T, d), k, v (B, G, T, d) with
q and k rotated exactly as :func:`lit_gpt.positional.apply_rope` rotates them (rotate-half on the first n dims, in
float32, float64 for float64 inputs, the rest passed through, the result cast back to the input dtype):

    y_j = x_j cos_j - x_{j+n/2} sin_j    (j < n/2)        y_j = x_j cos_j + x_{j-n/2} sin_j    (n/2 <= j < n)

Why: written as tensor ops, autograd's backward is a rotation of dq and dk, two slice-backwards and the
split-backward (a cat of dq, dk, dv) into the (B, T, (H + 2G) d) gradient of the linear; inductor fuses that into
one kernel, which took 0.5 ms per layer on an H200 at 16 x 2048 (~0.3 GB moved: a tenth of the bandwidth;
benchmarks/results/train_step_60m_h200_run4.json, ``top kernels``). Here the backward writes each head's rotated
gradient straight into its columns of that one buffer, the forward writes q, k, v in the contiguous (B, heads, T,
d) layout attention takes, each a tile of BLOCK_T positions x one head: contiguous rows on both sides. The ops are
``torch.library`` custom ops, so ``torch.compile`` treats them as opaque calls (no graph break).

On CUDA this runs compiled; without CUDA (or with TRITON_INTERPRET=1) in Triton's interpreter on CPU tensors, which
is how the tests check it against float64 reference maths (``rope_impl='triton'`` asks for it on CPU).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from lit_gpt.kernels.sim_attention import INTERPRETED, triton

if triton is not None:
    import triton.language as tl

RopeTables = Tuple[torch.Tensor, torch.Tensor]
STATS = {"forward": 0, "backward": 0}   # calls of the fused forward / backward (gpu_checks asserts they ran)


def use_fused_rope(cfg, x: torch.Tensor, full_forward: bool = True) -> bool:
    """The fused op takes this projection: ``rope_impl`` 'triton' (every call; CPU: the interpreter), or 'auto' on
    CUDA for a full forward (training, evaluation). Decoding steps under 'auto' keep the tensor ops, which
    ``torch.compile`` fuses into the step's other kernels (an opaque op would add three launches per layer to a
    latency-bound step)."""
    if triton is None or cfg.pos_encoding != "rope" or cfg.rope_impl == "torch":
        return False
    if INTERPRETED:                     # CPU tensors only, and only when asked for
        return cfg.rope_impl == "triton" and x.device.type == "cpu"
    return x.is_cuda and (full_forward or cfg.rope_impl == "triton")


if triton is not None:
    @triton.jit
    def _up(x, F64: tl.constexpr):
        """The compute dtype: float64 for float64 tensors, float32 otherwise (apply_rope's rule)."""
        if F64:
            y = x.to(tl.float64)
        else:
            y = x.to(tl.float32)
        return y

    @triton.jit
    def _rope_heads(src, dst, cos, sin, T, n_heads,
                    s_b, s_h, s_t, d_b, d_h, d_t, c_b, c_t,
                    D: tl.constexpr, N: tl.constexpr, HALF_PAD: tl.constexpr, REST_PAD: tl.constexpr,
                    BLOCK_T: tl.constexpr, ROTATE: tl.constexpr, BACKWARD: tl.constexpr, F64: tl.constexpr):
        """dst[b, h, t, :] = rope(src[b, h, t, :]) for one tile of BLOCK_T positions of one head (strides in
        elements, the last dim contiguous on both sides), the halves x1 = x[:N/2], x2 = x[N/2:N] as two tiles.
        Forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; backward (the transpose): dx1 = dy1 c1 + dy2 s2,
        dx2 = dy2 c2 - dy1 s1; dims N..D pass through. ROTATE=False: a copy of all D dims."""
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_heads).to(tl.int64)
        h = (pid_bh % n_heads).to(tl.int64)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tm = (t < T)[:, None]
        t64 = t.to(tl.int64)[:, None]
        src_row = src + b * s_b + h * s_h + t64 * s_t
        dst_row = dst + b * d_b + h * d_h + t64 * d_t
        if ROTATE:
            j = tl.arange(0, HALF_PAD)[None, :]
            m = tm & (j < N // 2)
            x1 = _up(tl.load(src_row + j, mask=m, other=0.0), F64)
            x2 = _up(tl.load(src_row + j + N // 2, mask=m, other=0.0), F64)
            c_row = t64 * c_t + b * c_b
            c1 = _up(tl.load(cos + c_row + j, mask=m, other=0.0), F64)
            c2 = _up(tl.load(cos + c_row + j + N // 2, mask=m, other=0.0), F64)
            s1 = _up(tl.load(sin + c_row + j, mask=m, other=0.0), F64)
            s2 = _up(tl.load(sin + c_row + j + N // 2, mask=m, other=0.0), F64)
            if BACKWARD:
                y1 = x1 * c1 + x2 * s2
                y2 = x2 * c2 - x1 * s1
            else:
                y1 = x1 * c1 - x2 * s1
                y2 = x2 * c2 + x1 * s2
            tl.store(dst_row + j, y1.to(dst.dtype.element_ty), mask=m)
            tl.store(dst_row + j + N // 2, y2.to(dst.dtype.element_ty), mask=m)
        if N < D:
            r = N + tl.arange(0, REST_PAD)[None, :]
            mr = tm & (r < D)
            tl.store(dst_row + r, tl.load(src_row + r, mask=mr, other=0.0), mask=mr)


BLOCK_T = 64        # positions per tile (one head each)
TILE = 4096         # at most this many elements per loaded half tile


def kernel_args(src: torch.Tensor, dst: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                backward: bool):
    """(grid, arguments, constexprs) of the kernel for src, dst (B, heads, T, d) views with a contiguous last dim and
    cos/sin (B|1, T, n) or None (a plain copy); the tests compile exactly these for a GPU target."""
    B, nh, T, d = src.shape
    rotate = cos is not None
    n = cos.shape[-1] if rotate else 0
    if not rotate:
        cos = sin = src.new_empty(1, 1, 1)
    c_b = cos.stride(0) if cos.shape[0] > 1 else 0
    half_pad, rest_pad = triton.next_power_of_2(max(n // 2, 1)), triton.next_power_of_2(max(d - n, 1))
    block_t = max(1, min(BLOCK_T, TILE // max(half_pad, rest_pad)))     # wide heads (head_output='sum'): fewer rows
    grid = (triton.cdiv(T, block_t), B * nh)
    args = (src, dst, cos, sin, T, nh, src.stride(0), src.stride(1), src.stride(2),
            dst.stride(0), dst.stride(1), dst.stride(2), c_b, cos.stride(1))
    const = dict(D=d, N=n, HALF_PAD=half_pad, REST_PAD=rest_pad, BLOCK_T=block_t, ROTATE=rotate, BACKWARD=backward,
                 F64=src.dtype == torch.float64)
    return grid, args, const


def _launch(src, dst, cos, sin, backward: bool) -> None:
    grid, args, const = kernel_args(src, dst, cos, sin, backward)
    _rope_heads[grid](*args, **const)


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> RopeTables:
    """(B|1, 1, T, n) tables as the model builds them -> (B|1, T, n) with a contiguous last dim."""
    cos, sin = cos.squeeze(1), sin.squeeze(1)
    return (cos if cos.stride(-1) == 1 else cos.contiguous()), (sin if sin.stride(-1) == 1 else sin.contiguous())


def _heads(x: torch.Tensor, B: int, T: int, sizes: Tuple[int, int, int], d: int):
    """(B, T, (H + 2G) d) -> three (B, heads, T, d) views of its q, k, v columns."""
    return [t.view(B, T, n, d).transpose(1, 2) for t, n in zip(x.split(tuple(n * d for n in sizes), dim=-1), sizes)]


def _contiguous_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


if triton is not None:
    @torch.library.custom_op("lit_gpt::rope_qkv", mutates_args=())
    def rope_qkv_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int, n_kv: int,
                    head_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        STATS["forward"] += 1
        B, T, _ = qkv.shape
        cos, sin = _tables(cos, sin)
        src = _heads(_contiguous_last(qkv), B, T, (n_head, n_kv, n_kv), head_size)
        outs = [qkv.new_empty(B, n, T, head_size) for n in (n_head, n_kv, n_kv)]
        for i, (s, o) in enumerate(zip(src, outs)):
            _launch(s, o, cos if i < 2 else None, sin if i < 2 else None, backward=False)
        return tuple(outs)

    @rope_qkv_op.register_fake
    def _(qkv, cos, sin, n_head, n_kv, head_size):
        B, T, _ = qkv.shape
        return tuple(qkv.new_empty(B, n, T, head_size) for n in (n_head, n_kv, n_kv))

    @torch.library.custom_op("lit_gpt::rope_qkv_backward", mutates_args=())
    def rope_qkv_backward_op(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor) -> torch.Tensor:
        STATS["backward"] += 1
        B, H, T, d = dq.shape
        G = dk.shape[1]
        cos, sin = _tables(cos, sin)
        dqkv = dq.new_empty(B, T, (H + 2 * G) * d)
        for i, (g, o) in enumerate(zip((dq, dk, dv), _heads(dqkv, B, T, (H, G, G), d))):
            _launch(_contiguous_last(g), o, cos if i < 2 else None, sin if i < 2 else None, backward=True)
        return dqkv

    @rope_qkv_backward_op.register_fake
    def _(dq, dk, dv, cos, sin):
        B, H, T, d = dq.shape
        return dq.new_empty(B, T, (H + 2 * dk.shape[1]) * d)

    def _setup(ctx, inputs, output):
        qkv, cos, sin, n_head, n_kv, head_size = inputs
        ctx.save_for_backward(cos, sin)
        ctx.shapes = [o.shape for o in output]
        ctx.dtype = qkv.dtype

    def _backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        dq, dk, dv = (g if g is not None else cos.new_zeros(shape, dtype=ctx.dtype)
                      for g, shape in zip((dq, dk, dv), ctx.shapes))
        return rope_qkv_backward_op(dq, dk, dv, cos, sin), None, None, None, None, None

    rope_qkv_op.register_autograd(_backward, setup_context=_setup)


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int, n_kv: int, head_size: int):
    """(B, T, (H + 2G) d) -> q (B, H, T, d), k, v (B, G, T, d), q and k rotated by the (B|1, 1, T, n) tables
    (:meth:`lit_gpt.model.GPT.rope_tables`); contiguous outputs, gradient written into one (B, T, (H + 2G) d)."""
    return rope_qkv_op(qkv, cos, sin, n_head, n_kv, head_size)
