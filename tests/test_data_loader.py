"""lit_gpt/data.py: mixture weights, epochs, ranks, resumable position, downsampling, transforms."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_helpers import make_packed  # noqa: E402

from lit_gpt.data import (  # noqa: E402
    DataError, Domain, FixedToken, MixtureLoader, RandomTokens, ValidationSet, check_domains, find_shards,
    make_transforms,
)
from lit_gpt.packed import write_shard  # noqa: E402

SEQ = 9


def domain_with_ids(tmp: Path, name: str, n_chunks: int, base: int, fingerprint: str = "fp") -> Domain:
    """Chunk i of this domain is [base + i] * SEQ, so every sample names its domain and chunk."""
    chunks = np.repeat((base + np.arange(n_chunks))[:, None], SEQ, axis=1)
    meta = {"vocab_size": 60000, "tokenizer": {"name": name, "fingerprint": fingerprint}, "domain": name}
    half = n_chunks // 2
    write_shard(tmp / f"{name}-f0000-00000.bin", chunks[:half], meta)
    write_shard(tmp / f"{name}-f0000-00001.bin", chunks[half:], meta)
    return Domain(name, find_shards(tmp, name))


@pytest.fixture
def domains(tmp_path):
    return {"a": domain_with_ids(tmp_path, "a", 50, 1000), "b": domain_with_ids(tmp_path, "b", 30, 2000),
            "c": domain_with_ids(tmp_path, "c", 20, 3000)}


def draw(loader: MixtureLoader, n_batches: int) -> np.ndarray:
    return np.concatenate([loader.next_batch().numpy() for _ in range(n_batches)])


def test_mixture_weights_are_honoured(domains):
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    rows = draw(MixtureLoader(domains, weights, micro_batch_size=50, seed=1), 200)      # 10000 samples
    first = rows[:, 0]
    frac = {k: float(np.mean((first >= base) & (first < base + 1000))) for k, base in
            (("a", 1000), ("b", 2000), ("c", 3000))}
    for k, w in weights.items():       # binomial sd <= 0.005 at n=10000: 0.02 is 4 sd
        assert abs(frac[k] - w) < 0.02, (k, frac[k], w)
    assert (rows == rows[:, :1]).all()  # whole chunks, untouched


def test_each_epoch_visits_every_chunk_once(domains):
    rows = draw(MixtureLoader({"b": domains["b"]}, {"b": 1.0}, micro_batch_size=10, seed=2), 9)  # 3 epochs of 30
    ids = rows[:, 0] - 2000
    for e in range(3):
        assert sorted(ids[30 * e:30 * (e + 1)].tolist()) == list(range(30))
    assert ids[:30].tolist() != ids[30:60].tolist()     # reshuffled per epoch


def seed_pooled_epoch(domains) -> list:
    """The seed's create_train_dataloader: the files of every prefix in one list, shuffled together, read whole;
    the YAML weights are never used. One epoch is therefore every chunk of every domain exactly once."""
    return sorted(int(d.chunk(i)[0]) for d in domains.values() for i in range(len(d)))


def test_pooled_mode_is_the_seeds_loader_weights_ignored(domains):
    N = sum(len(d) for d in domains.values())                          # 100 chunks: a 50, b 30, c 20
    a = draw(MixtureLoader(domains, {"a": 0.6, "b": 0.3, "c": 0.1}, micro_batch_size=10, seed=1, mode="pooled"), 30)
    b = draw(MixtureLoader(domains, {"a": 1.0, "b": 1.0, "c": 1.0}, micro_batch_size=10, seed=1, mode="pooled"), 30)
    assert (a == b).all()                                              # the weights do not change the stream
    ids = a[:, 0]
    for e in range(3):                                                 # each epoch: the whole pool once
        assert sorted(ids[N * e:N * (e + 1)].tolist()) == seed_pooled_epoch(domains)
    assert ids[:N].tolist() != ids[N:2 * N].tolist()                   # reshuffled per epoch
    first = ids[:N]
    assert [int(((first >= base) & (first < base + 1000)).sum()) for base in (1000, 2000, 3000)] == [50, 30, 20]
    assert not all(first[i] < first[i + 1] for i in range(N - 1))      # domains interleaved, not in file order
    loader = MixtureLoader(domains, {"a": 1, "b": 1, "c": 1}, micro_batch_size=10, seed=1, mode="pooled")
    assert [round(p, 6) for p in loader.p] == [0.5, 0.3, 0.2]          # effective shares = sizes
    with pytest.raises(DataError, match="mixture_mode='pooled'.*include 0"):
        MixtureLoader(domains, {"a": 1, "b": 0, "c": 1}, micro_batch_size=10, seed=1, mode="pooled")
    with pytest.raises(DataError, match="mixture_mode='mixed' is invalid; allowed: weighted, pooled"):
        MixtureLoader(domains, {"a": 1, "b": 1, "c": 1}, micro_batch_size=10, seed=1, mode="mixed")


def test_pooled_mode_downsample_and_resume(domains):
    for i, d in enumerate(domains.values()):
        d.downsample(0.5, seed=2, domain_index=i)
    kept = seed_pooled_epoch(domains)                                  # 25 + 15 + 10 chunks
    ref = MixtureLoader(domains, {"a": 1, "b": 1, "c": 1}, micro_batch_size=5, seed=2, mode="pooled")
    assert sorted(draw(ref, 10)[:, 0].tolist()) == kept
    state = ref.state_dict()
    expected = draw(ref, 7)
    fresh = MixtureLoader(domains, {"a": 1, "b": 1, "c": 1}, micro_batch_size=5, seed=2, mode="pooled")
    fresh.load_state_dict(state)
    assert (draw(fresh, 7) == expected).all()
    weighted = MixtureLoader(domains, {"a": 1, "b": 1, "c": 1}, micro_batch_size=5, seed=2)
    with pytest.raises(DataError, match="mixture_mode='pooled', this run 'weighted'"):
        weighted.load_state_dict(state)


@pytest.mark.parametrize("mode", ["weighted", "pooled"])
def test_ranks_split_the_same_global_stream(domains, mode):
    w = {"a": 0.5, "b": 0.3, "c": 0.2}
    single = draw(MixtureLoader(domains, w, micro_batch_size=8, seed=3, mode=mode), 5)
    r0 = MixtureLoader(domains, w, micro_batch_size=4, seed=3, rank=0, world_size=2, mode=mode)
    r1 = MixtureLoader(domains, w, micro_batch_size=4, seed=3, rank=1, world_size=2, mode=mode)
    both = np.concatenate([np.concatenate([r0.next_batch().numpy(), r1.next_batch().numpy()]) for _ in range(5)])
    assert (both == single).all()
    assert r0.state_dict() == r1.state_dict()


def test_state_dict_restores_the_exact_position(domains):
    w = {"a": 0.5, "b": 0.5}
    two = {k: domains[k] for k in w}
    ref = MixtureLoader(two, w, micro_batch_size=6, seed=4)
    draw(ref, 7)
    state = ref.state_dict()
    expected = draw(ref, 5)
    fresh = MixtureLoader(two, w, micro_batch_size=6, seed=4)
    fresh.load_state_dict(state)
    assert (draw(fresh, 5) == expected).all()
    other = MixtureLoader({"a": domains["a"], "c": domains["c"]}, {"a": 1, "c": 1}, micro_batch_size=6, seed=4)
    with pytest.raises(DataError, match="same mixture"):
        other.load_state_dict(state)


def test_downsample_keeps_a_fixed_subset(domains):
    d = domains["a"]
    d.downsample(0.2, seed=5, domain_index=0)
    assert len(d) == 10
    kept = {int(d.chunk(i)[0]) for i in range(10)}
    rows = draw(MixtureLoader({"a": d}, {"a": 1.0}, micro_batch_size=10, seed=5), 6)
    assert set(rows[:, 0].tolist()) == kept
    with pytest.raises(DataError, match="downsample_ratio"):
        d.downsample(0.0, seed=5, domain_index=0)


def test_random_tokens_only_touch_their_positions():
    batch = np.full((400, 12), 7, dtype=np.int64)
    t = RandomTokens(start=2, end=5, vocab_size=50, seed=0)
    out = t(batch.copy(), keys=list(range(400)))
    assert (out[:, :2] == 7).all() and (out[:, 5:] == 7).all()
    mid = out[:, 2:5]
    assert mid.min() >= 0 and mid.max() < 50
    counts = np.bincount(mid.reshape(-1), minlength=50)      # 1200 draws over 50 ids: roughly uniform
    assert counts.min() > 5 and counts.max() < 50
    again = t(batch.copy(), keys=list(range(400)))
    assert (again == out).all()                              # keyed by sample: reproducible after resume
    shifted = t(batch.copy(), keys=list(range(1, 401)))
    assert (shifted[:-1] == out[1:]).all()


def test_fixed_token_and_loader_transforms(domains):
    out = FixedToken(position=1, token_id=1)(np.arange(24).reshape(3, 8).copy(), keys=[0, 1, 2])
    expected = np.arange(24).reshape(3, 8)
    expected[:, 1] = 1
    assert (out == expected).all()
    loader = MixtureLoader({"a": domains["a"]}, {"a": 1.0}, micro_batch_size=4, seed=6,
                           transforms=[RandomTokens(0, 1, 10, seed=6), FixedToken(2, 1)])
    rows = draw(loader, 3)
    assert (rows[:, 0] < 10).all() and (rows[:, 2] == 1).all() and (rows[:, 3:] >= 1000).all()
    assert (rows[:, 1] >= 1000).all()


def test_validation_set_is_fixed_and_split_over_ranks(domains):
    vs = ValidationSet({"b": domains["b"]}, n_per_domain=10)
    all_rows = np.concatenate([b.numpy() for b in vs.batches("b", 3)])
    parts = [np.concatenate([b.numpy() for b in vs.batches("b", 3, rank=r, world_size=2)]) for r in (0, 1)]
    assert sorted(all_rows[:, 0].tolist()) == sorted(np.concatenate(parts)[:, 0].tolist())
    assert len(set(all_rows[:, 0].tolist())) == 10
    probe = vs.rows(6, 5)
    assert probe.shape == (6, 5)


def test_check_domains_refuses_foreign_tokenizer_and_small_model(tmp_path):
    a = domain_with_ids(tmp_path, "a", 4, 0, fingerprint="one")
    b = domain_with_ids(tmp_path, "b", 4, 0, fingerprint="two")
    with pytest.raises(DataError, match="tokenised with"):
        check_domains([a, b], model_vocab_size=60032, block_size=8)
    with pytest.raises(DataError, match="not the tokenizer of the shards"):
        check_domains([a], model_vocab_size=60032, block_size=8, tokenizer_fingerprint="two", tokenizer_name="t")
    with pytest.raises(DataError, match="larger than the model"):
        check_domains([a], model_vocab_size=512, block_size=8)
    with pytest.raises(DataError, match="shorter than block_size"):
        check_domains([a], model_vocab_size=60032, block_size=64)
    with pytest.raises(DataError, match="no shards for prefix 'zzz'"):
        find_shards(tmp_path, "zzz")


def test_real_packed_data_round_trip(tmp_path):
    out = make_packed(tmp_path, block_size=16, n_docs=30)
    d = Domain("train_alpha", find_shards(out, "train_alpha"), seq_len=17)
    info = check_domains([d], model_vocab_size=512, block_size=16, tokenizer_fingerprint="bytes-v1")
    assert info.vocab_size == 257 and info.seq_len == 17
    assert d.chunk(0).shape == (17,)


def test_bad_data_values_name_the_field_the_value_and_what_is_allowed(domains):
    from types import SimpleNamespace

    def message(make):
        with pytest.raises(DataError) as e:
            make()
        return str(e.value)

    assert message(lambda: domains["a"].downsample(1.5, seed=0, domain_index=0)) == \
        "downsample_ratio=1.5 is invalid; allowed: 0 < value <= 1"
    assert message(lambda: FixedToken(-1, 1)) == "fixed_token position=-1 is invalid; allowed: an integer >= 0"
    assert message(lambda: FixedToken(0, "1")) == "fixed_token token_id='1' is invalid; allowed: an integer >= 0"
    data = SimpleNamespace(random_tokens={"start": 0, "end": 2, "vocab_size": 70}, fixed_token=None, seed=0)
    assert message(lambda: make_transforms(data, 50, 64)) == \
        "data.random_tokens.vocab_size=70 is invalid; allowed: <= the model's vocab_size=64"
    data = SimpleNamespace(random_tokens=None, fixed_token={"position": 0, "token_id": 64}, seed=0)
    assert message(lambda: make_transforms(data, 50, 64)) == \
        "data.fixed_token.token_id=64 is invalid; allowed: < vocab_size=64"
    assert message(lambda: MixtureLoader(domains, {"a": 1, "b": 1, "c": 1}, micro_batch_size=2, seed=0,
                                         mode="pooed")) == \
        "mixture_mode='pooed' is invalid (did you mean pooled?); allowed: weighted, pooled"
