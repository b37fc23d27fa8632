"""What the streaming scripts share: loading a model behind a runner (our GPT or Hugging Face), building long
token streams (books from the shared corpus, a model's own sampled stories, a text file), passkey prompts,
the method options every streaming script shares (:func:`add_method_args`, one set of defaults) and the
methods they build, and the log-PPL plot.

Model sources (:func:`load_lm`):
* a folder with a llama2.c ``*.bin`` + ``tok*.bin`` (e.g. ../shared/models/stories260K);
* a lit_gpt checkpoint (a checkpoint folder or a run folder) with ``--tokenizer`` (anything lit_gpt.tokenizer
  reads; default: the tokenizer the checkpoint's run names);
* a Hugging Face folder (config.json), a ``.gguf`` file (dequantised by transformers), or a Hub repo id.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from lit_gpt.generate import GPTRunner, stream_generate
from lit_gpt.streaming import StreamingSpec
from lit_gpt.utils import atomic_write_text, invalid_choice


# ---------------------------------------------------------------------------- models
class HFTokenizer:
    """transformers tokenizer behind the ``encode(text, bos) / decode(ids)`` interface of lit_gpt tokenizers."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self.tok(text, add_special_tokens=False).input_ids
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token; drop --bos")
            ids = [self.bos_id] + ids
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids))

    def chat(self, messages: List[Dict[str, str]]) -> List[int]:
        """Token ids of a chat prompt via the tokenizer's chat template (generation prompt appended)."""
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@dataclass
class LoadedLM:
    runner: Any                   # GPTRunner or HFRunner
    tokenizer: Any                # encode(text, bos) / decode(ids) / bos_id / eos_id
    name: str
    train_window: Optional[int]   # the context the model was trained with (block_size / max_position_embeddings)


def check_hf_methods(config, methods: Sequence[str]) -> None:
    """Refuse, from a Hugging Face config alone (before the weights load), methods the model cannot stream
    (one line; dense attention and recomputation run on any causal LM)."""
    from lit_gpt.hf_streaming import check_spec, streaming_support

    specs = [make_method(m, cache_size=2, start_size=1).spec for m in methods]
    specs = [s for s in specs if s is not None]
    if not specs:
        return
    try:
        support = streaming_support(config)
        for spec in specs:
            check_spec(support, spec)
    except ValueError as e:
        raise ValueError(f"{e}; --methods dense, recompute run on any causal LM") from None


def load_lm(source: str, *, tokenizer: Optional[str] = None, dtype: str = "float32",
            device: str = "cpu", methods: Sequence[str] = ()) -> LoadedLM:
    """A model behind a runner. For a Hugging Face source the config is read first and ``methods`` (names of
    :data:`METHODS`) it cannot stream are refused before the weights load."""
    from lit_gpt.utils import parse_dtype

    dt = parse_dtype(dtype)
    path = Path(source).expanduser()
    if path.is_dir() and list(path.glob("tok*.bin")):
        from lit_gpt.llama2c import load_llama2c_folder

        model, tok = load_llama2c_folder(path, dt)
        model.to(device)
        return LoadedLM(GPTRunner(model), tok, path.name, model.config.block_size)
    from lit_gpt.checkpoint import checkpoint_tokenizer, is_checkpoint, load_model

    if is_checkpoint(path):
        from lit_gpt.tokenizer import Tokenizer

        model, payload = load_model(path, device=device, dtype=dt)
        tok_src = tokenizer or checkpoint_tokenizer(payload)
        if tok_src is None:
            raise ValueError(f"{source}: give --tokenizer (the checkpoint does not name one)")
        return LoadedLM(GPTRunner(model), Tokenizer(tok_src), path.stem, model.config.block_size)
    from lit_gpt.hf import load_hf, load_hf_config
    from lit_gpt.hf_streaming import HFRunner

    config = load_hf_config(source)
    check_hf_methods(config, methods)
    model, tok = load_hf(source, dtype=dt, device=device, config=config)
    if tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = model.config
    window = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "seq_length", None)
    return LoadedLM(HFRunner(model), HFTokenizer(tok), path.stem if path.exists() else source, window)


def add_model_args(ap) -> None:
    """--model/--tokenizer/--dtype/--device/--threads, shared by the streaming scripts."""
    ap.add_argument("--model", required=True, help="llama2.c folder, lit_gpt checkpoint, HF folder / .gguf / hub id")
    ap.add_argument("--tokenizer", default=None, help="for lit_gpt checkpoints (or to override an HF tokenizer)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def lm_from_args(args, methods: Sequence[str] = ()) -> LoadedLM:
    """The model of the command line; a ValueError (a refused method, a bad path) ends the script in one line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return load_lm(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, methods=methods)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# ---------------------------------------------------------------------------- methods
METHODS = ("dense", "window", "sink", "sink_original", "lminfinite", "recompute")
# The one set of defaults of the streaming scripts' method options (add_method_args):
CACHE_SIZE = 256     # keys each query attends to, sinks included (StreamingLLM's 4 + 252 style budgets)
START_SIZE = 4       # StreamingLLM's 4 attention sinks (also LM-Infinite's n_global unless --lminf-global)
CHUNK = 256          # tokens per forward when a known sequence is fed (any chunk gives the token-by-token result)
TOPK_FROM_LAYER = 4  # LM-Infinite's top-k middle tokens from this layer on, 0-based (the paper's k=5 from layer 4)


@dataclass
class Method:
    """One way to attend over a long stream. ``spec`` None with name 'dense' = never-wrapping ring."""
    name: str
    label: str
    spec: Optional[StreamingSpec] = None
    window: int = 0                 # recompute
    stride: int = 1


def make_method(name: str, *, cache_size: int, start_size: int = START_SIZE, lminf_global: Optional[int] = None,
                lminf_local: Optional[int] = None, lminf_ceiling: Optional[int] = None, topk: int = 0,
                topk_from_layer: int = TOPK_FROM_LAYER, topk_insert_at: Optional[int] = None,
                stride: int = 1) -> Method:
    if name == "dense":
        return Method(name, "dense")
    if name == "window":
        return Method(name, f"window {cache_size}", StreamingSpec(0, cache_size))
    if name in ("sink", "sink_original"):
        if start_size >= cache_size:
            raise ValueError(invalid_choice("--start-size", start_size, f"fewer than --cache-size={cache_size}"))
        pol = "reindex" if name == "sink" else "original"
        label = f"{start_size} sinks + {cache_size - start_size}" + (" (original pos.)" if pol == "original" else "")
        return Method(name, label, StreamingSpec(start_size, cache_size - start_size, pol))
    if name == "lminfinite":
        g = start_size if lminf_global is None else lminf_global
        local = lminf_local or cache_size - g          # the same key budget as sinks + window
        L = lminf_ceiling or local
        spec = StreamingSpec(g, local, "lminfinite", max_distance=L, topk=topk, topk_from_layer=topk_from_layer,
                             topk_insert_at=topk_insert_at)
        label = f"LM-Infinite {g} + {local}, L={L}" + (f", top-{topk} at {spec.insert_at}" if topk else "")
        return Method(name, label, spec)
    if name == "recompute":
        return Method(name, f"recompute {cache_size} (stride {stride})", window=cache_size, stride=stride)
    raise ValueError(invalid_choice("method", name, METHODS))


def method_names(allowed: Sequence[str], *, single: bool = False):
    """argparse ``type`` of ``--methods`` (comma-separated; a list) or ``--method`` (``single``; a list of one):
    every name must be one of ``allowed`` (one-line error with the closest names)."""
    def parse(text: str) -> List[str]:
        names = [m.strip() for m in text.split(",") if m.strip()]
        if single and len(names) != 1:
            raise argparse.ArgumentTypeError(invalid_choice("method", text, f"one of {', '.join(allowed)}"))
        for m in names:
            if m not in allowed:
                raise argparse.ArgumentTypeError(invalid_choice("method", m, allowed))
        if not names:
            raise argparse.ArgumentTypeError(f"no method given; allowed: {', '.join(allowed)}")
        return names
    return parse


def add_method_args(ap, *, allowed: Sequence[str] = METHODS, methods: str = "dense,window,sink,recompute",
                    single: bool = False, cache_size: Optional[int] = CACHE_SIZE) -> None:
    """The streaming scripts' one set of method options, with one set of defaults (:data:`CACHE_SIZE`,
    :data:`START_SIZE`, :data:`CHUNK`, :data:`TOPK_FROM_LAYER`); :meth:`MethodArgs.from_args` reads them back.

    * ``allowed``: the methods this script offers; ``methods``: the ones it runs by default (comma-separated).
    * ``single``: one ``--method NAME`` (a generation session) instead of ``--methods A,B,...``.
    * ``cache_size``: the ``--cache-size`` default. ``None`` means "the model's training window" and is for a
      script that sizes each cache to the window itself (eval_passkey.py, as LM-Infinite's passkey runs do);
      it must then call :meth:`MethodArgs.with_cache_size`.

    The LM-Infinite options (--lminf-*, --topk*) are added when ``lminfinite`` is allowed, ``--stride`` when
    ``recompute`` is."""
    if single:
        ap.add_argument("--method", dest="methods", default=[methods], type=method_names(allowed, single=True),
                        metavar="NAME", help=f"attention over the stream, one of {', '.join(allowed)} "
                                             f"(default: {methods})")
    else:
        ap.add_argument("--methods", default=method_names(allowed)(methods), type=method_names(allowed),
                        metavar="A,B,...", help=f"comma-separated, of {', '.join(allowed)} (default: {methods})")
    default = f"{cache_size}" if cache_size else "the model's training window"
    ap.add_argument("--cache-size", type=int, default=cache_size,
                    help="keys each query attends to, sinks included" + (
                        " (recompute: the re-encoded window)" if "recompute" in allowed else "") +
                         f" (default: {default})")
    ap.add_argument("--start-size", type=int, default=START_SIZE,
                    help=f"attention sinks kept at the front of the cache (default: {START_SIZE})")
    ap.add_argument("--chunk", type=int, default=CHUNK,
                    help="tokens per forward when a known sequence is fed (the stream, a prompt); any chunk gives "
                         f"the token-by-token result, 1 = token by token (default: {CHUNK})")
    if "recompute" in allowed:
        ap.add_argument("--stride", type=int, default=1,
                        help="recompute: targets scored per re-encoded window (default: 1)")
    if "lminfinite" in allowed:
        ap.add_argument("--lminf-global", type=int, default=None,
                        help="LM-Infinite n_global (default: --start-size)")
        ap.add_argument("--lminf-local", type=int, default=None,
                        help="LM-Infinite n_local (default: --cache-size minus n_global)")
        ap.add_argument("--lminf-ceiling", type=int, default=None,
                        help="LM-Infinite L_pretrain, its distance ceiling (default: n_local)")
        ap.add_argument("--topk", type=int, default=0,
                        help="LM-Infinite top-k middle tokens per query and head (default: 0 = off)")
        ap.add_argument("--topk-from-layer", type=int, default=TOPK_FROM_LAYER,
                        help=f"top-k in layers with index >= this, 0-based (default: {TOPK_FROM_LAYER})")
        ap.add_argument("--topk-insert-at", type=int, default=None,
                        help="distance at which the top-k tokens are scored and attended (LM-Infinite's "
                             "top_k_insert_at; default: L_pretrain // 2, the LM-Infinite ceiling halved)")


@dataclass
class MethodArgs:
    """The parsed method options of :func:`add_method_args`; :meth:`make` builds a :class:`Method` from them."""
    names: List[str]
    cache_size: Optional[int] = CACHE_SIZE
    start_size: int = START_SIZE
    chunk: int = CHUNK
    stride: int = 1
    lminf_global: Optional[int] = None
    lminf_local: Optional[int] = None
    lminf_ceiling: Optional[int] = None
    topk: int = 0
    topk_from_layer: int = TOPK_FROM_LAYER
    topk_insert_at: Optional[int] = None

    @classmethod
    def from_args(cls, args) -> "MethodArgs":
        names = {f.name for f in fields(cls)} - {"names"}
        return cls(names=list(args.methods), **{k: getattr(args, k) for k in names if hasattr(args, k)})

    def with_cache_size(self, cache_size: int) -> "MethodArgs":
        """These options with ``cache_size`` filled in where none was given (``--cache-size`` default None)."""
        return self if self.cache_size else replace(self, cache_size=cache_size)

    def make(self, name: Optional[str] = None, **overrides) -> Method:
        """The :class:`Method` ``name`` (default: the first given) with these options; ``overrides`` (e.g.
        ``cache_size``, ``start_size`` of an ablation) replace single options."""
        if self.cache_size is None and "cache_size" not in overrides:
            raise ValueError("--cache-size is unset: call with_cache_size(the training window) first")
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("names", "chunk")}
        return make_method(name or self.names[0], **dict(kw, **overrides))

    def methods(self) -> List[Method]:
        return [self.make(m) for m in self.names]


# ---------------------------------------------------------------------------- token streams
def shared_dir() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared"


def book_stream(tokenizer, n_tokens: int, files: Sequence[Path], *, skip_books: int = 0, bos: bool = False,
                min_chars: int = 20000) -> Tuple[List[int], List[str]]:
    """The first ``n_tokens`` of books concatenated (blank line between books), books shorter than
    ``min_chars`` skipped. Returns (tokens, titles used)."""
    from lit_gpt.textio import iter_texts

    ids: List[int] = [tokenizer.bos_id] if bos else []
    titles: List[str] = []
    seen = 0
    for f in files:
        for i, text in enumerate(iter_texts(f)):
            if len(text) < min_chars:
                continue
            seen += 1
            if seen <= skip_books:
                continue
            titles.append(f"{f.name}#{i}")
            ids += tokenizer.encode(text if len(ids) <= int(bos) else "\n\n" + text)
            if len(ids) >= n_tokens:
                return ids[:n_tokens], titles
    raise ValueError(f"only {len(ids)} tokens in {[str(f) for f in files]}; asked for {n_tokens}")


def sampled_stream(lm: LoadedLM, n_tokens: int, *, seed: int = 0, temperature: float = 1.0,
                   max_story: Optional[int] = None) -> Tuple[List[int], int]:
    """The model's own stories (each sampled from BOS with dense attention until it emits BOS/EOS or fills its
    window), concatenated after one BOS. Returns (tokens, number of stories)."""
    tok = lm.tokenizer
    stop = {t for t in (tok.bos_id, tok.eos_id) if t is not None}
    limit = max_story or lm.train_window or 512
    ids, n, k = [tok.bos_id], 0, 0
    while len(ids) < n_tokens:
        out = stream_generate(lm.runner, [[tok.bos_id]], None, limit - 1, temperature=temperature, seed=seed + k,
                              eos_id=tok.bos_id)[0]
        k += 1
        story = [t for t in out if t not in stop]
        if len(story) < 8:
            continue
        ids += story
        n += 1
    return ids[:n_tokens], n


# ---------------------------------------------------------------------------- passkey retrieval
# LM-Infinite's passkey task (Glaciohound/LM-Infinite, data/passkey_retrieval/create_passkey_data.py and
# data/get_data.py): the sentences are joined with single spaces and the question is appended with a trailing
# space, so the model's first generated token is the key's first digit.
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_KEY = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is "
PASSKEY_KEY_RANGE = (1, 10_000_000)      # LM-Infinite: numpy randint(1, 10000000), 1 to 7 digits
PASSKEY_NEW_TOKENS = 7                   # LM-Infinite's --max_generation_length for the passkey task


def passkey_text(n_fill: int, insert_at: int, key: int) -> str:
    """The prompt: prefix, ``insert_at`` filler sentences, the key sentence, the other ``n_fill - insert_at``
    fillers, then the question."""
    if not 0 <= insert_at <= n_fill:
        raise ValueError(invalid_choice("insert_at", insert_at, f"0..n_fill={n_fill}"))
    parts = [PASSKEY_PREFIX] + [PASSKEY_FILLER] * insert_at + [PASSKEY_KEY.format(key=key)] + \
        [PASSKEY_FILLER] * (n_fill - insert_at)
    return " ".join(parts) + PASSKEY_QUESTION


def passkey_fillers(tokenizer, n_tokens: int, *, bos: bool = False) -> int:
    """The most filler sentences whose prompt (BOS if asked, prefix, key sentence with a 7-digit key, question)
    is at most ``n_tokens`` tokens. It does not depend on the key, so every sample of a length has the same
    number of slots (as in LM-Infinite)."""
    def length(k: int) -> int:
        return len(tokenizer.encode(passkey_text(k, 0, PASSKEY_KEY_RANGE[1] - 1), bos=bos))

    base = length(0)
    if base >= n_tokens:
        raise ValueError(f"n_tokens={n_tokens} is too short: the passkey prompt without filler has {base} tokens")
    per = max(1, length(1) - base)
    k = (n_tokens - base) // per
    while k > 0 and length(k) > n_tokens:
        k -= 1
    while length(k + 1) <= n_tokens:
        k += 1
    return k


def passkey_prompt(tokenizer, n_fill: int, insert_at: int, key: int, *, bos: bool = False
                   ) -> Tuple[List[int], int]:
    """(token ids of the whole prompt, token index where the key sentence starts). The text is tokenised in one
    piece, as LM-Infinite does."""
    text = passkey_text(n_fill, insert_at, key)
    ids = tokenizer.encode(text, bos=bos)
    head = text[: text.index(PASSKEY_KEY.format(key=key))]
    return ids, len(tokenizer.encode(head.rstrip(" "), bos=bos))


def draw_passkeys(length: int, samples: int, n_fill: int, seed: int = 0,
                  depths: Optional[Sequence[float]] = None) -> List[Tuple[int, int]]:
    """(key, insert_at) pairs for one prompt length, drawn as LM-Infinite draws them: a generator seeded with
    the length (plus ``seed``), then per sample the key uniform in [1, 10^7) and the slot of the key sentence
    uniform among the ``n_fill`` filler positions (numpy ``randint(0, n_fill)``). With ``depths`` (fractions
    of the filler) the slots are that grid instead, ``samples`` keys at each depth (not LM-Infinite's draw)."""
    import numpy as np

    if samples < 1:
        raise ValueError(invalid_choice("samples", samples, ">= 1"))
    rng = np.random.RandomState(seed=length + seed)
    out = []
    if depths is None:
        for _ in range(samples):
            key = int(rng.randint(*PASSKEY_KEY_RANGE))
            out.append((key, int(rng.randint(0, max(1, n_fill)))))
        return out
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(invalid_choice("depth", d, "a fraction in [0, 1]"))
        for _ in range(samples):
            out.append((int(rng.randint(*PASSKEY_KEY_RANGE)), round(d * n_fill)))
    return out


def parse_passkey(text: str) -> Optional[int]:
    """The first whole integer of the answer (LM-Infinite's passkey_retrieval_accuracy: ``re.findall(r'\\d+')[0]``),
    None without one: "123456" is 123456, never a match for the key 12345."""
    m = re.search(r"\d+", text)
    return int(m.group(0)) if m else None


# ---------------------------------------------------------------------------- output
def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def rolling_mean(x: torch.Tensor, width: int) -> torch.Tensor:
    """Mean over the last ``width`` values at each position (shorter at the start), NaN-free input."""
    c = torch.cat([x.new_zeros(1), x.cumsum(0)])
    idx = torch.arange(1, len(x) + 1)
    lo = (idx - width).clamp(min=0)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_log_ppl(path: Path, curves: Dict[str, torch.Tensor], *, width: int = 64, title: str = "",
                 markers: Sequence[Tuple[int, str]] = (), reference: Optional[str] = None) -> None:
    """log-PPL (rolling mean NLL over ``width`` tokens) vs position, one line per method; with ``reference``
    (a key of ``curves``) a second panel shows each method's rolling NLL minus the reference's. A small PNG."""
    from lit_gpt.plots import _plt, _save

    plt = _plt()
    panels = 2 if reference in curves else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7.5, 2.4 + 1.9 * panels), dpi=110, sharex=True, squeeze=False)
    ref = rolling_mean(curves[reference].double(), width) if panels == 2 else None
    for label, nll in curves.items():
        x = torch.arange(1, len(nll) + 1).numpy()
        r = rolling_mean(nll.double(), width)
        axes[0, 0].plot(x, r.numpy(), lw=1.0, label=label)
        if ref is not None:
            axes[1, 0].plot(x, (r - ref).numpy(), lw=1.0, label=label)
    axes[0, 0].set_ylabel(f"log PPL\n(mean NLL, last {width})")
    if ref is not None:
        axes[1, 0].set_ylabel(f"minus {reference}\n(nats/token)")
        axes[1, 0].axhline(0.0, color="black", lw=0.6)
    for ax in axes[:, 0]:
        for pos, _text in markers:
            ax.axvline(pos, color="grey", lw=0.7, ls="--")
        ax.grid(alpha=0.3)
    for i, (pos, text) in enumerate(markers):
        axes[0, 0].text(pos, 1.0 + 0.07 * i, f" {text}", va="bottom", fontsize=7, color="grey",
                        transform=axes[0, 0].get_xaxis_transform())
    axes[-1, 0].set_xlabel("position (tokens)")
    axes[0, 0].set_title(title, fontsize=9, pad=12)
    axes[0, 0].legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    _save(fig, path)


def markdown_table(rows: List[Dict[str, Any]], cols: Sequence[Tuple[str, str]]) -> str:
    head = "| " + " | ".join(h for _, h in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep] + body)
