"""Sink_k^ε against hand-built attention matrices with known answers and a float64 loop reference."""
import math

import pytest
import torch

from lit_gpt.sink_metrics import SinkMeter, format_sink, importance_scores, sink_metric, window_start_scores


def ref_sink(maps, eps, k_max, n_extra=0):
    """maps[s][l] = (H, T, S+T) float64 tensor. Paper definition with explicit loops: per (sample, layer, head)
    α_k = sum_{i>=k} A[i, k] / (T-k+1); α* of a slot = mean over all T rows; Sink = share of (s, l, h) with α > ε."""
    cols = n_extra + k_max
    hits = [0] * cols
    total = 0
    per_sample = []
    for sample in maps:
        s_hits = [0] * cols
        s_total = 0
        for layer in sample:
            H, T, _ = layer.shape
            for h in range(H):
                for c in range(cols):
                    if c < n_extra:
                        alpha = sum(float(layer[h, i, c]) for i in range(T)) / T
                    else:
                        k = c - n_extra                          # 0-indexed token
                        alpha = sum(float(layer[h, i, n_extra + k]) for i in range(k, T)) / (T - k)
                    s_hits[c] += alpha > eps
                s_total += 1
        per_sample.append([100.0 * x / s_total for x in s_hits])
        hits = [a + b for a, b in zip(hits, s_hits)]
        total += s_total
    return [100.0 * x / total for x in hits], per_sample


def random_causal_maps(n, L, H, T, n_extra=0, sink_strength=0.0, seed=0):
    """n samples x L layers of (H, T, S+T) softmax maps; optionally a bias towards key 1 in some heads."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        layers = []
        for _ in range(L):
            logits = torch.randn(H, T, n_extra + T, generator=g, dtype=torch.float64) * 2
            logits[:, :, n_extra] += sink_strength * torch.rand(H, 1, generator=g, dtype=torch.float64) * 6
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            mask = torch.cat([torch.ones(T, n_extra, dtype=torch.bool), mask], dim=1)
            layers.append(torch.softmax(logits.masked_fill(~mask, float("-inf")), -1))
        out.append(layers)
    return out


def to_batches(maps, batch_size):
    """samples-major list -> list of per-batch, per-layer (B, H, T, S+T) tensors."""
    batches = []
    for i in range(0, len(maps), batch_size):
        chunk = maps[i:i + batch_size]
        batches.append([torch.stack([s[l] for s in chunk]) for l in range(len(chunk[0]))])
    return batches


def test_importance_scores_hand_built():
    A = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                      [0.5, 0.5, 0.0, 0.0],
                      [0.7, 0.2, 0.1, 0.0],
                      [0.4, 0.3, 0.2, 0.1]])
    alpha = importance_scores(A)
    expected = torch.tensor([(1 + 0.5 + 0.7 + 0.4) / 4, (0.5 + 0.2 + 0.3) / 3, (0.1 + 0.2) / 2, 0.1 / 1])
    assert torch.allclose(alpha, expected, atol=1e-7)


def test_importance_ignores_entries_above_diagonal():
    """Rows i < k never count for key k (paper: i = k..T), e.g. a prefix-LM map with bidirectional entries."""
    A = torch.tensor([[0.5, 0.5, 0.0],
                      [0.2, 0.8, 0.0],
                      [0.1, 0.1, 0.8]])
    alpha = importance_scores(A)
    assert torch.allclose(alpha, torch.tensor([(0.5 + 0.2 + 0.1) / 3, (0.8 + 0.1) / 2, 0.8]), atol=1e-7)


def test_extra_slot_scores_average_every_query():
    # one slot column seen by all 3 queries, then 3 tokens
    A = torch.tensor([[0.9, 0.1, 0.0, 0.0],
                      [0.6, 0.2, 0.2, 0.0],
                      [0.3, 0.3, 0.2, 0.2]])
    alpha = importance_scores(A, n_extra=1)
    expected = torch.tensor([(0.9 + 0.6 + 0.3) / 3, (0.1 + 0.2 + 0.3) / 3, (0.2 + 0.2) / 2, 0.2])
    assert torch.allclose(alpha, expected, atol=1e-7)


def test_threshold_is_strict():
    # T=2: rows [1, 0], [0, 1] -> α_1 = 0.5 exactly
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    at = SinkMeter(eps=0.5, k_max=2)
    at.update([A])
    assert at.compute().sink[1] == 0.0
    below = SinkMeter(eps=0.49, k_max=2)
    below.update([A])
    assert below.compute().sink[1] == 100.0


def test_share_of_layer_head_pairs_known_answer():
    """2 layers x 4 heads, T=4: only (layer 1, head 2) puts all attention on token 1 -> Sink_1 = 1/8 = 12.5%."""
    T = 4
    uniform = torch.ones(T, T).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)      # α_1 = (1 + 1/2 + 1/3 + 1/4) / 4 ≈ 0.52
    diag = torch.eye(T)                                    # α_k = 1/(T-k+1) · 1 -> α_1 = 0.25
    first = torch.zeros(T, T)
    first[:, 0] = 1.0                                      # α_1 = 1
    layers = [diag.expand(1, 4, T, T).clone(), diag.expand(1, 4, T, T).clone()]
    layers[1][0, 2] = first
    res = sink_metric([layers], eps=0.3, k_max=4)
    assert res.sink[1] == pytest.approx(12.5)
    # diag: α_k = 1/(T-k+1): α_2 = 1/3 and α_4 = 1 exceed 0.3 in the 7 diagonal heads; 'first' gives α_k>1 = 0
    assert res.sink[2] == pytest.approx(87.5)
    assert res.sink[4] == pytest.approx(87.5)
    assert res.per_layer[1, 0].item() == pytest.approx(25.0)
    assert res.per_layer[0, 0].item() == pytest.approx(0.0)
    # uniform map: α_1 ≈ 0.521 > 0.3 in every head
    res_u = sink_metric([[uniform.expand(1, 4, T, T)]], eps=0.3, k_max=4)
    assert res_u.sink[1] == 100.0


def test_matches_loop_reference_and_per_sample_average():
    maps = random_causal_maps(n=7, L=3, H=4, T=12, sink_strength=1.0, seed=1)
    expected, per_sample = ref_sink(maps, eps=0.3, k_max=10)
    meter = SinkMeter(eps=0.3, k_max=10)
    for batch in to_batches(maps, 3):
        meter.update([m.float() for m in batch])
    res = meter.compute()
    assert [res.sink[k] for k in range(1, 11)] == pytest.approx(expected, abs=1e-9)
    assert 0 < res.sink[1] < 100                           # the case is not degenerate
    # per-sample Sink, then the mean over samples, is the same number; its spread is reported
    mean_ps = [sum(s[c] for s in per_sample) / len(per_sample) for c in range(10)]
    assert [res.sink[k] for k in range(1, 11)] == pytest.approx(mean_ps, abs=1e-9)
    std1 = math.sqrt(sum((s[0] - mean_ps[0]) ** 2 for s in per_sample) / (len(per_sample) - 1))
    assert res.sink_std[1] == pytest.approx(std1, abs=1e-9)


def test_extra_slot_matches_reference():
    maps = random_causal_maps(n=4, L=2, H=3, T=10, n_extra=1, sink_strength=1.0, seed=2)
    expected, _ = ref_sink(maps, eps=0.2, k_max=3, n_extra=1)
    res = sink_metric([[m.float() for m in b] for b in to_batches(maps, 2)], eps=0.2, k_max=3, n_extra=1)
    assert res.sink_extra == pytest.approx(expected[:1], abs=1e-9)
    assert [res.sink[k] for k in (1, 2, 3)] == pytest.approx(expected[1:], abs=1e-9)
    assert "Sink_1*=" in format_sink(res)


def test_memory_does_not_grow_with_samples():
    """The meter's state has a fixed size: feeding 1 or 40 batches leaves the same accumulator shapes, and the
    result does not depend on how samples are split into batches."""
    maps = random_causal_maps(n=12, L=2, H=2, T=10, sink_strength=1.0, seed=3)
    one = SinkMeter(k_max=5)
    for b in to_batches(maps, 12):
        one.update(b)
    many = SinkMeter(k_max=5)
    sizes = []
    for b in to_batches(maps, 1) * 4:                     # 48 single-sample batches
        many.update(b)
        sizes.append(sum(t.numel() for t in (many._alpha_sum, many._hits, many._grid_hits, many._sample_sum,
                                              many._sample_sq)))
    assert len(set(sizes)) == 1
    r1, r2 = one.compute(), many.compute()
    assert r2.n_samples == 48
    assert [r1.sink[k] for k in range(1, 6)] == pytest.approx([r2.sink[k] for k in range(1, 6)], abs=1e-9)
    assert torch.allclose(r1.sink_vs_eps, r2.sink_vs_eps, atol=1e-5)


def test_sink_vs_eps_grid_agrees_with_single_eps():
    maps = to_batches(random_causal_maps(n=5, L=2, H=4, T=12, sink_strength=1.0, seed=4), 5)
    grid = SinkMeter(k_max=3)
    grid.update(maps[0])
    res = grid.compute()
    for j in (0, 10, 30, 55, 90):
        eps = float(res.eps_grid[j])
        single = sink_metric(maps, eps=eps, k_max=3)
        assert res.sink_vs_eps[0, j].item() == pytest.approx(single.sink[1], abs=1e-4)
    # the curve never increases with eps
    assert bool((res.sink_vs_eps[:, 1:] <= res.sink_vs_eps[:, :-1] + 1e-6).all())


def test_layers_with_different_head_counts():
    T = 4
    first = torch.zeros(1, 1, T, T)
    first[..., 0] = 1.0
    diag = torch.eye(T).view(1, 1, T, T)
    layer0 = torch.cat([first, diag], dim=1)                 # 2 heads, one sink
    layer1 = torch.cat([diag, diag, diag, first], dim=1)     # 4 heads, one sink
    res = sink_metric([[layer0, layer1]], k_max=2)
    assert res.sink[1] == pytest.approx(100 * 2 / 6)
    assert math.isnan(res.mean_alpha[0, 3, 0].item())         # absent head
    assert res.to_dict()["mean_alpha"][0][3][0] is None


@pytest.mark.parametrize("bad, match", [
    ([torch.rand(2, 4, 4)], "must be"),
    ([torch.rand(1, 2, 4, 5)], "key columns"),
    ([torch.full((1, 1, 12, 12), float("nan"))], "NaN"),
])
def test_bad_maps_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SinkMeter(k_max=3).update(bad)


def test_bad_arguments():
    # field=value lines in lit_gpt.utils.invalid_choice's wording, whole
    for call, line in ((lambda: SinkMeter(eps=-0.1), "eps=-0.1 is invalid; allowed: a finite number >= 0"),
                       (lambda: SinkMeter(eps=float("nan")), "eps=nan is invalid; allowed: a finite number >= 0"),
                       (lambda: SinkMeter(k_max=0), "k_max=0 is invalid; allowed: >= 1"),
                       (lambda: window_start_scores(torch.eye(4).view(1, 1, 4, 4), 4),
                        "window=4 is invalid; allowed: an integer in [1, T-1] = [1, 3]")):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == line
    with pytest.raises(ValueError, match="shorter than k_max"):
        SinkMeter(k_max=10).update([torch.eye(4).view(1, 1, 4, 4)])
    with pytest.raises(RuntimeError):
        SinkMeter().compute()
