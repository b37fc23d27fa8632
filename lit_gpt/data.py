"""Training data: domains of packed shards, a weighted mixture, on-the-fly transforms, a resumable loader.

* :class:`Domain` — every shard of one prefix (``train_the_pile_arxiv-*.bin``), addressed as one array of chunks;
  ``downsample_ratio`` keeps a seeded random subset of its chunks (the paper's data-amount study).
* :class:`MixtureLoader` — the global sample stream, in one of two modes (``data.mixture_mode``):

  - ``weighted``: global sample ``n`` comes from domain ``d(n)`` drawn with the mixture weights (a generator
    keyed by ``(seed, n // 4096)``), and is the ``c``-th draw of that domain, i.e. chunk
    ``perm_{d, c // N_d}[c % N_d]`` of a per-epoch seeded permutation.
  - ``pooled`` (the seed's loader): every chunk of every domain with weight > 0 goes into one pool of
    ``N = sum N_d`` chunks and sample ``n`` is chunk ``perm_{n // N}[n % N]`` of a per-epoch seeded permutation
    of the pool. The weights only select the domains: each domain contributes in proportion to its size, as in
    the seed's ``create_train_dataloader`` (all files of all prefixes in one shuffled ``PackedDataset``; its
    ``CombinedDataset`` weighting is commented out).

  A micro-batch takes the next ``micro_batch_size * world_size`` global samples and rank ``r`` keeps its slice.
  The whole state is ``{"n": samples consumed, "counts": draws per domain}``, identical on every rank, so a
  checkpoint restores the exact stream (even with another number of GPUs, as long as the global batch is kept).
* Transforms (paper §5, data distribution), applied to every training and validation chunk before the
  input/target split: :class:`RandomTokens` puts uniformly random ids at positions [start, end) (keyed by the
  sample, so resumable and reproducible); :class:`FixedToken` puts one token id at position p. The sink probe
  follows the seed's evaluation (``pretrain/eval_sink_pretrain.py``): a transform with ``on_probe`` (the fixed
  token) is put in place in the probe inputs, the others (random tokens) are not: random-token runs are probed
  on natural text (:func:`lit_gpt.probe.probe_view`). :func:`make_transforms` builds them from a run config.
* :class:`ValidationSet` — a fixed, evenly spaced subset of chunks of each validation domain.
* :func:`open_run_data` — every shard a run reads, opened and checked against the model and the tokenizer,
  with the run's transforms and validation subset (:class:`RunData`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from lit_gpt.packed import SHARD_SUFFIX, PackedShard, read_header
from lit_gpt.utils import invalid_choice

if TYPE_CHECKING:
    from lit_gpt.config import Config
    from lit_gpt.run_config import RunConfig

_BLOCK = 4096          # domain choices are drawn in blocks of this many global samples
_TAG_CHOICE, _TAG_POOL, _TAG_PERM, _TAG_RANDOM, _TAG_POOLED = 0xC401CE, 0x9001, 0x9E53, 0x5A11D, 0x5EED
MIXTURE_MODES = ("weighted", "pooled")


class DataError(ValueError):
    """Missing, empty or incompatible training data."""


# ---------------------------------------------------------------------------- domains
def find_shards(data_dir: Union[str, Path], prefix: str) -> List[Path]:
    """Shards of exactly this prefix (``<prefix>-*.bin`` whose header names the same domain)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir} (create it with preprocess/prepare.py)")
    out = []
    for p in sorted(data_dir.glob(f"{prefix}-*{SHARD_SUFFIX}")):
        if read_header(p).get("domain", prefix) == prefix:
            out.append(p)
    if not out:
        known = sorted({read_header(p).get("domain", "?") for p in data_dir.glob(f"*{SHARD_SUFFIX}")})
        raise DataError(f"no shards for prefix {prefix!r} in {data_dir}; prefixes present: "
                        f"{', '.join(known) if known else 'none'}")
    return out


class Domain:
    """All chunks of one prefix; ``keep`` (downsampling) is a sorted subset of chunk indices or None for all."""

    def __init__(self, name: str, paths: Sequence[Path], seq_len: Optional[int] = None) -> None:
        self.name = name
        self.shards = [PackedShard(p) for p in paths]
        if not self.shards:
            raise DataError(f"domain {name!r} has no shards")
        self.meta = self.shards[0].meta
        for s in self.shards[1:]:
            for key in ("seq_len", "vocab_size"):
                if s.meta[key] != self.meta[key]:
                    raise DataError(f"{s.path}: {key}={s.meta[key]} differs from {self.shards[0].path} "
                                    f"({self.meta[key]}); all shards of {name!r} must match")
            if s.meta["tokenizer"]["fingerprint"] != self.meta["tokenizer"]["fingerprint"]:
                raise DataError(f"{s.path} was made by tokenizer {s.meta['tokenizer']['name']!r}, "
                                f"{self.shards[0].path} by {self.meta['tokenizer']['name']!r}")
        self.seq_len = seq_len or self.meta["seq_len"]
        if self.seq_len > self.meta["seq_len"]:
            raise DataError(f"domain {name!r}: shards hold chunks of {self.meta['seq_len']} tokens but "
                            f"{self.seq_len} (block_size + 1) are needed; re-run preprocess with a larger "
                            "--block_size")
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_total = int(self._starts[-1])
        if self.n_total == 0:
            raise DataError(f"domain {name!r} is empty (0 chunks)")
        self.keep: Optional[np.ndarray] = None

    def downsample(self, ratio: float, seed: int, domain_index: int) -> None:
        if not 0.0 < ratio <= 1.0:
            raise DataError(invalid_choice("downsample_ratio", ratio, "0 < value <= 1"))
        if ratio < 1.0:
            n = max(1, int(math.ceil(ratio * self.n_total)))
            rng = np.random.default_rng([seed, _TAG_POOL, domain_index])
            self.keep = np.sort(rng.permutation(self.n_total)[:n])

    def __len__(self) -> int:
        return self.n_total if self.keep is None else len(self.keep)

    def chunk(self, i: int) -> np.ndarray:
        """Chunk ``i`` of the (downsampled) domain, cropped to ``seq_len`` tokens."""
        j = int(self.keep[i]) if self.keep is not None else int(i)
        s = int(np.searchsorted(self._starts, j, side="right") - 1)
        return self.shards[s][j - int(self._starts[s])][: self.seq_len]


def open_domains(data_dir: Union[str, Path], prefixes: Sequence[str],
                 seq_len: Optional[int] = None) -> Dict[str, Domain]:
    return {p: Domain(p, find_shards(data_dir, p), seq_len) for p in prefixes}


@dataclass
class DataInfo:
    """What every domain of a run agrees on (checked by :func:`check_domains`)."""

    tokenizer: dict
    vocab_size: int
    eos_id: Optional[int]
    seq_len: int


def check_domains(domains: Sequence[Domain], model_vocab_size: int, block_size: int,
                  tokenizer_fingerprint: Optional[str] = None, tokenizer_name: str = "") -> DataInfo:
    """One tokenizer for every shard, matching the configured tokenizer; vocab within the model's."""
    first = domains[0]
    fp = first.meta["tokenizer"]["fingerprint"]
    for d in domains[1:]:
        if d.meta["tokenizer"]["fingerprint"] != fp:
            raise DataError(f"domain {d.name!r} was tokenised with {d.meta['tokenizer']['name']!r} "
                            f"(fingerprint {d.meta['tokenizer']['fingerprint'][:12]}) but {first.name!r} with "
                            f"{first.meta['tokenizer']['name']!r} ({fp[:12]}); re-run preprocess with one tokenizer")
    if tokenizer_fingerprint is not None and tokenizer_fingerprint != fp:
        raise DataError(f"data.tokenizer={tokenizer_name!r} (fingerprint {tokenizer_fingerprint[:12]}) is not "
                        f"the tokenizer of the shards ({first.meta['tokenizer']['name']!r}, {fp[:12]}); "
                        "point data.tokenizer at the tokenizer used by preprocess")
    vocab = max(int(d.meta["vocab_size"]) for d in domains)
    if vocab > model_vocab_size:
        raise DataError(f"tokenizer vocab_size={vocab} ({first.meta['tokenizer']['name']!r}) is larger than the "
                        f"model's vocab_size={model_vocab_size}; allowed: a model with vocab_size >= {vocab}")
    for d in domains:
        if d.meta["seq_len"] < block_size + 1:
            raise DataError(f"domain {d.name!r}: chunks of {d.meta['seq_len']} tokens are shorter than "
                            f"block_size + 1 = {block_size + 1}; re-run preprocess with --block_size {block_size}")
    return DataInfo(first.meta["tokenizer"], vocab, first.meta.get("eos_id"), block_size + 1)


# ---------------------------------------------------------------------------- transforms
class RandomTokens:
    """Replace positions [start, end) of every chunk by uniform random ids in [0, vocab_size)."""

    on_probe = False    # the seed probes random-token runs on natural text (eval_sink_pretrain.py --mode base)

    def __init__(self, start: int, end: int, vocab_size: int, seed: int) -> None:
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
            raise DataError(f"random_tokens start={start!r}, end={end!r} is invalid; allowed: 0 <= start < end")
        self.start, self.end, self.vocab_size, self.seed = start, end, int(vocab_size), seed

    def __call__(self, batch: np.ndarray, keys: Sequence[int]) -> np.ndarray:
        end = min(self.end, batch.shape[1])
        if self.start >= end:
            return batch
        for row, key in enumerate(keys):
            g = np.random.default_rng([self.seed, _TAG_RANDOM, int(key)])
            batch[row, self.start:end] = g.integers(0, self.vocab_size, size=end - self.start)
        return batch

    def __repr__(self) -> str:
        return f"RandomTokens([{self.start}, {self.end}), vocab={self.vocab_size})"


class FixedToken:
    """Put ``token_id`` at position ``position`` of every chunk."""

    on_probe = True     # the seed probes fixed-token runs with the token in place (eval_sink_pretrain.py --mode fix)

    def __init__(self, position: int, token_id: int) -> None:
        if not (isinstance(position, int) and position >= 0):
            raise DataError(invalid_choice("fixed_token position", position, "an integer >= 0"))
        if not (isinstance(token_id, int) and token_id >= 0):
            raise DataError(invalid_choice("fixed_token token_id", token_id, "an integer >= 0"))
        self.position, self.token_id = position, token_id

    def __call__(self, batch: np.ndarray, keys: Sequence[int]) -> np.ndarray:
        if self.position < batch.shape[1]:
            batch[:, self.position] = self.token_id
        return batch

    def __repr__(self) -> str:
        return f"FixedToken(position={self.position}, token_id={self.token_id})"


def apply_transforms(batch: np.ndarray, keys: Sequence[int], transforms: Sequence) -> np.ndarray:
    for t in transforms:
        batch = t(batch, keys)
    return batch


def make_transforms(data, data_vocab_size: int, model_vocab_size: int) -> list:
    """The transforms of a run's ``data`` section (:class:`lit_gpt.run_config.DataConfig`): random tokens drawn
    from ``data.random_tokens.vocab_size`` or the data's vocabulary, then the fixed token."""
    out: list = []
    if data.random_tokens:
        vocab = data.random_tokens.get("vocab_size") or data_vocab_size
        if vocab > model_vocab_size:
            raise DataError(invalid_choice("data.random_tokens.vocab_size", vocab,
                                           f"<= the model's vocab_size={model_vocab_size}"))
        out.append(RandomTokens(data.random_tokens["start"], data.random_tokens["end"], vocab, data.seed))
    if data.fixed_token:
        tid = data.fixed_token.get("token_id", 1)
        if tid >= model_vocab_size:
            raise DataError(invalid_choice("data.fixed_token.token_id", tid, f"< vocab_size={model_vocab_size}"))
        out.append(FixedToken(data.fixed_token["position"], tid))
    return out


# ---------------------------------------------------------------------------- training stream
class MixtureLoader:
    """A mixture of domains as an endless, resumable stream of (micro_batch, seq_len) LongTensors.

    ``mode="weighted"`` draws each sample's domain with ``weights``; ``mode="pooled"`` (the seed's loader)
    shuffles the chunks of all domains together, so the weights only say which domains take part."""

    def __init__(self, domains: Dict[str, Domain], weights: Dict[str, float], micro_batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, transforms: Sequence = (),
                 mode: str = "weighted") -> None:
        if set(weights) != set(domains):
            raise DataError(f"weights {sorted(weights)} and domains {sorted(domains)} differ")
        if mode not in MIXTURE_MODES:
            raise DataError(invalid_choice("mixture_mode", mode, MIXTURE_MODES))
        w = np.array([float(weights[k]) for k in domains], dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise DataError(f"mixture weights {dict(weights)} are invalid; allowed: non-negative, sum > 0")
        self.names = list(domains)
        self.domains = [domains[k] for k in self.names]
        self.mode = mode
        if mode == "pooled":
            if (w == 0).any():
                raise DataError(f"mixture_mode='pooled' takes every chunk of every domain given; weights "
                                f"{dict(weights)} include 0 (leave those domains out)")
            w = np.array([len(d) for d in self.domains], dtype=np.float64)   # proportions = domain sizes
        self.p = w / w.sum()
        self._pool_starts = np.cumsum([0] + [len(d) for d in self.domains])
        self.micro_batch_size, self.seed = int(micro_batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.transforms = list(transforms)
        self.n = 0
        self.counts = np.zeros(len(self.names), dtype=np.int64)
        self._choice_block: Tuple[int, Optional[np.ndarray]] = (-1, None)
        self._perm: Dict[int, Tuple[int, np.ndarray]] = {}

    # -- stream arithmetic
    def domain_of(self, n: int) -> int:
        b = n // _BLOCK
        if self._choice_block[0] != b:
            rng = np.random.default_rng([self.seed, _TAG_CHOICE, b])
            self._choice_block = (b, rng.choice(len(self.p), size=_BLOCK, p=self.p))
        return int(self._choice_block[1][n % _BLOCK])

    def chunk_index(self, d: int, c: int) -> int:
        N = len(self.domains[d])
        epoch = c // N
        cached = self._perm.get(d)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, _TAG_PERM, d, epoch]).permutation(N))
            self._perm[d] = cached
        return int(cached[1][c % N])

    def pooled_chunk(self, n: int) -> Tuple[int, int]:
        """(domain, chunk) of global sample ``n`` in pooled mode: one permutation of all chunks per epoch."""
        N = int(self._pool_starts[-1])
        epoch = n // N
        cached = self._perm.get(-1)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, _TAG_POOLED, epoch]).permutation(N))
            self._perm[-1] = cached
        j = int(cached[1][n % N])
        d = int(np.searchsorted(self._pool_starts, j, side="right") - 1)
        return d, j - int(self._pool_starts[d])

    def next_global(self, count: int) -> List[Tuple[int, int, int]]:
        """Advance the global stream by ``count`` samples: (global index, domain, chunk index) of each."""
        out = []
        for _ in range(count):
            if self.mode == "pooled":
                d, c = self.pooled_chunk(self.n)
            else:
                d = self.domain_of(self.n)
                c = self.chunk_index(d, int(self.counts[d]))
            out.append((self.n, d, c))
            self.counts[d] += 1
            self.n += 1
        return out

    def next_batch(self) -> torch.Tensor:
        samples = self.next_global(self.micro_batch_size * self.world_size)
        mine = samples[self.rank * self.micro_batch_size:(self.rank + 1) * self.micro_batch_size]
        batch = np.stack([self.domains[d].chunk(c) for _, d, c in mine]).astype(np.int64)
        batch = apply_transforms(batch, [n for n, _, _ in mine], self.transforms)
        return torch.from_numpy(batch)

    def __iter__(self):
        while True:
            yield self.next_batch()

    # -- state
    def state_dict(self) -> dict:
        return {"n": int(self.n), "counts": {k: int(c) for k, c in zip(self.names, self.counts)},
                "seed": self.seed, "weights": {k: float(p) for k, p in zip(self.names, self.p)},
                "sizes": {k: len(d) for k, d in zip(self.names, self.domains)}, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["counts"]) != sorted(self.names):
            raise DataError(f"checkpoint data state has domains {sorted(state['counts'])}, this run "
                            f"{sorted(self.names)}; resume with the same mixture")
        if state.get("mode", "weighted") != self.mode:
            raise DataError(f"checkpoint data stream is mixture_mode={state.get('mode', 'weighted')!r}, this run "
                            f"{self.mode!r}; resume with the same data.mixture_mode")
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"checkpoint data seed {state.get('seed')} differs from data.seed={self.seed}")
        sizes = state.get("sizes", {})
        changed = [k for k, d in zip(self.names, self.domains) if k in sizes and sizes[k] != len(d)]
        if changed:
            raise DataError(f"domains {changed} changed size since the checkpoint (shards added or removed); "
                            "the data position cannot be restored")
        self.n = int(state["n"])
        self.counts = np.array([int(state["counts"][k]) for k in self.names], dtype=np.int64)


# ---------------------------------------------------------------------------- validation
class ValidationSet:
    """``n_per_domain`` evenly spaced chunks of each validation domain (fixed for the whole run)."""

    def __init__(self, domains: Dict[str, Domain], n_per_domain: int, transforms: Sequence = ()) -> None:
        self.domains = domains
        self.transforms = list(transforms)
        self.indices: Dict[str, np.ndarray] = {}
        for name, d in domains.items():
            n = min(len(d), int(n_per_domain))
            self.indices[name] = np.unique(np.linspace(0, len(d) - 1, n).round().astype(np.int64))

    def batches(self, name: str, batch_size: int, rank: int = 0, world_size: int = 1):
        """This rank's share of the domain's chunks, in batches (transforms keyed by domain and chunk)."""
        d_index = list(self.domains).index(name)
        idx = self.indices[name][rank::world_size]
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            batch = np.stack([self.domains[name].chunk(int(i)) for i in part]).astype(np.int64)
            keys = [(1 << 40) + (d_index << 32) + int(i) for i in part]
            yield torch.from_numpy(apply_transforms(batch, keys, self.transforms))

    def rows(self, n: int, seq_len: int) -> torch.Tensor:
        """``n`` untransformed rows of ``seq_len`` tokens spread over the domains (the probe set when no text
        probe exists; :func:`lit_gpt.probe.probe_view` applies the run's probe transforms)."""
        names = list(self.domains)
        picks: List[np.ndarray] = []
        per = [n // len(names) + (1 if i < n % len(names) else 0) for i in range(len(names))]
        for name, k in zip(names, per):
            d = self.domains[name]
            if k == 0:
                continue
            if len(d) < k:
                raise DataError(f"validation domain {name!r} has {len(d)} chunks; the probe needs {k}")
            idx = np.unique(np.linspace(0, len(d) - 1, k).round().astype(np.int64))
            picks.append(np.stack([d.chunk(int(i))[:seq_len] for i in idx]).astype(np.int64))
        return torch.from_numpy(np.concatenate(picks))


# ---------------------------------------------------------------------------- data of a run
@dataclass
class RunData:
    """What a run reads: its opened domains, their data info, the tokenizer, the data transforms and the
    validation subset."""

    train: Dict[str, Domain]
    valid: Dict[str, Domain]
    info: DataInfo
    tokenizer: Any
    transforms: list
    valid_set: Optional[ValidationSet] = None


def open_run_data(cfg: "RunConfig", mc: "Config", need_train: bool = True) -> RunData:
    """Open and check every shard the run reads (raises DataError / ShardError with one clear line)."""
    from lit_gpt.tokenizer import Tokenizer

    d = cfg.data
    seq_len = mc.block_size + 1
    train = open_domains(d.train_dir, [k for k, w in d.train.items() if w > 0], seq_len) if need_train else {}
    valid = open_domains(d.valid_dir or d.train_dir, [k for k, w in d.valid.items() if w > 0], seq_len) \
        if d.valid else {}
    domains = list(train.values()) + list(valid.values())
    if not domains:
        raise DataError("no data: data.train and data.valid name no domain with weight > 0")
    tokenizer = None
    if d.tokenizer:
        try:
            tokenizer = Tokenizer(d.tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"data.tokenizer={d.tokenizer!r}: {e}") from e
    info = check_domains(domains, mc.vocab_size, mc.block_size,
                         tokenizer.fingerprint if tokenizer else None, d.tokenizer or "")
    transforms = make_transforms(d, info.vocab_size, mc.vocab_size)
    for i, dom in enumerate(train.values()):
        dom.downsample(d.downsample_ratio, d.seed, i)
    rd = RunData(train, valid, info, tokenizer, transforms)
    if valid:
        rd.valid_set = ValidationSet(valid, d.val_samples, transforms)
    return rd
