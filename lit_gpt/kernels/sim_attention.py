"""Fused flash-style attention for the non-softmax operations (sigmoid, elu + 1), forward and backward, in Triton.

What it computes (the same function as :func:`lit_gpt.attention.eager_attention` with ``op`` 'sigmoid' or 'elu'):

    s_ij = scale q_i.k_j + b_ij,   p_ij = f(s_ij) on allowed (i, j), 0 elsewhere,   f = sigmoid or elu + 1
    slot columns m (the paper's k*/v*): p_im = f(scale q_i.k*_m) with value v*_m, seen by every query, no bias
    y_i = (sum_j p_ij v_j + sum_m p_im v*_m) / z_i,   z_i = max(Z_i, 1e-8),  Z_i = sum_j p_ij + sum_m p_im
    (z_i = 1 when not normalised)

Unlike softmax there is no max to track: f <= 1 (sigmoid) or f > 0 growing linearly (elu + 1), so Z_i is a plain
running sum (accumulated on the tensor cores as p @ 1 from the same rounded p that multiplies v) and the forward
stores it per row (B, H, T) in float32, as flash attention stores the log-sum-exp.
Backward (two kernels, no atomics): with rz_i = 1 / z_i and D_i = [Z_i > 1e-8] rz_i (dy_i . y_i),

    dp_ij = rz_i (dy_i . v_j) - D_i,   ds_ij = dp_ij f'(s_ij),   dv_j = sum_i rz_i p_ij dy_i,
    dq_i = scale sum_j ds_ij k_j,      dk_j = scale sum_i ds_ij q_i

(f' = p (1 - p) for sigmoid, 1 or p for elu + 1; rz = 1, D = 0 when not normalised). The slot columns' share
of the backward is a (B, H, T, S) computation done in PyTorch.

Masks: any mask built by :mod:`lit_gpt.attention` that carries a ``band`` attribute: allowed(i, j) =
(j <= i and (i - j < window or j < n_sink)) or (i < prefix and j < prefix) over positions 0..T-1 (causal,
sliding window, prefix LM, StreamingLLM / LM-Infinite sink + window). Only the key blocks a query block can see
are visited (a window of w costs about T w), and the elementwise mask is applied only on blocks that cross its
edge. Additive score bias: ALiBi (-slope_h |i - j|) in-kernel. Grouped-query attention: k/v have G heads.

Refused (``supports`` returns False; the model then runs the eager path): softmax and the kernel operations
(elu_kernel, identity, mlp_kernel), T5 relative bias, masks without a ``band``, KV caches (positions other
than 0..T-1), attention maps, head sizes above 128.

Runs compiled on CUDA; on a machine without CUDA (or with TRITON_INTERPRET=1) the same kernels run in Triton's
interpreter on CPU tensors, which is how the tests check them against float64 reference maths. The ops are
``torch.library`` custom ops, so ``torch.compile`` treats them as opaque calls (no graph break).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Callable, Optional, Tuple

import torch

from lit_gpt.config import RELATIVE_POSITIONS
from lit_gpt.utils import invalid_choice

if "triton" not in sys.modules and not torch.cuda.is_available():
    # Triton builds its language library for the interpreter or the compiler when it is first imported: without a
    # GPU only the interpreter can run, so ask for it before that import
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
    import triton.language as tl
except ImportError:   # no Triton (e.g. macOS): the model keeps the eager path
    triton = None

OPS = ("sigmoid", "elu")
EPS = 1e-8                  # eager_attention's total.clamp_min(1e-8)
MAX_HEAD_SIZE = 128             # padded to a power of two; the tile configs are sized for <= 128
STATS = {"forward": 0, "backward": 0}   # calls of the fused forward / backward (gpu_checks asserts they ran)

# the interpreter runs on CPU tensors; compiled kernels on CUDA tensors
INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)
if INTERPRETED:
    # Triton's interpreter holds scalars as 1-element arrays and turns them into loop bounds with int(array), which
    # NumPy >= 2.3 refuses; take the element instead
    from triton.runtime import interpreter as _interp

    def _patch_lang_tensor(tensor, scope, _orig=_interp._patch_lang_tensor):
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    _interp._patch_lang_tensor = _patch_lang_tensor
# block sizes (rows, cols) the interpreter uses; tests change them to exercise the block-range logic
INTERPRET_BLOCKS = {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)}


def available() -> bool:
    return triton is not None


def mask_band(mask_fn: Callable) -> Optional[Tuple[Optional[int], int, int]]:
    """(window or None, n_sink, prefix) of a mask from lit_gpt.attention, or None when the kernel cannot express it."""
    return getattr(mask_fn, "band", None)


def supports(cfg, q: torch.Tensor, mask_fn: Callable) -> bool:
    """The fused kernel computes this layer's attention: a sigmoid / elu full-sequence forward whose mask and bias it
    can express, on CUDA (attn_impl 'auto' or 'triton'), or on CPU in the interpreter when asked for explicitly."""
    if triton is None or cfg.attn_op not in OPS or cfg.attn_impl not in ("auto", "triton"):
        return False
    if cfg.pos_encoding in RELATIVE_POSITIONS or mask_band(mask_fn) is None or q.shape[-1] > MAX_HEAD_SIZE:
        return False
    if INTERPRETED:
        return q.device.type == "cpu" and cfg.attn_impl == "triton"
    return q.is_cuda


if triton is not None:
    @triton.jit
    def _allowed(i, j, T, W, NS, P):
        """The banded mask on broadcastable query rows i and key columns j (both < T)."""
        band = (j <= i) & ((i - j < W) | (j < NS))
        return (band | ((i < P) & (j < P))) & (i < T) & (j < T)

    @triton.jit
    def _unit(OP: tl.constexpr):
        """Scores enter _sim in units that save a multiply per score: s / 2 for sigmoid (tanh of half the score),
        s log2(e) for elu + 1 (exp2); _scores folds the unit into the scale and the ALiBi slope."""
        if OP == 0:
            return 0.5
        return 1.4426950408889634

    @triton.jit
    def _exp2(x, FAST: tl.constexpr):
        if FAST:       # one MUFU op; flushes results below 2^-126 to 0 (tl.exp adds a denormal fix-up around it)
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return tl.exp2(x)

    @triton.jit
    def _neg_part(u):
        """min(u, 0), NaN kept (a plain min would turn a NaN score into a finite sim and hide a diverged run)."""
        return tl.minimum(u, 0.0, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _sim_grad_parts(u, OP: tl.constexpr, FAST: tl.constexpr):
        """(f(s), f'(s)) from u = s * _unit(OP), branch-free. elu + 1: e = exp(min(s, 0)) is both f' and, plus
        max(s, 0), f itself (s > 0: s + 1; else e^s)."""
        if OP == 0:    # sigmoid(s) = (1 + tanh(s / 2)) / 2
            if FAST:
                t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32,
                                              is_pure=True, pack=1)
                p = 0.5 * t + 0.5
            else:
                p = 1.0 / (1.0 + tl.exp(-2.0 * u))
            return p, p * (1.0 - p)
        e = _exp2(_neg_part(u), FAST)
        return tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL) * 0.6931471805599453 + e, e

    @triton.jit
    def _sim(u, OP: tl.constexpr, FAST: tl.constexpr):
        return _sim_grad_parts(u, OP, FAST)[0]

    @triton.jit
    def _sim_grad(u, OP: tl.constexpr, FAST: tl.constexpr):
        """f'(s) alone (the dq kernel): for elu + 1 one exp2, f is not needed."""
        if OP == 0:
            return _sim_grad_parts(u, OP, FAST)[1]
        return _exp2(_neg_part(u), FAST)

    @triton.jit
    def _scores(a, b_t, rows, cols, qk_scale, slope, ALIBI: tl.constexpr, PREC: tl.constexpr):
        """qk_scale * a @ b_t (+ ALiBi -slope |rows - cols|) in float32 (the kernels pass scale and slope times
        _unit(OP))."""
        s = tl.dot(a, b_t, input_precision=PREC) * qk_scale
        if ALIBI:
            s -= slope * tl.abs(rows - cols).to(tl.float32)
        return s

    @triton.jit
    def _key_ranges(m0, T, W, NS, P, BM: tl.constexpr, BN: tl.constexpr):
        """Key blocks seen by query rows [m0, m0 + BM): an extra region [0, A) (sinks, prefix) and a band
        [lo, hi) whose part [f_lo, f_hi) is fully allowed (no elementwise mask)."""
        m1 = m0 + BM
        s_eff = NS
        if m0 < P:
            s_eff = tl.maximum(s_eff, P)
        A = (tl.minimum(s_eff, T) + BN - 1) // BN * BN
        hi = tl.maximum((tl.minimum(m1, T) + BN - 1) // BN * BN, A)
        lo = tl.maximum(A, tl.maximum(m0 - W + 1, 0) // BN * BN)      # A <= lo <= f_lo <= f_hi <= hi
        f_lo = tl.minimum(tl.maximum(lo, (tl.maximum(m1 - W, 0) + BN - 1) // BN * BN), hi)
        f_hi = tl.minimum(tl.maximum(tl.minimum((m0 + 1) // BN * BN, T // BN * BN), f_lo), hi)
        return A, lo, f_lo, f_hi, hi

    @triton.jit
    def _query_ranges(n0, T, W, NS, P, BM: tl.constexpr, BN: tl.constexpr):
        """Query blocks that see key columns [n0, n0 + BN): [lo, hi), fully allowed on [f_lo, f_hi)."""
        n1 = n0 + BN
        lo = n0 // BM * BM
        end = tl.minimum(T, n1 - 1 + W)
        if n0 < NS:
            end = T
        if n0 < P:
            lo = 0
            end = tl.maximum(end, tl.minimum(P, T))
        hi = (end + BM - 1) // BM * BM
        f_lo = tl.minimum(tl.maximum(lo, (n1 - 1 + BM - 1) // BM * BM), hi)
        f_hi = tl.minimum(tl.maximum(tl.minimum(n0 + W, T) // BM * BM, f_lo), hi)
        if n1 > T:
            f_hi = f_lo
        return lo, f_lo, f_hi, hi

    @triton.jit
    def _edge_block(t, A, lo, f_lo, f_hi, B: tl.constexpr):
        """Start of the t-th block that needs the elementwise mask: [0, A), then [lo, f_lo), then [f_hi, hi).
        One loop over all of them keeps one pipelined loop for the edges and one for the fully allowed blocks."""
        c1 = A // B
        c2 = (f_lo - lo) // B
        return tl.where(t < c1, t * B, tl.where(t < c1 + c2, lo + (t - c1) * B, f_hi + (t - c1 - c2) * B))

    @triton.jit
    def _tile(ptr, rows, stride, offs_d, T, D: tl.constexpr, ROWS_MASKED: tl.constexpr):
        """A (rows, DP) tile of a (T, D) matrix with row stride ``stride``; zeros past D (and past T if masked)."""
        ld = (offs_d < D)[None, :]
        if ROWS_MASKED:
            ld = ld & (rows < T)[:, None]
        return tl.load(ptr + rows[:, None] * stride + offs_d[None, :], mask=ld, other=0.0)

    @triton.jit
    def _program(H, GROUP, R: tl.constexpr, DP: tl.constexpr, REVERSED: tl.constexpr):
        """This program's (batch * head, batch, head, kv head), the first of its R rows, the rows and the DP columns;
        REVERSED: the last block first (the last query rows see the most keys)."""
        pid = tl.program_id(0)
        if REVERSED:
            pid = tl.num_programs(0) - 1 - pid
        bh = tl.program_id(1)
        return bh, bh // H, bh % H, (bh % H) // GROUP, pid * R, pid * R + tl.arange(0, R), tl.arange(0, DP)

    @triton.jit
    def _key_block(q, k_ptr, v_ptr, skt, svt, n0, offs_m, offs_d, T, qk_scale, slope, MASKED: tl.constexpr,
                   ALIBI: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
        """Key block [n0, n0 + BN) for query rows offs_m: its columns, k, v and the scores (BM, BN)."""
        offs_n = n0 + tl.arange(0, BN)
        k = _tile(k_ptr, offs_n, skt, offs_d, T, D, MASKED)
        v = _tile(v_ptr, offs_n, svt, offs_d, T, D, MASKED)
        return offs_n, k, v, _scores(q, tl.trans(k), offs_m[:, None], offs_n[None, :], qk_scale, slope, ALIBI,
                                     PREC)

    # ------------------------------------------------------------------------ forward
    @triton.jit
    def _fwd_block(acc, z, q, k_ptr, v_ptr, skt, svt, n0, offs_m, offs_d, T, W, NS, P, qk_scale, slope,
                   OP: tl.constexpr, NORMALIZE: tl.constexpr, MASKED: tl.constexpr, ALIBI: tl.constexpr,
                   D: tl.constexpr, BN: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr):
        offs_n, k, v, s = _key_block(q, k_ptr, v_ptr, skt, svt, n0, offs_m, offs_d, T, qk_scale, slope, MASKED,
                                     ALIBI, D, BN, PREC)
        p = _sim(s, OP, FAST)
        if MASKED:
            p = tl.where(_allowed(offs_m[:, None], offs_n[None, :], T, W, NS, P), p, 0.0)
        pb = p.to(v.dtype)
        acc = tl.dot(pb, v, acc, input_precision=PREC)
        if NORMALIZE:
            # the row sums on the tensor cores, as p @ ones (BM, 16 equal columns): no per-score adds or shuffles,
            # and the denominator sums the same rounded p the numerator does
            z = tl.dot(pb, tl.full((BN, 16), 1.0, v.dtype), z, input_precision=PREC)
        return acc, z

    @triton.jit
    def _fwd_kernel(Q, K, V, SK, SV, SLOPES, O, Z,
                    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                    sskb, sskh, ssks, ssvb, ssvh, ssvs,
                    H, GROUP, T, W, NS, P, scale,
                    OP: tl.constexpr, NORMALIZE: tl.constexpr, N_SLOTS: tl.constexpr, ALIBI: tl.constexpr,
                    D: tl.constexpr, DP: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr):
        bh, b, h, hk, m0, offs_m, offs_d = _program(H, GROUP, BM, DP, True)
        dmask = offs_d < D
        row_ok = offs_m < T
        q = _tile(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, T, D, True)
        acc = tl.zeros([BM, DP], dtype=tl.float32)
        z = tl.zeros([BM, 16], dtype=tl.float32)
        qk_scale = scale * _unit(OP)
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + h) * _unit(OP)
        for m in tl.static_range(N_SLOTS):      # k*/v* slot columns: seen by every query, no bias
            ks = tl.load(SK + b * sskb + h * sskh + m * ssks + offs_d, mask=dmask, other=0.0).to(tl.float32)
            vs = tl.load(SV + b * ssvb + h * ssvh + m * ssvs + offs_d, mask=dmask, other=0.0).to(tl.float32)
            ps = _sim(tl.sum(q.to(tl.float32) * ks[None, :], 1) * qk_scale, OP, False)
            acc += ps[:, None] * vs[None, :]
            z += ps[:, None]
        k_ptr = K + b * skb + hk * skh
        v_ptr = V + b * svb + hk * svh
        A, lo, f_lo, f_hi, hi = _key_ranges(m0, T, W, NS, P, BM, BN)
        for n0 in range(f_lo, f_hi, BN):
            acc, z = _fwd_block(acc, z, q, k_ptr, v_ptr, skt, svt, n0, offs_m, offs_d, T, W, NS, P, qk_scale,
                                slope, OP, NORMALIZE, False, ALIBI, D, BN, FAST, PREC)
        for t in range(0, (A + f_lo - lo + hi - f_hi) // BN):
            n0 = _edge_block(t, A, lo, f_lo, f_hi, BN)
            acc, z = _fwd_block(acc, z, q, k_ptr, v_ptr, skt, svt, n0, offs_m, offs_d, T, W, NS, P, qk_scale,
                                slope, OP, NORMALIZE, True, ALIBI, D, BN, FAST, PREC)
        if NORMALIZE:
            zz = tl.sum(z, 1) * 0.0625        # 16 equal columns: exact
            acc = acc / tl.maximum(zz, 1e-8)[:, None]
            tl.store(Z + bh * T + offs_m, zz, mask=row_ok)
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & dmask[None, :])

    # ------------------------------------------------------------------------ backward: dk, dv
    @triton.jit
    def _dkdv_block(dk, dv, k, v, q_ptr, dy_ptr, RZ, DL, sqt, sdt, m0, offs_n, offs_d, T, W, NS, P, qk_scale, slope,
                    OP: tl.constexpr, NORMALIZE: tl.constexpr, MASKED: tl.constexpr, ALIBI: tl.constexpr,
                    D: tl.constexpr, BM: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr):
        offs_m = m0 + tl.arange(0, BM)
        q = _tile(q_ptr, offs_m, sqt, offs_d, T, D, MASKED)
        dy = _tile(dy_ptr, offs_m, sdt, offs_d, T, D, MASKED)
        s_t = _scores(k, tl.trans(q), offs_m[None, :], offs_n[:, None], qk_scale, slope, ALIBI, PREC)  # (BN, BM)
        p_t, g_t = _sim_grad_parts(s_t, OP, FAST)
        if MASKED:
            ok = _allowed(offs_m[None, :], offs_n[:, None], T, W, NS, P)
            p_t = tl.where(ok, p_t, 0.0)
            g_t = tl.where(ok, g_t, 0.0)
        dp_t = tl.dot(v, tl.trans(dy), input_precision=PREC)
        if NORMALIZE:
            rz = tl.load(RZ + offs_m, mask=offs_m < T, other=0.0)
            dl = tl.load(DL + offs_m, mask=offs_m < T, other=0.0)
            p_t = p_t * rz[None, :]
            dp_t = dp_t * rz[None, :] - dl[None, :]
        dv = tl.dot(p_t.to(dy.dtype), dy, dv, input_precision=PREC)
        dk = tl.dot((dp_t * g_t).to(q.dtype), q, dk, input_precision=PREC)
        return dk, dv

    @triton.jit
    def _dkdv_kernel(Q, K, V, DY, RZ, DL, SLOPES, DK, DV,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                     H, GROUP, T, W, NS, P, scale,
                     OP: tl.constexpr, NORMALIZE: tl.constexpr, ALIBI: tl.constexpr,
                     D: tl.constexpr, DP: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr):
        """One key block of one query head: dk, dv (B, H, T, D); the caller sums query heads of a group."""
        bh, b, h, hk, n0, offs_n, offs_d = _program(H, GROUP, BN, DP, False)   # key blocks: the first sees most
        ld = (offs_n < T)[:, None] & (offs_d < D)[None, :]
        k = _tile(K + b * skb + hk * skh, offs_n, skt, offs_d, T, D, True)
        v = _tile(V + b * svb + hk * svh, offs_n, svt, offs_d, T, D, True)
        dk = tl.zeros([BN, DP], dtype=tl.float32)
        dv = tl.zeros([BN, DP], dtype=tl.float32)
        qk_scale = scale * _unit(OP)
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + h) * _unit(OP)
        q_ptr = Q + b * sqb + h * sqh
        dy_ptr = DY + b * sdb + h * sdh
        rz_ptr = RZ + bh * T
        dl_ptr = DL + bh * T
        lo, f_lo, f_hi, hi = _query_ranges(n0, T, W, NS, P, BM, BN)
        for m0 in range(f_lo, f_hi, BM):
            dk, dv = _dkdv_block(dk, dv, k, v, q_ptr, dy_ptr, rz_ptr, dl_ptr, sqt, sdt, m0, offs_n, offs_d, T, W,
                                 NS, P, qk_scale, slope, OP, NORMALIZE, False, ALIBI, D, BM, FAST, PREC)
        for t in range(0, (f_lo - lo + hi - f_hi) // BM):
            m0 = _edge_block(t, 0, lo, f_lo, f_hi, BM)
            dk, dv = _dkdv_block(dk, dv, k, v, q_ptr, dy_ptr, rz_ptr, dl_ptr, sqt, sdt, m0, offs_n, offs_d, T, W,
                                 NS, P, qk_scale, slope, OP, NORMALIZE, True, ALIBI, D, BM, FAST, PREC)
        out = bh * T * D + offs_n[:, None] * D + offs_d[None, :]          # dk, dv: (B, H, T, D) contiguous
        tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=ld)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=ld)

    # ------------------------------------------------------------------------ backward: dq
    @triton.jit
    def _dq_block(dq, q, dy, rz, dl, k_ptr, v_ptr, skt, svt, n0, offs_m, offs_d, T, W, NS, P, qk_scale, slope,
                  OP: tl.constexpr, NORMALIZE: tl.constexpr, MASKED: tl.constexpr, ALIBI: tl.constexpr,
                  D: tl.constexpr, BN: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr):
        offs_n, k, v, s = _key_block(q, k_ptr, v_ptr, skt, svt, n0, offs_m, offs_d, T, qk_scale, slope, MASKED,
                                     ALIBI, D, BN, PREC)
        g = _sim_grad(s, OP, FAST)
        if MASKED:
            g = tl.where(_allowed(offs_m[:, None], offs_n[None, :], T, W, NS, P), g, 0.0)
        dp = tl.dot(dy, tl.trans(v), input_precision=PREC)
        if NORMALIZE:
            dp = dp * rz[:, None] - dl[:, None]
        return tl.dot((dp * g).to(k.dtype), k, dq, input_precision=PREC)

    @triton.jit
    def _dq_kernel(Q, K, V, DY, RZ, DL, SLOPES, DQ,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                   H, GROUP, T, W, NS, P, scale,
                   OP: tl.constexpr, NORMALIZE: tl.constexpr, ALIBI: tl.constexpr,
                   D: tl.constexpr, DP: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr):
        bh, b, h, hk, m0, offs_m, offs_d = _program(H, GROUP, BM, DP, True)
        row_ok = offs_m < T
        ld = row_ok[:, None] & (offs_d < D)[None, :]
        q = _tile(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, T, D, True)
        dy = _tile(DY + b * sdb + h * sdh, offs_m, sdt, offs_d, T, D, True)
        rz = tl.zeros([BM], dtype=tl.float32)
        dl = tl.zeros([BM], dtype=tl.float32)
        if NORMALIZE:
            rz = tl.load(RZ + bh * T + offs_m, mask=row_ok, other=0.0)
            dl = tl.load(DL + bh * T + offs_m, mask=row_ok, other=0.0)
        qk_scale = scale * _unit(OP)
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + h) * _unit(OP)
        dq = tl.zeros([BM, DP], dtype=tl.float32)
        k_ptr = K + b * skb + hk * skh
        v_ptr = V + b * svb + hk * svh
        A, lo, f_lo, f_hi, hi = _key_ranges(m0, T, W, NS, P, BM, BN)
        for n0 in range(f_lo, f_hi, BN):
            dq = _dq_block(dq, q, dy, rz, dl, k_ptr, v_ptr, skt, svt, n0, offs_m, offs_d, T, W, NS, P, qk_scale,
                           slope, OP, NORMALIZE, False, ALIBI, D, BN, FAST, PREC)
        for t in range(0, (A + f_lo - lo + hi - f_hi) // BN):
            n0 = _edge_block(t, A, lo, f_lo, f_hi, BN)
            dq = _dq_block(dq, q, dy, rz, dl, k_ptr, v_ptr, skt, svt, n0, offs_m, offs_d, T, W, NS, P, qk_scale,
                           slope, OP, NORMALIZE, True, ALIBI, D, BN, FAST, PREC)
        tl.store(DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=ld)

    # (BM, BN, warps, stages). bf16 / fp16: at head size 96 (padded to 128) these compile for sm_90 without register
    # spills in fwd and dkdv with triton 3.6 (dq of the normalised ops: 48 B; benchmarks/sass_sim_attention.py), where
    # 4-warp tiles of 64 rows spill. Fixed, not autotuned: every variant compiles once (a few seconds), nothing is
    # timed at run time.
    # float32 (tf32x3 dots: float32-accurate on tensor cores; the correctness checks): small tiles.
    _CONFIGS = {"bf16": {"fwd": (128, 64, 8, 3), "dkdv": (32, 128, 8, 2), "dq": (128, 64, 8, 2)},
                "fp32": {"fwd": (32, 32, 4, 1), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)}}
    _KERNELS = {"fwd": _fwd_kernel, "dkdv": _dkdv_kernel, "dq": _dq_kernel}


def _launch(name: str, n_rows: int, BH: int, *args, **meta):
    """One kernel over ``n_rows`` query (fwd, dq) or key (dkdv) rows of BH heads."""
    if INTERPRETED:
        (bm, bn), extra = INTERPRET_BLOCKS[name], {}
    else:
        bm, bn, w, st = _CONFIGS["fp32" if meta["PREC"] == "tf32x3" else "bf16"][name]
        extra = dict(num_warps=w, num_stages=st)
    grid = (triton.cdiv(n_rows, bn if name == "dkdv" else bm), BH)
    _KERNELS[name][grid](*args, **meta, BM=bm, BN=bn, **extra)


def _meta(q: torch.Tensor, op: str, normalize: bool, alibi: bool) -> dict:
    D = q.shape[-1]
    fp32 = q.dtype == torch.float32
    return dict(OP=OPS.index(op), NORMALIZE=normalize, ALIBI=alibi, D=D, DP=max(16, triton.next_power_of_2(D)),
                FAST=not (fp32 or INTERPRETED), PREC="tf32x3" if fp32 else "tf32")


def _band_args(T: int, window: int, n_sink: int, prefix: int) -> Tuple[int, int, int]:
    return (window if window > 0 else T + 1), n_sink, prefix


def _f(s, op):
    return torch.sigmoid(s) if op == "sigmoid" else torch.where(s > 0, s + 1.0, torch.exp(s.clamp_max(0.0)))


def _f_grad(s, p, op):
    return p * (1.0 - p) if op == "sigmoid" else torch.where(s > 0, torch.ones_like(p), p)


def _batch_sum(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, S, d) gradient reduced (in float32) to a slot tensor's (1|B, H, S, d) shape and dtype."""
    return (g.float().sum(0, keepdim=True) if like.shape[0] == 1 else g).to(like.dtype)


# ---------------------------------------------------------------------------- custom ops (opaque to torch.compile)
@torch.library.custom_op("lit_gpt::sim_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_k: Optional[torch.Tensor],
            slot_v: Optional[torch.Tensor], slopes: Optional[torch.Tensor], op: str, normalize: bool, scale: float,
            window: int, n_sink: int, prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    G = k.shape[1]
    STATS["forward"] += 1
    out = q.new_empty(B, T, H, D).transpose(1, 2)      # (B, H, T, D) laid out (B, T, H, D): merge_heads is a view
    Z = torch.empty(B, H, T, device=q.device, dtype=torch.float32) if normalize else q.new_empty(0, dtype=torch.float32)
    n_slots = 0 if slot_k is None else slot_k.shape[-2]
    sk = q if slot_k is None else slot_k.contiguous() if slot_k.stride(-1) != 1 else slot_k
    sv = q if slot_v is None else slot_v.contiguous() if slot_v.stride(-1) != 1 else slot_v
    sks = (0, 0, 0) if slot_k is None else ((sk.stride(0) if sk.shape[0] > 1 else 0), sk.stride(1), sk.stride(2))
    svs = (0, 0, 0) if slot_v is None else ((sv.stride(0) if sv.shape[0] > 1 else 0), sv.stride(1), sv.stride(2))
    W, NS, P = _band_args(T, window, n_sink, prefix)
    _launch("fwd", T, B * H,
            q, k, v, sk, sv, q if slopes is None else slopes, out, Z,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), *sks, *svs,
            H, H // G, T, W, NS, P, scale, N_SLOTS=n_slots, **_meta(q, op, normalize, slopes is not None))
    return out, Z


@_fwd_op.register_fake
def _(q, k, v, slot_k, slot_v, slopes, op, normalize, scale, window, n_sink, prefix):
    B, H, T, D = q.shape
    Z = q.new_empty(B, H, T, dtype=torch.float32) if normalize else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(B, T, H, D).transpose(1, 2), Z


@torch.library.custom_op("lit_gpt::sim_attention_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            Z: torch.Tensor, slot_k: Optional[torch.Tensor], slot_v: Optional[torch.Tensor],
            slopes: Optional[torch.Tensor], op: str, normalize: bool, scale: float, window: int, n_sink: int,
            prefix: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    G = k.shape[1]
    STATS["backward"] += 1
    meta = _meta(q, op, normalize, slopes is not None)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    if normalize:
        rz = 1.0 / Z.clamp_min(EPS)
        dl = (dy.float() * out.float()).sum(-1) * rz * (Z > EPS)
    else:
        rz = dl = Z
    W, NS, P = _band_args(T, window, n_sink, prefix)
    dq = q.new_empty(B, H, T, D)
    dk = k.new_empty(B, H, T, D)     # per query head; summed over each group below
    dv = v.new_empty(B, H, T, D)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dy.stride(0), dy.stride(1), dy.stride(2))
    sl = q if slopes is None else slopes
    _launch("dkdv", T, B * H,
            q, k, v, dy, rz, dl, sl, dk, dv, *strides, H, H // G, T, W, NS, P, scale, **meta)
    _launch("dq", T, B * H,
            q, k, v, dy, rz, dl, sl, dq, *strides, H, H // G, T, W, NS, P, scale, **meta)
    if G != H:
        dk = dk.reshape(B, G, H // G, T, D).sum(2)
        dv = dv.reshape(B, G, H // G, T, D).sum(2)
    dsk, dsv = q.new_empty(0), q.new_empty(0)
    if slot_k is not None:     # the slot columns: (B, H, T, S) in float32
        # matmuls in q's dtype (float32 accumulation) against the thin (.., S, d) slot tensors: each big tensor is
        # read once and nothing of size (B, H, T, d) is made in float32
        sk, sv = slot_k.to(q.dtype), slot_v.to(q.dtype)
        s = (q @ sk.transpose(-1, -2)).float() * scale                                      # (B, H, T, S)
        p = _f(s, op)
        dp = (dy @ sv.transpose(-1, -2)).float()
        if normalize:
            dp = dp * rz.unsqueeze(-1) - dl.unsqueeze(-1)
            p_z = p * rz.unsqueeze(-1)
        else:
            p_z = p
        ds = dp * _f_grad(s, p, op)
        dq.add_((ds * scale).to(q.dtype) @ sk)
        dsk = _batch_sum((scale * ds).transpose(-1, -2).to(q.dtype) @ q, slot_k)
        dsv = _batch_sum(p_z.transpose(-1, -2).to(dy.dtype) @ dy, slot_v)
    return dq, dk, dv, dsk, dsv


@_bwd_op.register_fake
def _(dy, q, k, v, out, Z, slot_k, slot_v, slopes, op, normalize, scale, window, n_sink, prefix):
    new = lambda t: q.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
    return new(q), new(k), new(v), new(slot_k), new(slot_v)


def _setup_context(ctx, inputs, output):
    q, k, v, slot_k, slot_v, slopes, op, normalize, scale, window, n_sink, prefix = inputs
    out, Z = output
    ctx.save_for_backward(q, k, v, out, Z, slot_k, slot_v, slopes)
    ctx.args = (op, normalize, scale, window, n_sink, prefix)


def _backward(ctx, dy, dZ):
    q, k, v, out, Z, slot_k, slot_v, slopes = ctx.saved_tensors
    dq, dk, dv, dsk, dsv = _bwd_op(dy, q, k, v, out, Z, slot_k, slot_v, slopes, *ctx.args)
    return (dq, dk, dv, dsk if slot_k is not None else None, dsv if slot_v is not None else None,
            None, None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def sim_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_fn: Callable, *, op: str,
                  normalize: bool, scale: Optional[float] = None, alibi_slopes: Optional[torch.Tensor] = None,
                  slot_k: Optional[torch.Tensor] = None, slot_v: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused sigmoid / elu+1 attention over positions 0..T-1: q (B, H, T, d), k/v (B, G, T, d), ``mask_fn`` one of
    lit_gpt.attention's banded masks, slots (1|B, H, S, d), ALiBi slopes (H,). Returns (B, H, T, d) in q's dtype."""
    if triton is None:
        raise RuntimeError("sim_attention needs triton (pip install triton)")
    if op not in OPS:
        raise ValueError(invalid_choice("op", op, OPS))
    band = mask_band(mask_fn)
    if band is None:
        raise ValueError(invalid_choice("mask_fn", getattr(mask_fn, "__name__", mask_fn), "a mask of "
                                        "lit_gpt.attention with a band (causal, window, prefix, sink + window)"))
    window, n_sink, prefix = band
    if (slot_k is None) != (slot_v is None):
        given, missing = ("slot_v", "slot_k") if slot_k is None else ("slot_k", "slot_v")
        raise ValueError(invalid_choice(missing, None, f"a tensor when {given} is given (the slots go together)"))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k.to(q.dtype), v.to(q.dtype)))
    slopes = None if alibi_slopes is None else alibi_slopes.to(device=q.device, dtype=torch.float32).contiguous()
    if slot_v is not None:
        slot_v = slot_v.to(q.device)
    y, _ = _fwd_op(q, k, v, slot_k, slot_v, slopes, op, bool(normalize), scale, int(window or 0), int(n_sink),
                   int(prefix))
    return y
