"""Packed token shards: the on-disk format written by ``preprocess/prepare.py`` and read by :mod:`lit_gpt.data`.

A shard is one file ``<domain prefix>-<tag>-<index>.bin`` holding ``n_chunks`` chunks of ``seq_len`` tokens
(``seq_len = block_size + 1``: inputs are ``chunk[:-1]``, targets ``chunk[1:]``)::

    bytes 0..7     magic b"ASLPACK1"
    bytes 8..11    uint32 little-endian: header length H (token data starts at byte H, a multiple of 64)
    bytes 12..15   uint32 little-endian: length J of the JSON metadata
    bytes 16..16+J UTF-8 JSON metadata, zero padding up to H
    bytes H..      n_chunks * seq_len tokens, little-endian uint16 or uint32 (C order)

The metadata records everything needed to refuse a wrong shard before training: the tokenizer (name,
kind and ``Tokenizer.fingerprint``), its ``vocab_size``, ``eos_id``, the dtype, ``seq_len``, ``n_chunks``,
the domain prefix, the split and the source files. Documents are tokenised without BOS and followed by EOS,
concatenated, and cut into consecutive non-overlapping chunks; the tail shorter than one chunk is dropped.
Files are written atomically (temporary file + rename).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from lit_gpt.utils import atomic_write_bytes, invalid_choice

MAGIC = b"ASLPACK1"
FORMAT_VERSION = 1
SHARD_SUFFIX = ".bin"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_ALIGN = 64


class ShardError(ValueError):
    """A shard file is missing, corrupt, or incompatible with the run."""


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest supported dtype that holds every id of a vocabulary."""
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise ShardError(f"vocab_size={vocab_size} does not fit in uint32")


def encode_header(meta: Dict[str, Any]) -> bytes:
    blob = json.dumps(meta, sort_keys=True).encode("utf-8")
    header_len = -(-(16 + len(blob)) // _ALIGN) * _ALIGN
    head = MAGIC + struct.pack("<II", header_len, len(blob)) + blob
    return head + b"\0" * (header_len - len(head))


def write_shard(path: Union[str, Path], chunks: np.ndarray, meta: Dict[str, Any]) -> Path:
    """Write ``chunks`` (n_chunks, seq_len) with ``meta`` (tokenizer, vocab_size, ...) atomically."""
    path = Path(path)
    if chunks.ndim != 2 or chunks.shape[0] == 0:
        raise ShardError(f"{path}: chunks must be a non-empty (n_chunks, seq_len) array, got {chunks.shape}")
    dtype = meta.get("dtype") or dtype_for_vocab(int(meta["vocab_size"]))
    if dtype not in DTYPES:
        raise ShardError(f"{path}: {invalid_choice('dtype', dtype, DTYPES)}")
    full = dict(meta, format="lit_gpt.packed", version=FORMAT_VERSION, dtype=dtype,
                n_chunks=int(chunks.shape[0]), seq_len=int(chunks.shape[1]))
    data = np.ascontiguousarray(chunks, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<"))
    atomic_write_bytes(path, encode_header(full) + data.tobytes(order="C"))
    return path


def read_header(path: Union[str, Path]) -> Dict[str, Any]:
    """The shard's metadata plus ``header_len``; raises :class:`ShardError` for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise ShardError(f"{path} is not a packed shard (bad magic {head[:8]!r}; expected {MAGIC!r}); "
                             "re-create it with preprocess/prepare.py")
        header_len, json_len = struct.unpack("<II", head[8:16])
        blob = f.read(json_len)
    try:
        meta = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: corrupt shard header ({e})") from e
    if meta.get("version") != FORMAT_VERSION:
        raise ShardError(f"{path}: shard format version {meta.get('version')!r} is not supported; "
                         f"allowed: {FORMAT_VERSION}")
    if meta.get("dtype") not in DTYPES:
        raise ShardError(f"{path}: {invalid_choice('dtype', meta.get('dtype'), DTYPES)}")
    expected = header_len + meta["n_chunks"] * meta["seq_len"] * np.dtype(DTYPES[meta["dtype"]]).itemsize
    if size != expected:
        raise ShardError(f"{path}: file has {size} bytes but its header announces {expected} "
                         f"({meta['n_chunks']} chunks of {meta['seq_len']} {meta['dtype']}); truncated or corrupt")
    meta["header_len"] = header_len
    return meta


class PackedShard:
    """A read-only memory map of one shard: ``shard[i]`` is chunk i as a numpy array of ``seq_len`` tokens."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self.meta = read_header(self.path)
        self.n_chunks: int = self.meta["n_chunks"]
        self.seq_len: int = self.meta["seq_len"]
        self._data: Optional[np.memmap] = None

    @property
    def data(self) -> np.memmap:
        if self._data is None:     # opened lazily: cheap to construct many shards, safe to pickle before use
            dtype = np.dtype(DTYPES[self.meta["dtype"]]).newbyteorder("<")
            self._data = np.memmap(self.path, dtype=dtype, mode="r", offset=self.meta["header_len"],
                                   shape=(self.n_chunks, self.seq_len))
        return self._data

    def __len__(self) -> int:
        return self.n_chunks

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[i]

    def __getstate__(self):
        return {"path": self.path, "meta": self.meta, "n_chunks": self.n_chunks, "seq_len": self.seq_len,
                "_data": None}


class ShardWriter:
    """Accumulates token ids and writes full chunks to shards of ``chunks_per_shard`` chunks.

    Shard names are ``<prefix>-<tag>-<index:05d>.bin``; ``tag`` keeps parallel writers of one domain apart.
    """

    def __init__(self, out_dir: Union[str, Path], prefix: str, tag: str, seq_len: int, chunks_per_shard: int,
                 meta: Dict[str, Any]) -> None:
        if seq_len < 2:
            raise ShardError(invalid_choice("seq_len", seq_len, ">= 2 (block_size >= 1)"))
        if chunks_per_shard < 1:
            raise ShardError(invalid_choice("chunks_per_shard", chunks_per_shard, ">= 1"))
        self.out_dir, self.prefix, self.tag = Path(out_dir), prefix, tag
        self.seq_len, self.chunks_per_shard = seq_len, chunks_per_shard
        self.meta = dict(meta, domain=prefix)
        self.np_dtype = DTYPES[meta.get("dtype") or dtype_for_vocab(int(meta["vocab_size"]))]
        self._buf: List[np.ndarray] = []
        self._buf_len = 0
        self.paths: List[Path] = []
        self.n_tokens_in = 0
        self.n_chunks_out = 0

    def add(self, ids) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size == 0:
            return
        if arr.min() < 0 or arr.max() > np.iinfo(self.np_dtype).max:
            raise ShardError(f"token id out of range for {np.dtype(self.np_dtype).name}: "
                             f"[{arr.min()}, {arr.max()}]")
        self._buf.append(arr.astype(self.np_dtype))
        self._buf_len += arr.size
        self.n_tokens_in += arr.size
        per_shard = self.seq_len * self.chunks_per_shard
        while self._buf_len >= per_shard:
            self._flush(self.chunks_per_shard)

    def _flush(self, n_chunks: int) -> None:
        flat = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        take = n_chunks * self.seq_len
        chunks, rest = flat[:take].reshape(n_chunks, self.seq_len), flat[take:]
        path = self.out_dir / f"{self.prefix}-{self.tag}-{len(self.paths):05d}{SHARD_SUFFIX}"
        write_shard(path, chunks, self.meta)
        self.paths.append(path)
        self.n_chunks_out += n_chunks
        self._buf, self._buf_len = ([rest] if rest.size else []), int(rest.size)

    def close(self) -> int:
        """Write the remaining full chunks; returns the number of tail tokens dropped (< seq_len)."""
        n_full = self._buf_len // self.seq_len
        if n_full:
            self._flush(n_full)
        dropped = self._buf_len
        self._buf, self._buf_len = [], 0
        return dropped
