"""Activation statistics and the per-checkpoint evaluation against explicit float64 loops."""
import json
import math

import pytest
import torch

from lit_gpt import GPT, Config
from lit_gpt.analysis import COS_BINS, LOGN_BINS, ActivationMeter, cos_and_norm_product
from lit_gpt.evaluate import batched, evaluate_model, evaluation_to_dict
from lit_gpt.probe import probe_inputs
from test_sink_metrics import ref_sink


def loop_norm_means(hidden):
    """hidden[l] (B, T, C) -> (L, T) mean over samples of the ℓ2 norm, by loops."""
    out = []
    for h in hidden:
        B, T, C = h.shape
        row = []
        for t in range(T):
            row.append(sum(math.sqrt(sum(float(h[b, t, c]) ** 2 for c in range(C))) for b in range(B)) / B)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def loop_cos_stats(q, k):
    """q (B, H, T, d), k (B, G, T, d): mean cos / norm product for key 1 over all t, and for 1 < j <= t."""
    B, H, T, d = q.shape
    G = k.shape[1]
    cf, cr, nf, nr = [0.0] * H, [0.0] * H, [0.0] * H, [0.0] * H
    n_f, n_r = 0, 0
    for h in range(H):
        g = h // (H // G)
        n_f = n_r = 0
        for b in range(B):
            for t in range(T):
                for j in range(t + 1):
                    qv, kv = q[b, h, t].double(), k[b, g, j].double()
                    qn, kn = math.sqrt(float(qv @ qv)), math.sqrt(float(kv @ kv))
                    c = float(qv @ kv) / (qn * kn)
                    if j == 0:
                        cf[h] += c
                        nf[h] += qn * kn
                        n_f += 1
                    else:
                        cr[h] += c
                        nr[h] += qn * kn
                        n_r += 1
    return [x / n_f for x in cf], [x / n_r for x in cr], [x / n_f for x in nf], [x / n_r for x in nr]


def test_norms_and_massive_ratio_match_loops():
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(3, 6, 5, generator=g) for _ in range(3)]
    hidden[1][:, 0] *= 20.0                                   # a massive first token in layer 1
    meter = ActivationMeter()
    meter.update(hidden=[h[:2] for h in hidden])
    meter.update(hidden=[h[2:] for h in hidden])
    res = meter.compute()
    ref = loop_norm_means(hidden)
    assert torch.allclose(res.hidden_norm, ref, atol=1e-6)
    ratio = ref[:, 0] / ref[:, 1:].mean(-1)
    assert torch.allclose(res.massive_ratio, ratio, atol=1e-6)
    assert res.massive_ratio[1] > 10 > res.massive_ratio[0]
    maxabs = torch.tensor([[sum(float(h[b, t].abs().max()) for b in range(3)) / 3 for t in range(6)] for h in hidden],
                          dtype=torch.float64)
    assert torch.allclose(res.hidden_maxabs, maxabs, atol=1e-6)
    s = res.summary()
    assert s["hidden_norm"]["first"] == pytest.approx(ref[:, 0].tolist())


def test_cos_norm_statistics_with_grouped_keys_match_loops():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 3, generator=g)
    k = torch.randn(2, 2, 5, 3, generator=g)                  # 2 groups for 4 heads
    v = torch.randn(2, 2, 5, 3, generator=g)
    meter = ActivationMeter()
    meter.update(q=[q], k=[k], v=[v])
    res = meter.compute()
    cf, cr, nf, nr = loop_cos_stats(q, k)
    assert res.cos_first[0].tolist() == pytest.approx(cf, abs=1e-6)
    assert res.cos_rest[0].tolist() == pytest.approx(cr, abs=1e-6)
    assert res.normprod_first[0].tolist() == pytest.approx(nf, rel=1e-5)
    assert res.normprod_rest[0].tolist() == pytest.approx(nr, rel=1e-5)
    # histograms count every pair once: key 1 for B*H*T queries, the rest for the other causal pairs
    assert res.hist_first.shape == (1, COS_BINS, LOGN_BINS)
    assert res.hist_first.sum().item() == 2 * 4 * 5
    assert res.hist_rest.sum().item() == 2 * 4 * (5 * 6 / 2 - 5)
    back = type(res).from_dict(json.loads(json.dumps(res.to_dict())))
    assert torch.allclose(back.cos_rest, res.cos_rest) and torch.equal(back.hist_first, res.hist_first)
    # key norms: mean over samples and groups
    kn = sum(float(k[b, gg, 0].norm()) for b in range(2) for gg in range(2)) / 4
    assert res.key_norm[0, 0].item() == pytest.approx(kn, rel=1e-6)


def test_cos_of_parallel_vectors_is_one():
    q = torch.tensor([[[[1.0, 0.0], [2.0, 0.0]]]])            # (1, 1, 2, 2)
    k = torch.tensor([[[[3.0, 0.0], [0.0, 1.0]]]])
    cos, prod = cos_and_norm_product(q, k)
    assert torch.allclose(cos[0, 0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.allclose(prod[0, 0], torch.tensor([[3.0, 1.0], [6.0, 2.0]]))


def test_evaluate_model_on_our_gpt_matches_references():
    torch.manual_seed(0)
    cfg = Config.from_name("tiny", kv_bias="k", n_query_groups=2)
    model = GPT(cfg).eval()
    # give k* a large norm so the extra slot takes attention and the result is not degenerate
    with torch.no_grad():
        for b in model.blocks:
            b.attn.k_star.normal_(0, 3.0)
    tokens = torch.randint(0, cfg.vocab_size, (5, 17))
    ev = evaluate_model(model, batched(tokens, 2), T=16, k_max=4, attention_maps=[(1, 2)])
    # loss: predict tokens 2..17 from the first 16 (explicit log-softmax, float64)
    with torch.no_grad():
        logits, an = model(tokens[:, :16], return_analysis=True)
    lp = torch.log_softmax(logits.double(), -1)
    nll = -sum(float(lp[b, t, tokens[b, t + 1]]) for b in range(5) for t in range(16)) / (5 * 16)
    assert ev["loss"] == pytest.approx(nll, rel=1e-5)
    assert ev["n_loss_tokens"] == 80
    # sink with its extra slot against the loop reference on the same maps
    maps = [[an.attn[l][s].double() for l in range(cfg.n_layer)] for s in range(5)]
    expected, _ = ref_sink(maps, eps=0.3, k_max=4, n_extra=1)
    res = ev["sink"]
    assert res.sink_extra == pytest.approx(expected[:1], abs=1e-9)
    assert [res.sink[k] for k in range(1, 5)] == pytest.approx(expected[1:], abs=1e-9)
    assert res.sink_extra[0] > 0
    # activations: hidden norms over all 5 samples
    assert torch.allclose(ev["activations"].hidden_norm, loop_norm_means(an.hidden), atol=1e-5)
    # averaged attention map of (layer 1, head 2)
    assert torch.allclose(ev["attention_maps"][(1, 2)], an.attn[1][:, 2].mean(0), atol=1e-6)
    d = evaluation_to_dict(ev)
    assert d["sink"]["sink_extra"] == res.sink_extra and "L1H2" in d["attention_maps"]


def test_evaluate_model_without_targets_and_errors():
    model = GPT(Config.from_name("tiny")).eval()
    tokens = torch.randint(0, 100, (2, 12))
    ev = evaluate_model(model, [tokens], k_max=3, activations=False)
    assert ev["n_loss_tokens"] == 2 * 11 and ev["activations"] is None
    with pytest.raises(ValueError, match="out of range"):
        evaluate_model(model, [tokens], k_max=3, attention_maps=[(5, 0)])
    with pytest.raises(ValueError, match="T=20"):
        evaluate_model(model, [tokens], T=20)


def test_probe_inputs():
    prefix = [7]
    r = probe_inputs("random", 50, 9, vocab_size=20, prefix=prefix, exclude=[0, 7], seed=3)
    assert r.shape == (50, 9) and bool((r[:, 0] == 7).all())
    assert not bool(((r[:, 1:] == 0) | (r[:, 1:] == 7)).any()) and int(r.max()) < 20
    rep = probe_inputs("repeated", 6, 5, vocab_size=20, prefix=prefix, exclude=[0, 7])
    assert bool((rep[:, 1:] == rep[:, 1:2]).all()) and bool((rep[:, 0] == 7).all())
    assert len(set(rep[:, 1].tolist())) > 1                  # a different token per sample
    fixed = probe_inputs("repeated", 3, 4, vocab_size=20, repeat_token=5)
    assert fixed.tolist() == [[5] * 4] * 3
    nat = probe_inputs("natural", 2, 3, encode=lambda s: [1] + [ord(c) for c in s], texts=["abcd", "efgh", "x"])
    assert nat.tolist() == [[1, 97, 98], [1, 101, 102]]
    # bad arguments: the whole lines, in lit_gpt.utils.invalid_choice's wording
    for call, line in (
        (lambda: probe_inputs("zeros", 1, 4), "input='zeros' is invalid; allowed: natural, random, repeated"),
        (lambda: probe_inputs("randm", 1, 4),
         "input='randm' is invalid (did you mean random?); allowed: natural, random, repeated"),
        (lambda: probe_inputs("repeated", 1, 4, vocab_size=10, repeat_token=10),
         "repeat_token=10 is invalid; allowed: 0..9"),
        (lambda: batched(torch.zeros(3, 4), 0), "batch_size=0 is invalid; allowed: >= 1"),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == line


def test_sink_on_probe_through_a_fabric_wrapper():
    """Training evaluates the wrapped module (Fabric / FSDP / DDP): it must still be recognised as our GPT
    (a 2 x H200 FSDP run once sent it down the Hugging Face path)."""
    from lightning.fabric import Fabric

    from lit_gpt import GPT, Config
    from lit_gpt.evaluate import sink_on_probe

    model = GPT(Config.from_name("tiny", kv_bias="k"))
    tokens = torch.randint(0, 512, (4, 17))
    plain, loss = sink_on_probe(model, tokens, k_max=4)
    wrapped = Fabric(accelerator="cpu", devices=1).setup_module(model)
    res, loss_w = sink_on_probe(wrapped, tokens, k_max=4)
    assert res.n_extra == 1 and res.sink == plain.sink and abs(loss - loss_w) < 1e-6
    torch.testing.assert_close(res.mean_alpha, plain.mean_alpha)
