"""Probe inputs for the sink metric: natural text, uniformly random tokens, one repeated token (paper §3).

The natural-text probe is a JSONL file of held-out text excerpts (``{"text": ...}`` per line); every model
tokenises it itself and keeps the first T tokens. :func:`build_probe_jsonl` makes it from held-out documents
(by default the validation files of ../shared/corpus).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from lit_gpt.textio import iter_texts, list_text_files
from lit_gpt.utils import atomic_write_text

DEFAULT_PROBE = Path("datasets/probe_valid_natural.jsonl")
SHARED_VALID = ("gutenberg-val.jsonl.xz", "wikipedia-val.jsonl.xz")


def shared_dir() -> Path:
    """../shared next to the repository root."""
    return Path(__file__).resolve().parents[1].parent / "shared"


def default_probe_sources() -> List[Path]:
    corpus = shared_dir() / "corpus"
    return [corpus / n for n in SHARED_VALID if (corpus / n).is_file()]


def build_probe_jsonl(out: Union[str, Path] = DEFAULT_PROBE, sources: Optional[Sequence[Union[str, Path]]] = None,
                      n: int = 100, chars: int = 1200, seed: int = 0) -> Path:
    """Write ``n`` excerpts of ``chars`` characters, each from a different held-out document, starting at a
    paragraph or sentence boundary. Deterministic for a given seed and sources."""
    srcs = [Path(s) for s in (sources or default_probe_sources())]
    if not srcs:
        raise FileNotFoundError("no probe sources: pass sources=... (JSONL files with a 'text' field); the default "
                                f"looks for {', '.join(SHARED_VALID)} under {shared_dir() / 'corpus'}")
    docs: List[str] = []
    for src in srcs:
        for f in list_text_files(src):
            docs.extend(t for t in iter_texts(f) if len(t) >= 2 * chars)
    if len(docs) < n:
        raise ValueError(f"only {len(docs)} documents of >= {2 * chars} characters in {srcs}; need n={n}")
    rng = random.Random(seed)
    picks = rng.sample(range(len(docs)), n)
    lines = []
    for i in picks:
        text = docs[i]
        start = rng.randrange(0, len(text) - chars)
        cut = text.find("\n", start)
        if cut < 0 or cut > start + chars // 2:
            cut = text.find(". ", start)
            cut = start if cut < 0 or cut > start + chars // 2 else cut + 2
        else:
            cut += 1
        lines.append(json.dumps({"text": text[cut:cut + chars].strip()}, ensure_ascii=False))
    out = Path(out)
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def load_probe_texts(path: Union[str, Path] = DEFAULT_PROBE, n: Optional[int] = None) -> List[str]:
    path = Path(path)
    if not path.is_file():
        if path == DEFAULT_PROBE and default_probe_sources():
            build_probe_jsonl(path)
        else:
            raise FileNotFoundError(f"probe file not found: {path} (make one with "
                                    "`python -m lit_gpt.probe --out {path} --sources <held-out jsonl>`)")
    texts = list(iter_texts(path))
    return texts[:n] if n else texts


def natural_tokens(encode: Callable[[str], List[int]], texts: Sequence[str], T: int = 64,
                   prefix: Sequence[int] = ()) -> torch.Tensor:
    """(n, T) token ids: ``prefix`` (e.g. BOS) + the first tokens of each text; texts too short are an error."""
    rows = []
    for i, t in enumerate(texts):
        ids = list(prefix) + list(encode(t))
        if len(ids) < T:
            raise ValueError(f"probe text {i} has only {len(ids)} tokens < T={T}; use longer excerpts")
        rows.append(ids[:T])
    return torch.tensor(rows, dtype=torch.long)


def random_tokens(n: int, T: int, vocab_size: int, seed: int = 0, prefix: Sequence[int] = (),
                  exclude: Sequence[int] = ()) -> torch.Tensor:
    """Ids drawn uniformly from [0, vocab_size) without the ``exclude`` ids (e.g. the special ids), after an
    optional prefix: each id is an index into the allowed ids, so no excluded id can appear."""
    banned = {int(t) for t in exclude}
    allowed = torch.tensor([i for i in range(vocab_size) if i not in banned], dtype=torch.long)
    if len(allowed) == 0:
        raise ValueError(f"exclude={sorted(banned)} removes every id of vocab_size={vocab_size}")
    g = torch.Generator().manual_seed(seed)
    body = allowed[torch.randint(0, len(allowed), (n, T - len(prefix)), generator=g)]
    head = torch.tensor(list(prefix), dtype=torch.long).expand(n, len(prefix))
    return torch.cat([head, body], dim=1)


def repeated_tokens(n: int, T: int, token: int, prefix: Sequence[int] = ()) -> torch.Tensor:
    """One token repeated (the paper's case where the sink does not form), after an optional prefix."""
    head = torch.tensor(list(prefix), dtype=torch.long).expand(n, len(prefix))
    return torch.cat([head, torch.full((n, T - len(prefix)), token, dtype=torch.long)], dim=1)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Build the natural-text probe file from held-out JSONL documents.")
    ap.add_argument("--out", default=str(DEFAULT_PROBE))
    ap.add_argument("--sources", nargs="*", default=None, help="JSONL files/folders (default: ../shared validation)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--chars", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build_probe_jsonl(a.out, a.sources, a.n, a.chars, a.seed))
