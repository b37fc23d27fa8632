"""llama2.c checkpoints and tokenizer: a tiny random .bin written here against run.c's forward (interleaved
RoPE, written out in numpy float64), and the real stories260K against its known greedy story."""
import math
import struct

import numpy as np
import pytest
import torch

from conftest import shared_path
from lit_gpt.llama2c import Llama2cTokenizer, load_llama2c, load_llama2c_folder


pytestmark = pytest.mark.usefixtures("one_thread")


def write_random_llama2c(path, dim=16, hidden=24, L=2, H=4, G=2, V=40, seq=32, shared=True, seed=0):
    rng = np.random.default_rng(seed)
    hs = dim // H
    shapes = [("emb", (V, dim)), ("rms_att", (L, dim)), ("wq", (L, H * hs, dim)), ("wk", (L, G * hs, dim)),
              ("wv", (L, G * hs, dim)), ("wo", (L, dim, H * hs)), ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)),
              ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("rms_final", (dim,)),
              ("freq_real", (seq, hs // 2)), ("freq_imag", (seq, hs // 2))]
    if not shared:
        shapes.append(("wcls", (V, dim)))
    w = {}
    for name, shape in shapes:
        scale = 1.0 if name.startswith("rms") else 0.4
        base = 1.0 if name.startswith("rms") else 0.0
        w[name] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    with open(path, "wb") as f:
        f.write(struct.pack("7i", dim, hidden, L, H, G, V if shared else -V, seq))
        for name, _ in shapes:
            f.write(w[name].tobytes())
    return {k: x.astype(np.float64) for k, x in w.items()}, dict(dim=dim, hidden=hidden, L=L, H=H, G=G, V=V)


def run_c_forward(w, hp, tokens, shared=True):
    """llama2.c run.c forward, token by token with a KV cache (float64)."""
    dim, L, H, G = hp["dim"], hp["L"], hp["H"], hp["G"]
    hs, kv_dim, kv_mul = dim // H, dim // H * G, H // G
    rms = lambda x, g: g * x / np.sqrt((x * x).mean() + 1e-5)
    kc = np.zeros((L, len(tokens), kv_dim))
    vc = np.zeros((L, len(tokens), kv_dim))
    out = []
    for pos, tok in enumerate(tokens):
        x = w["emb"][tok].copy()
        for l in range(L):
            xb = rms(x, w["rms_att"][l])
            q, k, v = w["wq"][l] @ xb, w["wk"][l] @ xb, w["wv"][l] @ xb
            for i in range(0, dim, 2):
                freq = 1.0 / 10000.0 ** ((i % hs) / hs)
                c, s = math.cos(pos * freq), math.sin(pos * freq)
                for vec in ((q, k) if i < kv_dim else (q,)):
                    a, b = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = a * c - b * s, a * s + b * c
            kc[l, pos], vc[l, pos] = k, v
            xb = np.zeros(dim)
            for h in range(H):
                g = h // kv_mul
                qh = q[h * hs:(h + 1) * hs]
                att = np.array([qh @ kc[l, t, g * hs:(g + 1) * hs] / math.sqrt(hs) for t in range(pos + 1)])
                att = np.exp(att - att.max())
                att /= att.sum()
                xb[h * hs:(h + 1) * hs] = sum(att[t] * vc[l, t, g * hs:(g + 1) * hs] for t in range(pos + 1))
            x = x + w["wo"][l] @ xb
            xb = rms(x, w["rms_ffn"][l])
            h1, h3 = w["w1"][l] @ xb, w["w3"][l] @ xb
            x = x + w["w2"][l] @ (h1 / (1.0 + np.exp(-h1)) * h3)
        x = rms(x, w["rms_final"])
        out.append((w["emb"] if shared else w["wcls"]) @ x)
    return np.stack(out)


@pytest.mark.parametrize("shared", [True, False])
@torch.no_grad()
def test_loader_matches_run_c_forward(tmp_path, shared):
    path = tmp_path / "tiny.bin"
    w, hp = write_random_llama2c(path, shared=shared)
    model = load_llama2c(path, dtype=torch.float64)
    cfg = model.config
    assert (cfg.n_embd, cfg.n_head, cfg.n_query_groups, cfg.vocab_size, cfg.tie_embeddings) == (16, 4, 2, 40, shared)
    tokens = [1, 5, 9, 2, 33, 7, 7, 0, 12]
    want = run_c_forward(w, hp, tokens, shared)
    got = model(torch.tensor([tokens]))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_truncated_or_padded_files_are_refused(tmp_path):
    path = tmp_path / "tiny.bin"
    write_random_llama2c(path)
    data = path.read_bytes()
    for cut, where in ((40, "file ends inside the RoPE tables"), (len(data) // 2, "file ends inside w")):
        (tmp_path / "short.bin").write_bytes(data[:-cut])
        with pytest.raises(ValueError, match=where):
            load_llama2c(tmp_path / "short.bin")
    (tmp_path / "long.bin").write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match="2 floats left after the last tensor"):
        load_llama2c(tmp_path / "long.bin")


@torch.no_grad()
def test_stories260k_greedy_story():
    model, tok = load_llama2c_folder(shared_path("models", "stories260K"))
    assert (model.config.block_size, model.config.n_query_groups, model.config.intermediate_size) == (512, 4, 172)
    ids = [tok.bos_id]
    model.set_kv_cache(1, 64)
    logits = model(torch.tensor([ids]), input_pos=torch.tensor([0]))
    for t in range(1, 61):
        ids.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([ids[-1:]]), input_pos=torch.tensor([t]))
    text = tok.decode(ids)
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
                           "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high")


def test_stories260k_tokenizer_round_trip_and_byte_fallback():
    tok = Llama2cTokenizer(shared_path("models", "stories260K", "tok512.bin"))
    assert tok.vocab_size == 512
    text = "Once upon a time, Lily saw a café: 日!"
    ids = tok.encode(text)
    assert ids[0] == 1 and tok.decode(ids) == text
    assert tok.encode("Once upon a time", bos=False) == [403, 407, 261, 378]   # the ids the model itself generates
    assert any(3 <= i < 259 for i in ids)                                    # é / 日 went through bytes
