"""Karpathy's llama2.c checkpoints and tokenizers (e.g. ``../shared/models/stories260K``) as our GPT.

Checkpoint (legacy "version 0" ``.bin``): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means an unshared classifier follows), then float32 arrays in this order:
token embedding (V, dim), attention RMSNorm (L, dim), wq (L, H*hs, dim), wk (L, G*hs, dim), wv (L, G*hs, dim),
wo (L, dim, H*hs), FFN RMSNorm (L, dim), w1 (L, hidden, dim), w2 (L, dim, hidden), w3 (L, hidden, dim),
final RMSNorm (dim), two unused RoPE tables (seq_len, hs/2) each, and the classifier (V, dim) if unshared.
Matrices are ``nn.Linear`` weights (out, in). llama2.c rotates interleaved pairs (x[2i], x[2i+1]); our RoPE
rotates halves (x[i], x[i + hs/2]) with the same frequencies, so the rows of wq and wk are permuted per head
to [0, 2, 4, ..., 1, 3, 5, ...]. RMSNorm eps 1e-5, SwiGLU w2(silu(w1 x) * w3 x), RoPE base 10000.

Tokenizer (``tok*.bin``): int32 max token length, then per token a float32 merge score, an int32 byte length
and the bytes. Encoding is llama2.c's: a dummy-prefix space, one token per UTF-8 character (byte fallback to
ids 3 + byte), then repeatedly merge the adjacent pair whose concatenation has the highest score.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch

from lit_gpt.config import Config
from lit_gpt.model import GPT

BOS_ID, EOS_ID = 1, 2


def read_llama2c_header(path: Union[str, Path]) -> Tuple[int, ...]:
    with open(path, "rb") as f:
        head = f.read(28)
    if len(head) != 28:
        raise ValueError(f"{path}: too short for a llama2.c header (7 int32)")
    return struct.unpack("7i", head)


def llama2c_config(path: Union[str, Path], **overrides) -> Config:
    dim, hidden, n_layer, n_head, n_kv, vocab, seq_len = read_llama2c_header(path)
    if min(dim, hidden, n_layer, n_head, n_kv, abs(vocab), seq_len) <= 0 or dim % n_head or n_head % n_kv:
        raise ValueError(f"{path}: implausible llama2.c header {read_llama2c_header(path)} (is it a version-0 .bin?)")
    cfg = dict(name=Path(path).stem, block_size=seq_len, vocab_size=abs(vocab), padding_multiple=1, n_layer=n_layer,
               n_head=n_head, n_query_groups=n_kv, n_embd=dim, intermediate_size=hidden, tie_embeddings=vocab > 0,
               norm_eps=1e-5, rope_base=10000.0, mlp="swiglu", norm_class="rmsnorm", bias=False)
    cfg.update(overrides)
    return Config(**cfg)


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the output rows of a q/k projection from llama2.c's interleaved RoPE pairs to rotate-half."""
    hs = w.shape[0] // n_heads
    perm = torch.cat([torch.arange(0, hs, 2), torch.arange(1, hs, 2)])
    return w.view(n_heads, hs, -1)[:, perm].reshape(w.shape)


def load_llama2c(path: Union[str, Path], dtype: torch.dtype = torch.float32) -> GPT:
    """A llama2.c version-0 checkpoint as our GPT (see the module docstring for the layout)."""
    path = Path(path)
    cfg = llama2c_config(path)
    dim, hidden, L, H, G = cfg.n_embd, cfg.intermediate_size, cfg.n_layer, cfg.n_head, cfg.n_query_groups
    hs, V = cfg.head_size, cfg.vocab_size
    data = np.fromfile(path, dtype=np.float32, offset=28)
    arrays, at = {}, 0

    def take(name, *shape):
        nonlocal at
        n = int(np.prod(shape))
        if at + n > data.size:
            raise ValueError(f"{path}: file ends inside {name} (expected {n} more floats at offset {at})")
        arrays[name] = torch.from_numpy(data[at: at + n].copy()).view(*shape)
        at += n

    take("emb", V, dim)
    take("rms_att", L, dim)
    take("wq", L, H * hs, dim)
    take("wk", L, G * hs, dim)
    take("wv", L, G * hs, dim)
    take("wo", L, dim, H * hs)
    take("rms_ffn", L, dim)
    take("w1", L, hidden, dim)
    take("w2", L, dim, hidden)
    take("w3", L, hidden, dim)
    take("rms_final", dim)
    at += 2 * cfg.block_size * hs // 2                   # the unused RoPE tables
    if at > data.size:
        raise ValueError(f"{path}: file ends inside the RoPE tables ({at - data.size} floats missing)")
    if not cfg.tie_embeddings:
        take("wcls", V, dim)
    if at != data.size:
        raise ValueError(f"{path}: {data.size - at} floats left after the last tensor; not a version-0 llama2.c "
                         f"file for header {read_llama2c_header(path)}")
    model = GPT(cfg)
    sd = {"wte.weight": arrays["emb"], "ln_f.weight": arrays["rms_final"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = arrays["wcls"]
    for i in range(L):
        sd[f"blocks.{i}.norm_1.weight"] = arrays["rms_att"][i]
        sd[f"blocks.{i}.norm_2.weight"] = arrays["rms_ffn"][i]
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([interleaved_to_half(arrays["wq"][i], H),
                                                       interleaved_to_half(arrays["wk"][i], G), arrays["wv"][i]])
        sd[f"blocks.{i}.attn.proj.weight"] = arrays["wo"][i]
        sd[f"blocks.{i}.mlp.fc.weight"] = torch.cat([arrays["w1"][i], arrays["w3"][i]])
        sd[f"blocks.{i}.mlp.proj.weight"] = arrays["w2"][i]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"llama2.c -> GPT mapping is incomplete: missing {missing}, unexpected {unexpected}")
    return model.to(dtype).eval()


class Llama2cTokenizer:
    """llama2.c's BPE tokenizer (``tok*.bin``): ``encode(text, bos, eos)`` / ``decode(ids)``."""

    def __init__(self, path: Union[str, Path]) -> None:
        raw = Path(path).read_bytes()
        (self.max_token_length,) = struct.unpack_from("i", raw, 0)
        at, self.pieces, self.scores = 4, [], []
        while at < len(raw):
            score, n = struct.unpack_from("fi", raw, at)
            at += 8
            self.pieces.append(raw[at: at + n])
            self.scores.append(score)
            at += n
        self.vocab_size = len(self.pieces)
        self.index = {p: i for i, p in enumerate(self.pieces)}
        self.bos_id, self.eos_id = BOS_ID, EOS_ID

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        ids: List[int] = []
        if text:
            ids.append(self.index[b" "])                      # the dummy prefix
        for ch in text:
            b = ch.encode("utf-8")
            if b in self.index:
                ids.append(self.index[b])
            else:
                ids.extend(x + 3 for x in b)                  # byte fallback: <0x00> is id 3
        while True:
            best, best_i = None, -1
            for i in range(len(ids) - 1):
                j = self.index.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if j is not None and (best is None or self.scores[j] > self.scores[best]):
                    best, best_i = j, i
            if best is None:
                break
            ids[best_i: best_i + 2] = [best]
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def piece_bytes(self, token: int, prev: Optional[int] = None) -> bytes:
        piece = self.pieces[token]
        if prev == BOS_ID and piece.startswith(b" "):
            piece = piece[1:]
        if piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece

    def decode(self, ids) -> str:
        out, prev = bytearray(), None
        for t in ids:
            t = int(t)
            if t not in (BOS_ID, EOS_ID):
                out += self.piece_bytes(t, prev)
            prev = t
        return out.decode("utf-8", errors="replace")


def load_llama2c_folder(folder: Union[str, Path], dtype: torch.dtype = torch.float32) -> Tuple[GPT, Llama2cTokenizer]:
    """A folder with one ``*.bin`` checkpoint and one ``tok*.bin`` tokenizer (as ../shared/models/stories260K)."""
    folder = Path(folder)
    toks = sorted(folder.glob("tok*.bin"))
    ckpts = sorted(p for p in folder.glob("*.bin") if p not in toks)
    if len(ckpts) != 1 or len(toks) != 1:
        raise FileNotFoundError(f"{folder}: expected one llama2.c checkpoint *.bin and one tok*.bin, found "
                                f"{[p.name for p in ckpts]} and {[p.name for p in toks]}")
    return load_llama2c(ckpts[0], dtype), Llama2cTokenizer(toks[0])
