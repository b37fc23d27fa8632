"""Generation and scoring drivers over a streaming runner: our GPT's :class:`GPTRunner` (or Hugging Face's
``lit_gpt.hf_streaming.HFRunner``, the same interface), CUDA-graph decoding (:class:`GraphDecoder`), per-token NLL of
a stream (:func:`stream_nll`) and of the sliding-window recomputation baseline (:func:`recompute_nll`), chunked
ragged prefill (:func:`prefill`), multi-turn sessions (:class:`StreamSession`) and :func:`stream_generate`.

The caches and the attention over them live in :mod:`lit_gpt.streaming`; this module only feeds tokens and
positions through a runner and reads logits back.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from lit_gpt.streaming import (
    FEATURE_MAP_OPS, StreamingCache, StreamingSpec, _is_int, dense_spec, install_streaming,
)
from lit_gpt.utils import invalid_choice


# ---------------------------------------------------------------------------- runners
class GPTRunner:
    """Uniform streaming interface over our GPT (the HF counterpart is ``hf_streaming.HFRunner``).

    ``start(batch, spec)`` installs fresh caches (spec None: no cache), ``step(ids, pos)`` runs a chunk at
    positions (B, T) (negative = padding) and returns float logits, ``fresh(ids)`` is a cache-free forward
    from position 0, ``stop()`` removes the caches.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.caches: List[StreamingCache] = []
        self.block_size = model.config.block_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def start(self, batch_size: int, spec: Optional[StreamingSpec]) -> None:
        self.caches = install_streaming(self.model, spec) if spec is not None else []

    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(ids, input_pos=pos)

    def fresh(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)

    def stop(self) -> None:
        self.model.clear_kv_cache()
        self.caches = []

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)


class GraphDecoder:
    """Decoding steps of our GPT over its installed streaming caches, captured once as a CUDA graph and replayed
    for every token: no Python, no host synchronisation and no allocation per token, so the latency stays that of
    the kernels.

    Build it after a prefill of at least ``start_size`` tokens (the sinks are written); ``step(tok, pos)`` with
    tok, pos (B, 1) (positions >= start_size, or -1 for padding) writes the token into every layer's cache and
    returns its logits (B, V): a view that the next step overwrites. ``compile=True`` runs the step through
    ``torch.compile`` first (fewer, fused kernels inside the graph); ``attention``: the softmax of the step
    (:meth:`SinkWindowKV.enter_static`; ``sdpa``, the default, measured faster on an H200 than ``matmul``, see
    benchmarks/README.md). Without CUDA (or ``graph=False``) the same graph-safe step runs eagerly.
    Any chunked call of the model (prefill) may come between steps.
    """

    def __init__(self, model, batch_size: int, *, graph: Optional[bool] = None, compile: bool = False,
                 attention: str = "sdpa") -> None:
        caches = [b.attn.kv_cache for b in model.blocks]
        if not all(isinstance(c, StreamingCache) for c in caches):
            raise ValueError("GraphDecoder needs streaming caches on every layer (install_streaming / GPTRunner.start)")
        cfg = model.config
        if cfg.sink_token or cfg.attn_op in FEATURE_MAP_OPS or caches[0].spec.topk:
            raise ValueError("GraphDecoder supports models without a sink token, with a score-based attention "
                             "operation, and specs without top-k")
        for c in caches:
            c.kv.enter_static(attention)
        device = next(model.parameters()).device
        self.model = model
        self.caches = caches
        self.attention = attention
        self.fn = torch.compile(model, dynamic=False) if compile else model
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.use_graph = device.type == "cuda" if graph is None else graph
        self.graph = None
        self.out: Optional[torch.Tensor] = None

    def _run(self) -> torch.Tensor:
        for c in self.caches:            # several decoders may share the caches: this one's attention (a replay
            c.kv.static_attention = self.attention       # runs the kernels captured with it)
        return self.fn(self.tok, input_pos=self.pos)

    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.tok.copy_(tok.view_as(self.tok))
        self.pos.copy_(pos.view_as(self.pos))
        if not self.use_graph:
            return self._run()[:, -1]
        if self.graph is None:
            # warm-up on a side stream (compilation, lazy allocations), then capture; writing the same token at the
            # same position again leaves the caches as one write does
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._run()
        self.graph.replay()
        return self.out[:, -1]


def chunk_positions(lengths: torch.Tensor, c0: int, c1: int, offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Positions (B, c1 - c0) of columns [c0, c1) for rows of ``lengths`` tokens (-1 past a row's end)."""
    cols = torch.arange(c0, c1, device=lengths.device).unsqueeze(0)
    pos = cols + (0 if offset is None else offset.unsqueeze(1))
    return torch.where(cols < lengths.unsqueeze(1), pos, torch.full_like(pos, -1))


@torch.no_grad()
def stream_nll(runner, tokens: torch.Tensor, spec: Optional[StreamingSpec], *, chunk_size: int = 1,
               lengths: Optional[torch.Tensor] = None, progress: Optional[Callable[[int, int], None]] = None
               ) -> torch.Tensor:
    """Per-token negative log-likelihood (nats) of a stream fed chunk by chunk through a streaming cache.

    tokens (B, n) (rows shorter than n padded on the right, ``lengths`` (B,)); spec None = dense attention
    (a ring that never wraps). Returns (B, n - 1) float64: entry t is -log p(tokens[t + 1] | tokens[:t + 1])
    under the method, NaN past a row's end.
    """
    B, n = tokens.shape
    device = runner.device
    tokens = tokens.to(device)
    lengths = torch.full((B,), n, device=device) if lengths is None else lengths.to(device)
    runner.start(B, spec if spec is not None else dense_spec(n))
    nll = torch.full((B, n - 1), float("nan"), dtype=torch.float64)
    try:
        for c0 in range(0, n, chunk_size):
            c1 = min(n, c0 + chunk_size)
            pos = chunk_positions(lengths, c0, c1)
            logits = runner.step(tokens[:, c0:c1], pos)
            t1 = min(c1, n - 1)
            if t1 > c0:
                lp = torch.log_softmax(_wide(logits[:, : t1 - c0]), dim=-1)
                tgt = tokens[:, c0 + 1: t1 + 1]
                val = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double().cpu()
                ok = (torch.arange(c0 + 1, t1 + 1, device=device).unsqueeze(0) < lengths.unsqueeze(1)).cpu()
                nll[:, c0:t1] = torch.where(ok, val, torch.full_like(val, float("nan")))
            if progress is not None:
                progress(c1, n)
    finally:
        runner.stop()
    return nll


@torch.no_grad()
def recompute_nll(runner, tokens: torch.Tensor, window: int, stride: int = 1,
                  progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Sliding window with recomputation: every prediction sees at most ``window`` tokens, re-encoded from
    scratch at positions 0.. (quadratic). One forward per ``stride`` targets: targets (b - stride, b] come from
    the forward over tokens [b - window, b) (so each sees between window - stride + 1 and window tokens;
    stride 1 is exact recomputation).
    tokens (B, n) -> (B, n - 1) float64 as :func:`stream_nll`."""
    if not _is_int(window) or window < 1:
        raise ValueError(invalid_choice("window", window, "a positive integer"))
    if not _is_int(stride) or not 1 <= stride <= window:
        raise ValueError(invalid_choice("stride", stride, f"an integer in [1, window={window}]"))
    B, n = tokens.shape
    tokens = tokens.to(runner.device)
    nll = torch.full((B, n - 1), float("nan"), dtype=torch.float64)
    runner.stop()
    b, prev = min(window, n - 1), 0
    while True:
        a = max(0, b - window)
        logits = runner.fresh(tokens[:, a:b])
        lo = prev + 1                                             # targets prev+1..b (token index)
        lp = torch.log_softmax(_wide(logits[:, lo - 1 - a: b - a]), dim=-1)
        tgt = tokens[:, lo: b + 1]
        nll[:, lo - 1: b] = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).double().cpu()
        if progress is not None:
            progress(b, n - 1)
        if b >= n - 1:
            break
        prev, b = b, min(b + stride, n - 1)
    return nll


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 for half types; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def process_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class TokenEvent:
    """One decoding step of :func:`stream_generate` (what the progress display and the log receive)."""
    step: int
    tokens: List[int]          # the token chosen for every row
    positions: List[int]       # the position each row's token will take
    latency_s: float
    cache_bytes: int
    rss_bytes: int
    cuda_bytes: int


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, V) -> (B,): greedy for temperature 0, else softmax sampling (optionally from the top k)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def prefill(runner, prompts: Sequence[Sequence[int]], *, chunk_size: int = 256,
            offsets: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Feed ragged prompts (one list per row) chunk by chunk through the installed caches, starting at position
    ``offsets`` (B,) (default 0). Returns (last-token logits (B, V), lengths (B,)); rows with an empty prompt
    get NaN logits."""
    device = runner.device
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    n = int(lengths.max()) if B else 0
    ids = torch.zeros(B, max(n, 1), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, : len(p)] = torch.as_tensor(list(p), device=device)
    last = None
    for c0 in range(0, n, chunk_size):
        c1 = min(n, c0 + chunk_size)
        logits = _wide(runner.step(ids[:, c0:c1], chunk_positions(lengths, c0, c1, offsets)))
        if last is None:
            last = torch.full((B, logits.shape[-1]), float("nan"), device=device, dtype=logits.dtype)
        ends = lengths - 1
        rows = ((ends >= c0) & (ends < c1)).nonzero(as_tuple=True)[0]
        last[rows] = logits[rows, ends[rows] - c0]
    return last, lengths


class StreamSession:
    """A batch of streams that keeps its caches between calls (multi-turn chat, generation past any window).

    ``feed(prompts)`` appends ragged prompts (chunked, sink-aware prefill) to every row at the row's current
    position; ``generate(n)`` samples up to n tokens per row (one step per token, each row at its own position)
    and, with ``feed_last``, feeds the last sampled token so that a later ``feed`` continues the stream.
    """

    def __init__(self, runner, batch_size: int, spec: StreamingSpec, chunk_size: int = 256) -> None:
        self.runner, self.spec, self.chunk_size = runner, spec, chunk_size
        runner.start(batch_size, spec)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=runner.device)
        self.logits: Optional[torch.Tensor] = None
        self._carry_s = 0.0             # prefill time, charged to the next generated token

    @torch.no_grad()
    def feed(self, prompts: Sequence[Sequence[int]]) -> None:
        t0 = time.perf_counter()
        logits, lengths = prefill(self.runner, prompts, chunk_size=self.chunk_size, offsets=self.next_pos)
        self._carry_s += time.perf_counter() - t0
        if self.logits is None:
            self.logits = logits
        else:
            has = lengths > 0
            self.logits[has] = logits[has]
        self.next_pos = self.next_pos + lengths

    @torch.no_grad()
    def generate(self, max_new_tokens: int, *, temperature: float = 0.0, top_k: Optional[int] = None,
                 eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 on_token: Optional[Callable[[TokenEvent], None]] = None, feed_last: bool = False
                 ) -> List[List[int]]:
        if self.logits is None:
            raise RuntimeError("StreamSession.generate needs a prompt: call feed() first")
        runner, device = self.runner, self.runner.device
        B = self.next_pos.shape[0]
        out: List[List[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        logits = self.logits
        t0 = time.perf_counter() - self._carry_s
        self._carry_s = 0.0
        for step in range(max_new_tokens):
            tok = sample_next(logits.cpu(), temperature, top_k, generator).to(device)
            live = ~done                                  # rows still generating (an EOS just sampled is fed)
            for i in range(B):
                if bool(live[i]):
                    out[i].append(int(tok[i]))
            if eos_id is not None:
                done = done | (tok == eos_id)
            if on_token is not None:
                cuda = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
                on_token(TokenEvent(step, tok.tolist(), self.next_pos.tolist(), time.perf_counter() - t0,
                                    runner.cache_bytes(), process_rss_bytes(), cuda))
            last = step == max_new_tokens - 1 or bool(done.all())
            if last and not feed_last:
                break
            t0 = time.perf_counter()
            pos = torch.where(live, self.next_pos, torch.full_like(self.next_pos, -1)).unsqueeze(1)
            logits = _wide(runner.step(tok.unsqueeze(1), pos)[:, -1])
            self.next_pos = self.next_pos + live.long()
            if last:
                break
        self.logits = logits
        return out

    def close(self) -> None:
        self.runner.stop()


@torch.no_grad()
def stream_generate(runner, prompts: Sequence[Sequence[int]], spec: Optional[StreamingSpec],
                    max_new_tokens: int, *, chunk_size: int = 256, temperature: float = 0.0,
                    top_k: Optional[int] = None, eos_id: Optional[int] = None, seed: int = 0,
                    on_token: Optional[Callable[[TokenEvent], None]] = None) -> List[List[int]]:
    """Generate ``max_new_tokens`` for each (ragged) prompt past any window: chunked sink-aware prefill, then
    one token per row per step, every row at its own position. Rows that emit ``eos_id`` stop (they keep
    stepping as padding). ``on_token`` receives a :class:`TokenEvent` per step (latency, cache and process
    memory; step 0's latency is the prefill). spec None = dense attention."""
    if spec is None:
        spec = dense_spec(max(len(p) for p in prompts) + max_new_tokens)
    session = StreamSession(runner, len(prompts), spec, chunk_size)
    try:
        session.feed(prompts)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return session.generate(max_new_tokens, temperature=temperature, top_k=top_k, eos_id=eos_id,
                                generator=gen, on_token=on_token)
    finally:
        session.close()
