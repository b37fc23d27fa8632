"""The plain reference model of benchmarks/ computes the same function as our GPT (so the throughput comparison in
bench_train_step.py compares equal work), and the FLOP count used for MFU."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lit_gpt import GPT, Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference_llama import flops_per_token, from_gpt, loss_fn  # noqa: E402


def test_reference_llama_equals_our_gpt():
    cfg = Config.from_name("tiny", block_size=32, n_embd=32, n_head=4)
    gpt = GPT(cfg).double()
    with torch.no_grad():
        for n, p in gpt.named_parameters():
            if "norm" in n or n.startswith("ln_f"):
                p.add_(0.3 * torch.randn_like(p))
    ref = from_gpt(gpt)
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    a, b = gpt(x[:, :-1]), ref(x[:, :-1])
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    la = F.cross_entropy(a.reshape(-1, a.shape[-1]), x[:, 1:].reshape(-1))
    torch.testing.assert_close(la.float(), loss_fn(b, x[:, 1:]).float())


def test_flops_per_token_counts_matmuls_and_causal_attention():
    cfg = Config.from_name("tinyllama_60M")
    gpt = GPT(Config.from_name("tiny"))
    n = sum(p.numel() for name, p in gpt.named_parameters() if p.dim() == 2 and not name.startswith("wte"))
    blocks = 2 * (4 * 32 * 32 + 3 * 32 * 64)
    assert n == blocks + 512 * 32
    # 60M: 10 layers x (4 x 768^2 + 3 x 768 x 1536) + head 50432 x 768
    n60 = 10 * (4 * 768 ** 2 + 3 * 768 * 1536) + 50432 * 768
    assert flops_per_token(cfg.n_layer, cfg.n_embd, n60, 2048) == 6 * n60 + 6 * 10 * 2048 * 768
