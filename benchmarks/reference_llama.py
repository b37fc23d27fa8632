"""A plain LLaMA in a page of PyTorch, the yardstick of ``bench_train_step.py``: RMSNorm, RoPE (rotate-half),
SDPA causal attention, SwiGLU, untied LM head, and the usual fp32-upcast cross-entropy outside the model. It shares
no code with lit_gpt (so what lit_gpt gains or loses against it is lit_gpt's own doing); ``from_gpt`` copies a
lit_gpt GPT's weights into it, and the tests check both compute the same logits.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x if x.dtype == torch.float64 else x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Layer(nn.Module):
    def __init__(self, dim: int, n_head: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.attn_norm = RMSNorm(dim, eps)
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim, eps)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.wqkv(self.attn_norm(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, C))
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class RefLlama(nn.Module):
    def __init__(self, vocab: int, dim: int, n_layer: int, n_head: int, hidden: int, max_T: int,
                 rope_base: float = 10000.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim, n_head, hidden, eps) for _ in range(n_layer))
        self.norm = RMSNorm(dim, eps)
        self.head = nn.Linear(dim, vocab, bias=False)
        hd = dim // n_head
        inv = 1.0 / rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = torch.outer(torch.arange(max_T, dtype=torch.float64), inv)
        ang = torch.cat([ang, ang], dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)      # float64, cast per forward
        self.register_buffer("sin", ang.sin(), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    @classmethod
    def like(cls, config) -> "RefLlama":
        """The shape of a lit_gpt Config (LLaMA family: RoPE on all head dims, SwiGLU, MHA, untied head)."""
        return cls(config.vocab_size, config.n_embd, config.n_layer, config.n_head, config.intermediate_size,
                   config.block_size, config.rope_base, config.norm_eps)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok(idx)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.norm(x))


def loss_fn(logits, targets):
    """The common fp32-upcast cross-entropy over the vocabulary."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def from_gpt(gpt) -> RefLlama:
    """A RefLlama holding the weights of a lit_gpt GPT (for the equivalence test)."""
    cfg = gpt.config
    ref = RefLlama.like(cfg).to(dtype=gpt.wte.weight.dtype)
    ref.tok.weight.copy_(gpt.wte.weight)
    ref.head.weight.copy_(gpt.lm_head.weight)
    ref.norm.weight.copy_(gpt.ln_f.weight)
    h = cfg.intermediate_size
    for layer, block in zip(ref.layers, gpt.blocks):
        layer.attn_norm.weight.copy_(block.norm_1.weight)
        layer.mlp_norm.weight.copy_(block.norm_2.weight)
        layer.wqkv.weight.copy_(block.attn.qkv.weight)
        layer.wo.weight.copy_(block.attn.proj.weight)
        layer.w1.weight.copy_(block.mlp.fc.weight[:h])
        layer.w3.weight.copy_(block.mlp.fc.weight[h:])
        layer.w2.weight.copy_(block.mlp.proj.weight)
    return ref


def flops_per_token(n_layer: int, dim: int, n_matmul_params: int, T: int) -> float:
    """Training FLOPs per token: 6 N (N = parameters in matmuls: every linear and the LM head, not the embedding)
    plus causal attention 6 L T d (QK^T and AV: 2 x 2 T d per token and layer forward, halved by the causal mask,
    times 3 for forward + backward)."""
    return 6.0 * n_matmul_params + 6.0 * n_layer * T * dim

