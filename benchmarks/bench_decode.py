"""Streaming decoding on the GPU (random weights, bf16): per-token latency along a long stream, memory, sliding-window
recomputation at the same cache size, and the memory-bandwidth floor.

    python benchmarks/bench_decode.py                                    # GPU: tinyllama_60M and tinyllama_1_1b
    python benchmarks/bench_decode.py --models tinyllama_60M --stream 20000 --checkpoints 4
    python benchmarks/bench_decode.py --quick                            # tiny CPU smoke run

One stream per model (batch 1, ``--start`` sinks + a window, ``--cache`` keys in all): the stream advances by chunked
prefill (equal to token-by-token streaming, tests/test_streaming.py) to each checkpoint position, where ``--steps``
greedy decoding steps are timed one by one (CUDA events) through lit_gpt.generate.GraphDecoder: the step captured
as a CUDA graph, with and without torch.compile inside, each with the softmax by SDPA (GraphDecoder's default) and as
matrix products (variants "graph + compile, sdpa", "graph + compile, matmul", "graph, sdpa", "graph, matmul"). At
each checkpoint: median / max latency, allocated memory, cache bytes; at the first, every variant's kernel time by
category (torch.profiler over replays of the graph: ``kernel_breakdown``, DECODE_CATEGORIES) and its top kernels.
Recomputation (StreamingLLM's baseline): one forward over the last ``--cache`` tokens per generated token, timed
eagerly with logits at every position and at its best (last-position logits, cuDNN attention, compiled, CUDA graph:
:func:`recompute_times`; ``--recompute eager``: eagerly only); the ratios use the best. Floor: bytes a step must
read (weights except the embedding table, plus the cache) over the copy bandwidth measured here;
``recompute_over_floor`` is the most any decoding step could gain over the recomputation. Then the same comparison
at ``--batch-large`` streams (eager graph only). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import DECODE_CATEGORIES, kernel_breakdown, measure_copy_bandwidth, print_table, time_fn, write_json
from lit_gpt import GPT, Config
from lit_gpt.attention import set_sdpa_backend
from lit_gpt.generate import GPTRunner, GraphDecoder
from lit_gpt.streaming import STATIC_ATTENTION, StreamingSpec

DEFAULT_ATTENTION = GraphDecoder.__init__.__kwdefaults__["attention"]


def step_bytes(model, cache_bytes: int, batch: int) -> int:
    """Bytes one decoding step reads at least: every weight once (the embedding: one row per stream) + the cache."""
    w = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.wte.weight
    return w - emb.numel() * emb.element_size() + batch * emb.shape[1] * emb.element_size() + cache_bytes


class LastLogits(torch.nn.Module):
    """An LM head applied to the last position only: all that generating the next token needs."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h[:, -1:])


def graphed(fn, device):
    """fn() (fixed inputs) captured as a CUDA graph after a warm-up on a side stream; returns replay (CPU: fn)."""
    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def recompute_times(model, ids: torch.Tensor, device, compile_it: bool) -> dict:
    """Sliding-window recomputation of one token (StreamingLLM's baseline): a forward over the last ``cache`` tokens
    from position 0. ``eager``: the plain forward, logits at every position (what this benchmark timed before);
    ``best``: as fast as we can make it, the same care as our decoding step: logits of the last position only,
    SDPA's fastest causal kernel (cuDNN on Hopper), ``torch.compile`` (GPU), captured as a CUDA graph."""
    out = {"eager_all_logits_ms": round(1e3 * time_fn(lambda: model(ids), device, warmup=2, repeat=5), 3)}
    head = model.lm_head
    model.lm_head = LastLogits(head)
    try:
        out["sdpa_backend"] = set_sdpa_backend("auto")
        fn = torch.compile(model, dynamic=False) if compile_it else model
        static = ids.clone()
        t0 = time.perf_counter()
        try:
            replay = graphed(lambda: fn(static), device)
        except Exception as e:                        # report it, time the compiled forward without a graph
            out["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            replay = lambda: fn(static)                                                   # noqa: E731
        out["best_prepare_s"] = round(time.perf_counter() - t0, 1)
        out["best_ms"] = round(1e3 * time_fn(replay, device, warmup=3, repeat=10), 3)
        out["best"] = ("compiled + " if compile_it else "") + \
            ("CUDA graph, " if device.type == "cuda" and "graph_error" not in out else "") + "last-position logits"
    finally:
        model.lm_head = head
        set_sdpa_backend("default")
    return out


def timed_decode(dec: GraphDecoder, tok: torch.Tensor, pos: int, steps: int, device) -> list:
    """Per-step latencies (ms) of ``steps`` greedy steps from position ``pos``; returns (times, next token)."""
    B = tok.shape[0]
    evs = []
    for i in range(steps):
        a = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        b = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        t0 = time.perf_counter()
        if a is not None:
            a.record()
        logits = dec.step(tok, torch.full((B, 1), pos + i, device=device))
        tok = logits.argmax(-1, keepdim=True)
        if b is not None:
            b.record()
            evs.append((a, b))
        else:
            evs.append(1e3 * (time.perf_counter() - t0))
    if device.type == "cuda":
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in evs], tok
    return evs, tok


@torch.no_grad()
def run_model(name: str, a, device, dtype, bandwidth: float, t_start: float, save=lambda out: None) -> dict:
    """One model's stream; ``save(out)`` after every checkpoint (a command stopped at its limit keeps those)."""
    torch.manual_seed(0)
    cfg = Config.from_name(name)
    with device:
        model = GPT(cfg).to(dtype=dtype).eval()
    V = cfg.vocab_size
    spec = StreamingSpec(a.start, a.cache - a.start)
    out = {"model": name, "params_M": round(model.num_parameters() / 1e6, 1), "cache_keys": a.cache,
           "start_size": a.start, "checkpoints": [], "errors": {}}
    B = 1
    runner = GPTRunner(model)
    runner.start(B, spec)
    stream = torch.randint(0, V, (B, a.stream + a.steps * (a.checkpoints + 2) * 3), device=device)
    pos = 0

    def advance(to: int):
        nonlocal pos
        while pos < to:
            c = min(a.chunk, to - pos)
            runner.step(stream[:, pos:pos + c], torch.arange(pos, pos + c, device=device))
            pos += c

    marks = [max(a.cache, 64)] + [int(a.stream * (i + 1) / a.checkpoints) for i in range(a.checkpoints)]
    advance(marks[0])
    decoders = {}
    # "graph, <attention>": the step as a CUDA graph, its softmax by SDPA's masked kernel (GraphDecoder's default) or
    # as matrix products; "graph + compile, <attention>": torch.compile inside the graph (CPU: the same steps eagerly)
    attentions = [DEFAULT_ATTENTION] + [x for x in STATIC_ATTENTION if x != DEFAULT_ATTENTION]
    kinds = ["graph + compile", "graph"] if device.type == "cuda" and name in a.compile_models else ["graph"]
    if device.type != "cuda":
        kinds = ["eager (no graph on CPU)"]
    variants = [f"{k}, {att}" for k in kinds for att in attentions]
    if len(kinds) == 2:     # the default compiled step first (timed at every position), the other compiled one last
        variants = variants[:1] + variants[2:] + variants[1:2]
    out["variants"] = variants
    for v in variants:
        try:
            decoders[v] = GraphDecoder(model, B, compile=v.startswith("graph + compile"), attention=v.split(", ")[-1])
        except Exception as e:
            out["errors"][v] = f"{type(e).__name__}: {str(e)[:200]}"
    tok = stream[:, pos:pos + 1]
    for ci, P in enumerate(marks):
        advance(P)
        row = {"position": P}
        for v, dec in list(decoders.items()):
            if v != variants[0] and ci not in (0, len(marks) - 1):
                continue                          # the other variants at the first and the last mark only
            try:
                t0 = time.perf_counter()
                if dec.graph is None and dec.use_graph:
                    p1 = torch.full((B, 1), pos, device=device)
                    for c in runner.caches:       # reference: the same step eagerly, SDPA (fp32 softmax inside)
                        c.kv.static_attention = "sdpa"
                    want = model(tok, input_pos=p1)[:, -1].float()
                    got = dec.step(tok, p1).float()                           # compile + capture + replay
                    row[f"{v} capture_s"] = round(time.perf_counter() - t0, 1)
                    row[f"{v} vs eager sdpa step rel diff"] = float((got - want).norm() / want.norm())
                times, tok = timed_decode(dec, tok, pos, a.steps, device)
                pos += a.steps
                times = times[2:]
                row[f"{v} median_ms"] = round(statistics.median(times), 4)
                row[f"{v} max_ms"] = round(max(times), 4)
                if device.type == "cuda" and ci == 0:
                    p1 = torch.full((B, 1), pos, device=device)               # where the step's time goes
                    try:
                        out.setdefault("kernel_breakdown", {})[v] = kernel_breakdown(
                            lambda: dec.step(tok, p1), steps=5, categories=DECODE_CATEGORIES, top=12)
                    except Exception as e:
                        out["errors"][f"kernel_breakdown {v}"] = f"{type(e).__name__}: {str(e)[:200]}"
            except Exception as e:
                out["errors"][v] = f"{type(e).__name__}: {str(e)[:200]}"
                del decoders[v]
            save({**out, "checkpoints": out["checkpoints"] + [row]})     # a compilation may run into the limit
        row["cache_MiB"] = round(runner.cache_bytes() / 2**20, 2)
        if device.type == "cuda":
            row["allocated_MiB"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        out["checkpoints"].append(row)
        print(name, row, flush=True)
        save(out)
        if time.perf_counter() - t_start > a.budget_s:
            out["errors"]["budget"] = f"stopped after position {P} (time budget {a.budget_s} s)"
            break
    cache_bytes = runner.cache_bytes()
    runner.stop()
    del decoders
    try:
        if a.recompute != "best":
            raise RuntimeError("not timed (--recompute eager)")
        out["recompute"] = recompute_times(model, stream[:, :a.cache], device, device.type == "cuda")
    except Exception as e:
        out["errors"]["recompute best"] = f"{type(e).__name__}: {str(e)[:200]}"
        out["recompute"] = {"eager_all_logits_ms": round(1e3 * time_fn(lambda: model(stream[:, :a.cache]), device,
                                                                           warmup=2, repeat=5), 3)}
    rec = out["recompute"]
    recompute = 1e-3 * rec.get("best_ms", rec["eager_all_logits_ms"])
    floor = step_bytes(model, cache_bytes, B) / bandwidth if bandwidth else None
    out.update(recompute_ms=round(1e3 * recompute, 3), floor_ms=round(1e3 * floor, 4) if floor else None,
               step_bytes=step_bytes(model, cache_bytes, B), cache_bytes=cache_bytes)
    if floor:
        # the most a decoding step at the floor could gain over this recomputation
        out["recompute_over_floor"] = round(recompute / floor, 2)
    for v in variants:
        med = [r[f"{v} median_ms"] for r in out["checkpoints"] if f"{v} median_ms" in r]
        mx = [r[f"{v} max_ms"] for r in out["checkpoints"] if f"{v} max_ms" in r]
        if not med:
            continue
        m = statistics.median(med)
        out[v] = {"median_ms": m, "max_of_checkpoint_medians_over_median": round(max(med) / m, 3),
                  "max_token_over_median": round(max(mx) / m, 3),
                  "recompute_over_decode": round(1e3 * recompute / m, 2),
                  "eager_recompute_over_decode": round(rec["eager_all_logits_ms"] / m, 2),
                  "decode_over_floor": round(m / (1e3 * floor), 2) if floor else None}
    alloc = [r["allocated_MiB"] for r in out["checkpoints"] if "allocated_MiB" in r]
    if alloc:
        out["allocated_MiB_min_max"] = [min(alloc), max(alloc)]
    # many streams: recomputation grows with the batch, a memory-bound decoding step hardly does
    if a.batch_large and device.type == "cuda" and time.perf_counter() - t_start < a.budget_s:
        try:
            Bl = a.batch_large
            runner.start(Bl, spec)
            ids = torch.randint(0, V, (Bl, a.cache + 2 * a.steps + 2), device=device)
            for c in range(0, a.cache, a.chunk):
                runner.step(ids[:, c:c + a.chunk], torch.arange(c, min(a.cache, c + a.chunk), device=device))
            dec = GraphDecoder(model, Bl)
            dec.step(ids[:, a.cache:a.cache + 1], torch.full((Bl, 1), a.cache, device=device))
            times, _ = timed_decode(dec, ids[:, a.cache:a.cache + 1], a.cache, a.steps, device)
            m = statistics.median(times[2:])
            runner.stop()
            del dec
            rl = recompute_times(model, ids[:, :a.cache], device, True)
            best = rl.get("best_ms", rl["eager_all_logits_ms"])
            out[f"batch {Bl}"] = {"graph median_ms": round(m, 4), "recompute_ms": best,
                                  "recompute_over_decode": round(best / m, 2), "recompute": rl,
                                  "eager_recompute_over_decode": round(rl["eager_all_logits_ms"] / m, 2)}
            print(name, out[f"batch {Bl}"], flush=True)
        except Exception as e:
            out["errors"][f"batch {a.batch_large}"] = f"{type(e).__name__}: {str(e)[:200]}"
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tinyllama_60M,tinyllama_1_1b")
    ap.add_argument("--compile-models", default="tinyllama_60M,tinyllama_1_1b", help="also time a compiled step")
    ap.add_argument("--stream", type=int, default=100_000)
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--cache", type=int, default=2048)
    ap.add_argument("--start", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--batch-large", type=int, default=16)
    ap.add_argument("--recompute", default="best", choices=["best", "eager"],
                    help="recomputation baseline: also at its best (compiled + graph: seconds of compilation) or eager")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/decode.json")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.quick:
        a.models, a.stream, a.checkpoints, a.steps, a.cache, a.chunk, a.batch_large = "tiny", 600, 2, 6, 64, 64, 0
    bandwidth = measure_copy_bandwidth(device) if device.type == "cuda" else None
    if bandwidth:
        print(f"measured copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    t_start = time.perf_counter()
    results = []
    extra = {"copy_bandwidth_TBps": round(bandwidth / 1e12, 3) if bandwidth else None, "dtype": str(dtype),
             "stream_tokens": a.stream, "default_attention": DEFAULT_ATTENTION}
    for m in a.models.split(","):
        if time.perf_counter() - t_start > a.budget_s:
            results.append({"model": m, "errors": {"budget": "skipped (time budget)"}})
            continue
        results.append(run_model(m, a, device, dtype, bandwidth, t_start,
                                 save=lambda out: write_json(a.out, results + [out], extra)))
        write_json(a.out, results, extra)
    table = []
    for r in results:
        for v in r.get("variants", []):
            if v in r:
                table.append({"model": r["model"], "decode": v, **r[v], "recompute_ms": r["recompute_ms"],
                              "floor_ms": r["floor_ms"], "recompute_over_floor": r.get("recompute_over_floor")})
    print_table(table, ["model", "decode", "median_ms", "max_of_checkpoint_medians_over_median",
                        "max_token_over_median", "recompute_ms", "recompute_over_decode",
                        "eager_recompute_over_decode", "floor_ms", "decode_over_floor", "recompute_over_floor"])
    write_json(a.out, results, extra)


if __name__ == "__main__":
    main()
