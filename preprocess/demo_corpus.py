"""Build the offline CPU demo's packed corpus from what this machine has.

* With ``../shared`` (next to the repository): its held-out Gutenberg and Wikipedia files
  (``corpus/*-val.jsonl.xz``, ~20M characters), with the GPT-NeoX tokenizer (``--tokenizer auto``) or the
  built-in byte tokenizer (``--tokenizer bytes``, what the demo uses: a 320-row vocabulary keeps a CPU step cheap).
* ``--source gutenberg``: the first books of ``../shared/corpus/gutenberg-train-00.jsonl.xz`` (the GPU regime's
  shard), whole documents until ``--max_chars`` (default 20M) characters, held out: the first books of
  ``gutenberg-val.jsonl.xz`` (1/20 of that), with the byte tokenizer: natural text for the second CPU regime
  (configs/repro/cpu2/, docs/repro.md).
* Without it: the docstrings of the Python standard library this interpreter ships (parsed with ``ast``, never
  imported), one document per module, with the byte tokenizer. No network, no download.

Every document goes to the domain ``demo`` (``train_demo`` / ``valid_demo``, 5% held out), so one config
(``configs/demo_cpu.yaml``) trains on either. Prints the tokenizer it chose (the demo script passes it on).

    python -m preprocess.demo_corpus --out datasets/demo_cpu [--source auto|shared|stdlib] [--tokenizer auto|bytes]
    python -m preprocess.demo_corpus --out datasets/demo_cpu_gutenberg --source gutenberg
"""
from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_gpt.probe import SHARED_VALID, shared_dir
from lit_gpt.textio import iter_texts
from lit_gpt.utils import ArgumentParser, atomic_write_text
from preprocess.prepare import PrepareError, prepare


def shared_sources() -> Tuple[List[Path], Optional[Path]]:
    corpus, tok = shared_dir() / "corpus", shared_dir() / "tokenizers" / "gpt-neox-20b"
    files = [corpus / n for n in SHARED_VALID if (corpus / n).is_file()]
    return (files, tok) if files and (tok / "tokenizer.json").is_file() else ([], None)


def stdlib_docstrings(min_chars: int = 400) -> List[str]:
    """One document per standard-library module: its module, class and function docstrings in order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if any(part in ("site-packages", "test", "tests", "idlelib", "lib2to3") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d:
                    parts.append(d.strip())
        text = "\n\n".join(parts)
        if len(text) >= min_chars:
            docs.append(text)
    return docs


def write_docs(path: Path, docs: Sequence[str]) -> str:
    """``docs`` as a JSONL file of {"text": ...} lines (the input of preprocess.prepare); returns its path."""
    atomic_write_text(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


GUTENBERG_SHARD, GUTENBERG_VALID = "gutenberg-train-00.jsonl.xz", "gutenberg-val.jsonl.xz"
SOURCES = ("auto", "shared", "stdlib", "gutenberg")


def gutenberg_slice(max_chars: int, name: str = GUTENBERG_SHARD) -> List[str]:
    """The first documents of a shared Gutenberg file, whole, until their total reaches ``max_chars``."""
    path = shared_dir() / "corpus" / name
    if not path.is_file():
        raise PrepareError(f"--source gutenberg: {path} not found (the shared corpus next to the repository)")
    docs, total = [], 0
    for text in iter_texts(path):
        if total >= max_chars:
            break
        docs.append(text)
        total += len(text)
    return docs


def build(out: str, source: str = "auto", block_size: int = 64, valid_fraction: float = 0.05,
          tokenizer: str = "auto", max_chars: int = 20_000_000) -> dict:
    if source not in SOURCES:
        raise PrepareError(f"source={source!r} is invalid; allowed: {', '.join(SOURCES)}")
    out_dir = Path(out)
    files, tok = shared_sources()
    if source == "gutenberg":
        # train: the first books of the training shard; valid: the first books of the held-out file (1/20 the size)
        docs, held = gutenberg_slice(max_chars), gutenberg_slice(max_chars // 20, GUTENBERG_VALID)
        sources = [write_docs(out_dir / "demo-train.jsonl", docs), write_docs(out_dir / "demo-val.jsonl", held)]
        tokenizer, valid_fraction = "bytes", 0.0
        what = (f"the first {len(docs)} books ({sum(map(len, docs)) / 1e6:.1f}M characters) of {GUTENBERG_SHARD}, "
                f"held out: the first {len(held)} of {GUTENBERG_VALID}")
    elif source == "shared" and not files:
        raise PrepareError(f"--source shared: no {', '.join(SHARED_VALID)} and GPT-NeoX tokenizer under "
                           f"{shared_dir()}")
    elif source in ("auto", "shared") and files:
        sources, what = [str(f) for f in files], f"held-out corpus files of {shared_dir()}"
        tokenizer = str(tok) if tokenizer == "auto" else "bytes"
    else:
        docs = stdlib_docstrings()
        if not docs:
            raise PrepareError(f"no docstrings found under {sysconfig.get_paths()['stdlib']}")
        sources, tokenizer = [write_docs(out_dir / "stdlib_docstrings.jsonl", docs)], "bytes"
        what = f"{len(docs)} standard-library docstring documents"
    entry = prepare(sources, tokenizer, str(out_dir / "packed"), block_size=block_size,
                    split="auto" if source == "gutenberg" else "train", valid_fraction=valid_fraction, domain="demo",
                    overwrite=True, progress=False)
    entry["what"], entry["tokenizer_source"] = what, tokenizer
    atomic_write_text(out_dir / "tokenizer.txt", tokenizer + "\n")
    return entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="datasets/demo_cpu")
    ap.add_argument("--source", default="auto", choices=list(SOURCES))
    ap.add_argument("--max_chars", type=int, default=20_000_000, help="--source gutenberg: size of the slice")
    ap.add_argument("--tokenizer", default="auto", choices=["auto", "bytes"],
                    help="auto: GPT-NeoX with ../shared, bytes otherwise")
    ap.add_argument("--block_size", type=int, default=64)
    ap.add_argument("--valid_fraction", type=float, default=0.05)
    a = ap.parse_args(argv)
    try:
        e = build(a.out, a.source, a.block_size, a.valid_fraction, a.tokenizer, a.max_chars)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    p = e["prefixes"]
    print(f"demo corpus: {e['what']}; tokenizer {e['tokenizer_source']}; "
          f"train {p['train_demo']['tokens'] / 1e6:.2f}M tokens, valid {p['valid_demo']['tokens'] / 1e6:.2f}M tokens "
          f"-> {a.out}/packed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
