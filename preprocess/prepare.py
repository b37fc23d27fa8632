"""Tokenise JSONL documents and pack them into shards of (block_size + 1)-token chunks.

    python -m preprocess.prepare --source ../shared/corpus --tokenizer ../shared/tokenizers/gpt-neox-20b \
        --out datasets/shared_corpus --block_size 2048

Inputs: files or folders of .jsonl / .jsonl.gz / .jsonl.xz / .jsonl.zst (a ``text`` field per line), e.g. a
Hugging Face dataset folder fetched by ``preprocess/download.py``. Every document is tokenised without BOS
and followed by EOS; documents are concatenated per input file and cut into consecutive chunks (the tail
shorter than one chunk is dropped and counted).

Domain prefixes come from the file names: ``<split>_[<short_name>_]<domain>`` where ``domain`` is the file
name without its extensions, without a trailing ``-<number>`` shard index and without a ``-train`` / ``-val``
/ ``-valid`` / ``-test`` part, and ``split`` is ``valid`` when a folder or that part of the name says so
(``valid/``, ``val/``, ``validation/``, ``test/``, ``*-val*``), else ``train``. For example
``gutenberg-train-01.jsonl.xz`` -> ``train_gutenberg`` and ``valid/arxiv-0.jsonl`` with ``--short_name
the_pile`` -> ``valid_the_pile_arxiv``. ``--valid_fraction f`` additionally moves a deterministic fraction f
of the documents of every train file to the matching ``valid_`` prefix (a held-out split for corpora that
ship none).

Files are processed in parallel (one process per file, ``--workers``); a single file uses the tokenizer's own
threads. Nothing is overwritten: shards already present for a prefix are an error unless ``--overwrite``.
A ``manifest.json`` in the output folder lists prefixes, shards, documents and tokens.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

if __package__ in (None, ""):   # `python preprocess/prepare.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.packed import SHARD_SUFFIX, ShardWriter, dtype_for_vocab, read_header
from lit_gpt.textio import JSONL_SUFFIXES, iter_texts, list_text_files
from lit_gpt.tokenizer import Tokenizer
from lit_gpt.utils import ArgumentParser, atomic_write_text, check_writable_dir, invalid_choice, progress_bar

VALID_WORDS = ("valid", "validation", "val", "dev", "test")
SPLIT_WORDS = VALID_WORDS + ("train",)
SPLITS = ("auto", "train", "valid")         # --split: from the file names (auto), or every file one split
_BATCH_CHARS = 4_000_000       # characters handed to the tokenizer at once (encode_batch)


class PrepareError(ValueError):
    """Bad input to preprocessing (reported before any shard is written)."""


# ---------------------------------------------------------------------------- naming
def file_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(JSONL_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.split(".")[0]


def split_and_domain(path: Path, root: Optional[Path] = None) -> Tuple[str, str]:
    """(split, domain) of one input file; see the module docstring for the rule."""
    stem = file_stem(path)
    parts = [p.lower() for p in (path.relative_to(root).parts[:-1] if root and root in path.parents else
                                 path.parts[-2:-1])]
    words = stem.split("-")
    while len(words) > 1 and words[-1].isdigit():
        words.pop()
    split = "valid" if any(p in VALID_WORDS for p in parts) or any(w.lower() in VALID_WORDS for w in words[1:]) \
        else "train"
    kept = [w for i, w in enumerate(words) if i == 0 or w.lower() not in SPLIT_WORDS]
    while len(kept) > 1 and kept[-1].isdigit():
        kept.pop()
    return split, "-".join(kept)


def domain_prefix(split: str, domain: str, short_name: str = "") -> str:
    return f"{split}_{short_name}_{domain}" if short_name else f"{split}_{domain}"


def holdout(file_name: str, doc_index: int, fraction: float) -> bool:
    """Deterministic membership of document ``doc_index`` of a file in the held-out fraction."""
    if fraction <= 0:
        return False
    return zlib.crc32(f"{file_name}:{doc_index}".encode()) / 2 ** 32 < fraction


# ---------------------------------------------------------------------------- one file
@dataclass
class FileTask:
    path: str
    index: int
    prefix: str
    valid_prefix: Optional[str]          # where held-out documents go (valid_fraction > 0), else None
    tokenizer: str
    fingerprint: str
    out_dir: str
    seq_len: int
    chunks_per_shard: int
    valid_fraction: float
    field: str
    meta: dict


@dataclass
class FileResult:
    path: str
    docs: Dict[str, int] = field(default_factory=dict)       # prefix -> documents
    tokens: Dict[str, int] = field(default_factory=dict)     # prefix -> tokens (EOS included)
    chunks: Dict[str, int] = field(default_factory=dict)
    dropped: Dict[str, int] = field(default_factory=dict)
    shards: Dict[str, List[str]] = field(default_factory=dict)


def _batches(texts: Iterable[str]) -> Iterable[List[str]]:
    batch, chars = [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= _BATCH_CHARS or len(batch) >= 1024:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def process_file(task: FileTask) -> FileResult:
    tok = Tokenizer(task.tokenizer)
    if tok.fingerprint != task.fingerprint:
        raise PrepareError(f"tokenizer {task.tokenizer} changed while preprocessing (fingerprint mismatch)")
    path = Path(task.path)
    meta = dict(task.meta, source=[path.name])
    writers = {task.prefix: ShardWriter(task.out_dir, task.prefix, f"f{task.index:04d}", task.seq_len,
                                        task.chunks_per_shard, dict(meta, split=task.prefix.split("_", 1)[0]))}
    if task.valid_prefix:
        writers[task.valid_prefix] = ShardWriter(task.out_dir, task.valid_prefix, f"f{task.index:04d}",
                                                 task.seq_len, task.chunks_per_shard, dict(meta, split="valid"))
    res = FileResult(path=task.path, docs={p: 0 for p in writers})
    doc_index = 0
    for batch in _batches(iter_texts(path, field=task.field)):
        for ids in tok.encode_batch(batch, eos=True):
            held = task.valid_prefix is not None and holdout(path.name, doc_index, task.valid_fraction)
            target = task.valid_prefix if held else task.prefix
            writers[target].add(ids)
            res.docs[target] += 1
            doc_index += 1
    for p, w in writers.items():
        res.dropped[p] = w.close()
        res.tokens[p], res.chunks[p], res.shards[p] = w.n_tokens_in, w.n_chunks_out, [str(s) for s in w.paths]
    return res


def _init_worker(threads: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"


# ---------------------------------------------------------------------------- planning and checks
def plan(sources: Sequence[str], tokenizer: Tokenizer, tokenizer_source: str, out_dir: Path, block_size: int,
         short_name: str = "", split: str = "auto", valid_fraction: float = 0.0, chunks_per_shard: int = 1024,
         field: str = "text", domain: Optional[str] = None, overwrite: bool = False) -> List[FileTask]:
    """Check every input and build the per-file tasks; raises :class:`PrepareError` before writing anything."""
    if not sources:
        raise PrepareError("--source is empty: pass at least one JSONL file or folder")
    if not isinstance(block_size, int) or block_size < 1:
        raise PrepareError(invalid_choice("--block_size", block_size, "a positive integer"))
    if split not in SPLITS:
        raise PrepareError(invalid_choice("--split", split, SPLITS))
    if not 0.0 <= valid_fraction < 1.0:
        raise PrepareError(invalid_choice("--valid_fraction", valid_fraction, "0 <= value < 1"))
    if tokenizer.eos_id is None:
        raise PrepareError(f"tokenizer {tokenizer_source} has no EOS token; documents must end with EOS")
    if short_name and not re.fullmatch(r"[A-Za-z0-9_.]+", short_name):
        raise PrepareError(invalid_choice("--short_name", short_name, "letters, digits, '_' and '.'"))
    files: List[Tuple[Path, Optional[Path]]] = []
    for s in sources:
        src = Path(s).expanduser()
        try:
            listed = list_text_files(src)
        except FileNotFoundError as e:
            raise PrepareError(str(e)) from e
        for f in listed:
            if f.stat().st_size == 0:
                raise PrepareError(f"input file {f} is empty")
            files.append((f, src if src.is_dir() else None))
    _check_writable(out_dir)
    meta = {"tokenizer": {"name": tokenizer.name, "kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint,
                          "source": str(tokenizer_source)},
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "bos": False, "eos": True,
            "block_size": block_size, "dtype": dtype_for_vocab(tokenizer.vocab_size),
            "created_by": "preprocess/prepare.py"}
    tasks = []
    for i, (f, root) in enumerate(sorted(set(files))):
        file_split, file_domain = split_and_domain(f, root)
        if split != "auto":
            file_split = split
        name = domain or file_domain
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise PrepareError(f"{f}: domain name {name!r} has characters other than letters, digits, '_-.'; "
                               "pass --domain NAME")
        prefix = domain_prefix(file_split, name, short_name)
        valid_prefix = domain_prefix("valid", name, short_name) if valid_fraction > 0 and file_split == "train" \
            else None
        tasks.append(FileTask(str(f), i, prefix, valid_prefix, str(tokenizer_source), tokenizer.fingerprint,
                              str(out_dir), block_size + 1, chunks_per_shard, valid_fraction, field, meta))
    prefixes = sorted({t.prefix for t in tasks} | {t.valid_prefix for t in tasks if t.valid_prefix})
    existing = [p for p in prefixes if _existing_shards(out_dir, p)]
    if existing and not overwrite:
        raise PrepareError(f"{out_dir} already holds shards for {', '.join(existing)}; nothing was written. "
                           "Choose another --out or pass --overwrite to replace them")
    return tasks


def _existing_shards(out_dir: Path, prefix: str) -> List[Path]:
    return sorted(out_dir.glob(f"{prefix}-*{SHARD_SUFFIX}")) if out_dir.is_dir() else []


def _check_writable(out_dir: Path) -> None:
    try:
        check_writable_dir(out_dir)
    except OSError as e:
        raise PrepareError(f"output folder {out_dir} is not writable ({e.strerror or e})") from e


# ---------------------------------------------------------------------------- driver
def prepare(sources: Sequence[str], tokenizer: str, out: str, block_size: int = 2048, short_name: str = "",
            split: str = "auto", valid_fraction: float = 0.0, chunks_per_shard: int = 1024, workers: int = 0,
            field: str = "text", domain: Optional[str] = None, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Tokenise and pack; returns the manifest entry of this call (also merged into ``<out>/manifest.json``)."""
    t0 = time.time()
    out_dir = Path(out)
    try:
        tok = Tokenizer(tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise PrepareError(f"--tokenizer {tokenizer}: {e}") from e
    tasks = plan(sources, tok, tokenizer, out_dir, block_size, short_name, split, valid_fraction,
                 chunks_per_shard, field, domain, overwrite)
    if overwrite:
        for p in sorted({t.prefix for t in tasks} | {t.valid_prefix for t in tasks if t.valid_prefix}):
            for old in _existing_shards(out_dir, p):
                old.unlink()
    n_cpu = os.cpu_count() or 1
    workers = min(len(tasks), workers or n_cpu)
    results: List[FileResult] = []
    bar = progress_bar(len(tasks), "tokenise+pack", quiet=not progress, unit="file", leave=True)
    if workers <= 1:
        for t in tasks:
            results.append(process_file(t))
            bar.update(1)
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(max(1, n_cpu // workers),)) as pool:
            for r in pool.imap_unordered(process_file, tasks):
                results.append(r)
                bar.update(1)
    bar.close()
    summary: Dict[str, dict] = {}
    for r in results:
        for p in r.docs:
            s = summary.setdefault(p, {"documents": 0, "tokens": 0, "chunks": 0, "dropped_tokens": 0,
                                       "shards": [], "sources": []})
            s["documents"] += r.docs[p]
            s["tokens"] += r.tokens.get(p, 0)
            s["chunks"] += r.chunks.get(p, 0)
            s["dropped_tokens"] += r.dropped.get(p, 0)
            s["shards"] += [Path(x).name for x in r.shards.get(p, [])]
            s["sources"].append(r.path)
    for s in summary.values():
        s["shards"].sort()
        s["sources"].sort()
    empty = [p for p, s in summary.items() if s["chunks"] == 0]
    entry = {"tokenizer": tasks[0].meta["tokenizer"], "vocab_size": tok.vocab_size, "block_size": block_size,
             "seq_len": block_size + 1, "dtype": tasks[0].meta["dtype"], "prefixes": summary,
             "seconds": round(time.time() - t0, 2)}
    _merge_manifest(out_dir, entry)
    if empty:
        raise PrepareError(f"no full chunk of {block_size + 1} tokens for {', '.join(sorted(empty))}: the "
                           "input is too small for this --block_size (other prefixes were written)")
    return entry


def _merge_manifest(out_dir: Path, entry: dict) -> None:
    path = out_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"prefixes": {}}
    for p, s in entry["prefixes"].items():
        manifest["prefixes"][p] = dict(s, tokenizer=entry["tokenizer"], seq_len=entry["seq_len"],
                                       dtype=entry["dtype"], vocab_size=entry["vocab_size"])
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def describe(folder: str) -> str:
    """One line per prefix of a shard folder (from the shard headers, not the manifest)."""
    rows: Dict[str, List[int]] = {}
    for f in sorted(Path(folder).glob(f"*{SHARD_SUFFIX}")):
        m = read_header(f)
        r = rows.setdefault(m["domain"], [0, 0, m["seq_len"]])
        r[0] += 1
        r[1] += m["n_chunks"]
    return "\n".join(f"{p:40s} {n:5d} shards {c:9d} chunks x {L} = {c * L / 1e6:9.2f}M tokens"
                     for p, (n, c, L) in rows.items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--source", nargs="+", required=True, help="JSONL files or folders")
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json / tokenizer.model, or 'bytes'")
    ap.add_argument("--out", required=True, help="output folder for the shards")
    ap.add_argument("--block_size", type=int, default=2048, help="model context; chunks hold block_size+1 tokens")
    ap.add_argument("--short_name", default="", help="inserted in prefixes: <split>_<short_name>_<domain>")
    ap.add_argument("--split", default="auto", choices=SPLITS)
    ap.add_argument("--valid_fraction", type=float, default=0.0, help="hold out this fraction of train documents")
    ap.add_argument("--chunks_per_shard", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=0, help="processes (default: one per file, at most #cores)")
    ap.add_argument("--field", default="text", help="JSON field holding the document text")
    ap.add_argument("--domain", default=None, help="use this domain name for every input file")
    ap.add_argument("--overwrite", action="store_true", help="replace existing shards of the same prefixes")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        entry = prepare(a.source, a.tokenizer, a.out, a.block_size, a.short_name, a.split, a.valid_fraction,
                        a.chunks_per_shard, a.workers, a.field, a.domain, a.overwrite, progress=not a.quiet)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p, s in sorted(entry["prefixes"].items()):
        print(f"{p}: {s['documents']} documents, {s['tokens']} tokens -> {s['chunks']} chunks of "
              f"{entry['seq_len']} in {len(s['shards'])} shards ({s['dropped_tokens']} tail tokens dropped)")
    print(f"done in {entry['seconds']} s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
