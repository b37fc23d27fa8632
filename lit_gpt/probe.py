"""Probe inputs for the sink metric, built here and nowhere else: natural text, uniformly random tokens, one
repeated token (paper §3), and the probe of a training run.

* The paper's three inputs: :func:`probe_inputs` (over :func:`natural_tokens`, :func:`random_tokens`,
  :func:`repeated_tokens`); random and repeated inputs have no BOS in front. :func:`hf_probe_tokens` is the same
  for a Hugging Face model and its tokenizer (eval_sink_open_source.py, eval_activations_open_source.py).
* The probe of a training run: :func:`make_probe` (``probe.source``: a text file, ``shards`` or ``auto``, via
  :func:`probe_tokens`) gives natural rows; :func:`probe_view` turns them into what the model is fed, following
  the seed's ``pretrain/eval_sink_pretrain.py``: the run's fixed token is put in place in the inputs (its
  ``--mode fix``), random-token runs are probed on the natural text (its ``--mode base``), and the targets are
  the natural next tokens. Training, eval_sink.py and :func:`lit_gpt.evaluate.sink_on_probe` go through it.

The natural-text probe is a JSONL file of held-out text excerpts (``{"text": ...}`` per line); every model
tokenises it itself and keeps the first T tokens. :func:`build_probe_jsonl` makes it from held-out documents
(by default the validation files of ../shared/corpus).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple, Union

import torch

from lit_gpt.data import DataError
from lit_gpt.textio import iter_texts, list_text_files
from lit_gpt.utils import atomic_write_text, invalid_choice

if TYPE_CHECKING:
    from lit_gpt.data import RunData
    from lit_gpt.run_config import RunConfig

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


# ---------------------------------------------------------------------------- the paper's three inputs
def probe_inputs(kind: str, n: int, T: int, *, encode: Optional[Callable[[str], List[int]]] = None,
                 texts: Optional[Sequence[str]] = None, vocab_size: Optional[int] = None,
                 prefix: Sequence[int] = (), exclude: Sequence[int] = (), seed: int = 0,
                 repeat_token: Optional[int] = None) -> torch.Tensor:
    """(n, T) token ids for one of the paper's three inputs (§3).

    natural:  ``encode(text)`` (which adds BOS if the tokenizer does) truncated to T; needs ``texts``.
    random:   T uniformly random ids in [0, vocab_size) without the ``exclude`` ids (pass the special ids).
    repeated: one token repeated T times; ``repeat_token`` for all samples, or (None) a different random
              non-excluded token per sample, drawn with ``seed``.
    The paper's random and repeated inputs have nothing in front of them (no BOS), which is the default here
    and what :func:`hf_probe_tokens` feeds Hugging Face models. ``prefix`` (e.g. ``[bos]``) puts ids
    before the random / repeated tokens for callers that want to measure that other input on purpose; it is not
    the paper's input (a different first token brings the sink back on a repeated input).
    """
    if kind == "natural":
        if encode is None or texts is None:
            raise ValueError("input 'natural' needs encode= and texts=")
        if len(texts) < n:
            raise ValueError(f"the probe file holds {len(texts)} texts; n={n} requested")
        return natural_tokens(encode, list(texts)[:n], T=T)
    if kind in ("random", "repeated") and vocab_size is None:
        raise ValueError(f"input {kind!r} needs vocab_size=")
    if kind == "random":
        return random_tokens(n, T, vocab_size, seed=seed, prefix=prefix, exclude=exclude)
    if kind == "repeated":
        if repeat_token is not None:
            if not 0 <= repeat_token < vocab_size:
                raise ValueError(invalid_choice("repeat_token", repeat_token, f"0..{vocab_size - 1}"))
            return repeated_tokens(n, T, repeat_token, prefix=prefix)
        picks = random_tokens(n, 1, vocab_size, seed=seed + 1, exclude=exclude)[:, 0]
        return torch.cat([repeated_tokens(1, T, int(t), prefix=prefix) for t in picks], dim=0)
    raise ValueError(invalid_choice("input", kind, INPUT_KINDS))


INPUT_KINDS = ("natural", "random", "repeated")


def hf_probe_tokens(model, tokenizer, kind: str, n: int, T: int, texts: Optional[Sequence[str]] = None,
                    seed: int = 0, repeat_token: Optional[int] = None, prefix: Sequence[int] = ()) -> torch.Tensor:
    """(n, T) inputs of one kind for a Hugging Face model, as the paper feeds them (§3).

    natural: each text as the tokenizer encodes it by default, so BOS stays where the tokenizer adds one
    (Llama-2/3, Mistral, OPT; :func:`lit_gpt.hf.special_prefix` says which ids). random / repeated: T token ids
    with nothing in front — no BOS — drawn from the vocabulary without the tokenizer's special ids. The paper's
    proof that the repeated-token sink vanishes under RoPE needs every one of the T positions to hold the same
    token; a BOS in front would be a different first token and would bring the sink back. ``prefix`` puts ids
    before the random / repeated tokens on purpose (the ``--bos-control`` of the open-source drivers, with
    :func:`lit_gpt.hf.special_prefix`): a control, not the paper's input."""
    from lit_gpt.hf import text_config

    vocab = min(len(tokenizer), int(text_config(model).vocab_size))
    return probe_inputs(kind, n, T, encode=lambda t: tokenizer(t, add_special_tokens=True)["input_ids"],
                        texts=texts, vocab_size=vocab,
                        exclude=[i for i in tokenizer.all_special_ids if i is not None], seed=seed,
                        repeat_token=repeat_token, prefix=prefix)


# ---------------------------------------------------------------------------- the probe of a training run
def probe_tokens(source: str, n: int, T: int, tokenizer=None, valid_set=None) -> Tuple[torch.Tensor, str]:
    """``(n, T + 1)`` natural probe rows and a description of where they came from.

    source: a JSONL file of held-out texts (the first T+1 tokens of each, no BOS), ``"shards"`` (evenly spaced
    held-out chunks of the validation shards, via ``valid_set.rows``), or ``"auto"``: the default natural
    probe ``datasets/probe_valid_natural.jsonl`` (built from ../shared/corpus validation files when present),
    else ``"shards"``. The rows are untransformed: :func:`probe_view` applies the run's probe transforms.
    """
    if source == "auto":
        natural = tokenizer is not None and (DEFAULT_PROBE.is_file() or default_probe_sources())
        source = str(DEFAULT_PROBE) if natural else "shards"
    if source == "shards":
        if valid_set is None:
            raise ValueError("probe.source=shards needs validation shards (data.valid)")
        return valid_set.rows(n, T + 1), f"{n} held-out chunks of the validation shards"
    if tokenizer is None:
        raise ValueError(f"probe.source={source!r} is a text file: set data.tokenizer to tokenise it")
    texts = load_probe_texts(source)
    if len(texts) < n:
        raise ValueError(f"probe file {source} has {len(texts)} texts; probe.n={n} are needed")
    return natural_tokens(tokenizer.encode, texts[:n], T=T + 1), f"{n} texts of {source}"


def make_probe(cfg: "RunConfig", rd: "RunData", source: Optional[str] = None) -> Tuple[torch.Tensor, str]:
    """:func:`probe_tokens` of a run: its ``probe`` section (``source`` overrides ``probe.source``) over its data
    (:func:`lit_gpt.data.open_run_data`); a bad source is a :class:`lit_gpt.data.DataError` naming it."""
    p = cfg.probe
    try:
        return probe_tokens(source or p.source, p.n, p.T, rd.tokenizer, rd.valid_set)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(f"probe.source={source or p.source!r}: {e}") from e


def probe_view(rows: torch.Tensor, transforms: Sequence = (), has_targets: bool = True
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(inputs, targets)`` of probe rows as the seed's ``pretrain/eval_sink_pretrain.py`` feeds a run's model.

    rows: ``(n, T + 1)`` natural-text ids when ``has_targets`` (inputs ``[:, :T]``, targets ``[:, 1:]``), else
    ``(n, T)`` inputs and ``targets = None``. transforms: the run's data transforms
    (:func:`lit_gpt.data.make_transforms`); those with ``on_probe`` are applied to the inputs only. That is the
    fixed token: the seed sets ``inputs[:, fix_position] = 1`` after slicing, so its labels stay the natural next
    tokens. Random tokens are not applied: the seed evaluates random-token runs with ``--mode base`` on the
    natural-text probe. The result never aliases ``rows``.
    """
    if rows.dim() != 2:
        raise ValueError(f"probe rows must be (n, T) or (n, T+1), got shape {tuple(rows.shape)}")
    T = rows.shape[1] - int(has_targets)
    inputs = rows[:, :T].clone()
    for t in transforms:
        if getattr(t, "on_probe", False):
            inputs = torch.as_tensor(t(inputs.numpy(), keys=range(len(inputs))))
    return inputs, (rows[:, 1:].clone() if has_targets else None)


def probe_transform_names(transforms: Sequence) -> list:
    """The transforms :func:`probe_view` applies, for the records ("FixedToken(position=1, token_id=1)")."""
    return [repr(t) for t in transforms if getattr(t, "on_probe", False)]


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
