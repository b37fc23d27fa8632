"""Reading text documents: JSON Lines files (plain, .gz, .xz, .zst) and folders of them, one place for all."""
from __future__ import annotations

import gzip
import io
import json
import lzma
from pathlib import Path
from typing import Iterator, List, Union

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".jsonl.xz", ".jsonl.zst", ".jsonl.zstd", ".txt")


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError as e:
            raise ImportError(f"{path}: reading .zst needs the 'zstandard' package (pip install zstandard)") from e
        fh = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8")
    return open(path, "rt", encoding="utf-8")


def list_text_files(source: Union[str, Path]) -> List[Path]:
    """A file, or every JSONL-like file below a folder (sorted)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"no .jsonl/.jsonl.gz/.jsonl.xz/.jsonl.zst/.txt files under {source}")
        return files
    raise FileNotFoundError(f"data source not found: {source}")


def iter_texts(path: Union[str, Path], field: str = "text") -> Iterator[str]:
    """Documents of one file: the ``field`` of every JSON line (a .txt file is one document)."""
    path = Path(path)
    if path.name.endswith(".txt"):
        with _open_text(path) as f:
            yield f.read()
        return
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if field not in record:
                raise ValueError(f"{path}:{lineno}: no {field!r} field; fields present: {sorted(record)[:8]}")
            yield record[field]
