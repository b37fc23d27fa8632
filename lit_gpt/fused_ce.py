"""Linear + cross-entropy over the vocabulary without an fp32 copy of the logits (the training loss).

``linear_cross_entropy(h, weight, targets)`` is ``F.cross_entropy((h @ weight.T).float(), targets)`` (mean over
targets != ``ignore_index``) computed chunk by chunk over rows:

* for each chunk of rows the logits are formed in the compute dtype (bf16 under autocast), one pass computes
  every row's log-normaliser and loss and overwrites the logits, in place, with the gradient
  ``(softmax - onehot) / n_valid``; the two gradient matmuls (w.r.t. the hidden states and the weight) follow at
  once and the chunk's logits are freed. The gradients are kept for ``backward``, which only scales them.
* the per-chunk pass is a Triton kernel on CUDA (one program per row, fp32 arithmetic, the bf16 logits read
  twice and written once) and the same maths in torch operations elsewhere (CPU; the tests check both against a
  float64 reference).

So no (N, V) fp32 tensor exists, the logits of only one chunk are alive at a time, and the FLOPs are those of the
plain path (one forward and two backward matmuls). ``impl='plain'`` is the plain expression (what
``torch.compile`` then fuses itself); ``'auto'`` takes ``'fused'`` on CUDA and ``'plain'`` on CPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lit_gpt.utils import invalid_choice

IMPLS = ("auto", "fused", "plain")
CHUNK_BYTES = 1 << 30          # logits of one chunk of rows (compute dtype): 1 GiB


def _bad_impl(impl) -> ValueError:
    return ValueError(invalid_choice("loss_impl", impl, IMPLS))


# ---------------------------------------------------------------------------- the per-chunk pass
def ce_grad_inplace_torch(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                          ignore_index: int = -100) -> torch.Tensor:
    """Row losses lse - x[t] (float32, float64 for float64 logits; 0 for ignored rows); ``logits`` (n, V) is
    overwritten with ``(softmax - onehot) * scale`` (0 for ignored rows). ``scale`` is a 0-dim float tensor."""
    lf = logits if logits.dtype == torch.float64 else logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    valid = targets != ignore_index
    tt = torch.where(valid, targets, torch.zeros_like(targets))
    x_t = lf.gather(1, tt.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, lse - x_t, torch.zeros_like(lse))
    g = torch.exp(lf - lse.unsqueeze(1))
    g.scatter_add_(1, tt.unsqueeze(1), -valid.to(g.dtype).unsqueeze(1))
    g.mul_((scale.to(g.dtype) * valid.to(g.dtype)).unsqueeze(1))
    logits.copy_(g)
    return loss


_KERNEL = None


def _triton_kernel():
    """The Triton version of :func:`ce_grad_inplace_torch` (built on first use)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def ce_grad_kernel(logits_ptr, stride, targets_ptr, loss_ptr, scale_ptr, n_cols: tl.constexpr,
                       ignore_index: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        t = tl.load(targets_ptr + row).to(tl.int64)
        m = tl.zeros([], dtype=tl.float32) - float("inf")
        s = tl.zeros([], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):                      # online max / sum of exp
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        valid = t != ignore_index
        tt = tl.where(valid, t, 0)
        x_t = tl.load(base + tt).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
        g_scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        for start in range(0, n_cols, BLOCK):                      # gradient, in place
            cols = start + tl.arange(0, BLOCK)
            msk = cols < n_cols
            x = tl.load(base + cols, mask=msk, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == tt, 1.0, 0.0)) * g_scale
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=msk)

    _KERNEL = ce_grad_kernel
    return _KERNEL


def ce_grad_inplace_triton(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                           ignore_index: int = -100, block: int = 4096) -> torch.Tensor:
    """Same contract as :func:`ce_grad_inplace_torch`; one Triton program per row."""
    n, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must be row-major (stride 1 along the vocabulary)")
    loss = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n:
        _triton_kernel()[(n,)](logits, logits.stride(0), targets.contiguous(), loss,
                               scale.reshape(1).to(torch.float32), V, ignore_index, BLOCK=block, num_warps=8)
    return loss


def _use_triton(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------- autograd
class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk_rows: int, kernel):
        N, C = h.shape
        valid = targets != ignore_index
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        scale = 1.0 / valid.sum().clamp_min(1).to(acc)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_w else None
        total = torch.zeros((), device=h.device, dtype=acc)
        for s in range(0, N, chunk_rows):
            hc, tc = h[s:s + chunk_rows], targets[s:s + chunk_rows]
            logits = hc @ weight.t()
            total += kernel(logits, tc, scale, ignore_index).sum()   # logits now hold d loss / d logits
            if need_h:
                torch.mm(logits, weight, out=grad_h[s:s + chunk_rows])
            if need_w:
                grad_w += (logits.t() @ hc).to(acc)
            del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def default_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    return max(256, CHUNK_BYTES // (vocab * torch.tensor([], dtype=dtype).element_size()))


def _compute_dtype(h: torch.Tensor) -> Optional[torch.dtype]:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


@torch.compiler.disable
def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               ignore_index: int = -100, chunk_rows: Optional[int] = None,
                               use_triton: Optional[bool] = None) -> torch.Tensor:
    """Mean cross-entropy of ``h @ weight.T`` (h (N, C), weight (V, C), targets (N,)), chunked as described in
    the module docstring. Runs eagerly (outside ``torch.compile`` graphs: the rest of the model still compiles)."""
    dt = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        if dt is not None:
            h, weight = h.to(dt), weight.to(dt)
        elif weight.dtype != h.dtype:
            weight = weight.to(h.dtype)
        rows = chunk_rows or default_chunk_rows(weight.shape[0], h.dtype)
        triton_ok = _use_triton(h) if use_triton is None else use_triton
        kernel = ce_grad_inplace_triton if triton_ok else ce_grad_inplace_torch
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, rows, kernel)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, impl: str = "auto",
                         ignore_index: int = -100, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """The next-token training loss from final hidden states: ``impl`` fused | plain | auto (see module doc)."""
    if impl not in IMPLS:
        raise _bad_impl(impl)
    if impl == "auto":
        impl = "fused" if h.is_cuda else "plain"
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if impl == "plain":
        logits = F.linear(h, weight)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return F.cross_entropy(logits, targets, ignore_index=ignore_index)
    return fused_linear_cross_entropy(h, weight, targets, ignore_index=ignore_index, chunk_rows=chunk_rows)

