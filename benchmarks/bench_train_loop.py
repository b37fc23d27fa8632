"""The real training loop (lit_gpt.trainer.fit, what pretrain.py runs: data loading from packed shards, logging,
validation, Sink_1..k probes) against the bare optimizer step of the same config, in one process (profile mode,
``pretrain.py --profile``). Data: synthetic packed shards of random token ids written to a temporary folder.

    python benchmarks/bench_train_loop.py                                # GPU: tinyllama_60M, micro 16 x 2048, compiled
    python benchmarks/bench_train_loop.py --quick                        # tiny CPU smoke run

Prints the profile table and writes JSON: the loop's tokens/s (as it logs them, and by the wall clock with the
evaluation and probes included), the bare step's, their ratios, and the phase times.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common import print_table, write_json
from lit_gpt.packed import write_shard
from lit_gpt.run_config import from_dict
from lit_gpt.trainer import fit


def synthetic_shards(folder: Path, seq_len: int, vocab: int, n_train: int, n_valid: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    meta = {"vocab_size": vocab, "tokenizer": {"name": "random-ids", "fingerprint": "random-ids"}}
    for name, n in (("train_synth", n_train), ("valid_synth", n_valid)):
        write_shard(folder / f"{name}-f0000-00000.bin", rng.integers(0, vocab, (n, seq_len)), dict(meta, domain=name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tinyllama_60M")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--compile-scope", default="auto", help="train.compile_scope: auto | blocks | model")
    ap.add_argument("--sdpa", default="auto")
    ap.add_argument("--loss", default="auto")
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--eval-interval", type=int, default=30)
    ap.add_argument("--sink-interval", type=int, default=30)
    ap.add_argument("--default-sink-interval", type=int, default=500, help="configs/tinyllama_60m.yaml's")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/train_loop.json")
    a = ap.parse_args()
    model = {"name": a.model}
    if a.quick:
        model = {"name": "tiny", "block_size": 64}
        a.micro_batch = a.global_batch = 2
        a.steps, a.compile, a.log_interval, a.eval_interval, a.sink_interval = 12, 0, 2, 4, 4
    block = 64 if a.quick else 2048
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_shards(tmp / "data", block + 1, 50277 if not a.quick else 500, 512, 160)
        run = {"model": model,
               "data": {"train_dir": str(tmp / "data"), "train": {"train_synth": 1.0}, "valid": {"valid_synth": 1.0},
                        "val_samples": 32},
               "train": {"out_dir": str(tmp / "run"), "global_batch_size": a.global_batch,
                         "micro_batch_size": a.micro_batch, "max_steps": a.steps, "warmup_steps": 10,
                         "log_interval": a.log_interval, "eval_interval": a.eval_interval,
                         "sink_interval": a.sink_interval, "save_interval": 0, "compile": bool(a.compile), "compile_scope": a.compile_scope,
                         "sdpa_backend": a.sdpa, "loss_impl": a.loss, "profile": True, "resume": False},
               "probe": {"source": "shards", "n": 100, "T": 64},
               "logging": {"tensorboard": False, "wandb": False}}
        summary = fit(from_dict(run))
    prof = summary["profile"]
    # evaluation events in the phase-timed half (validation and/or probes at their intervals, and at the end)
    half = a.steps - a.steps // 2
    timed = range(a.steps - prof["steps"] + 1, a.steps + 1)
    events = sum(1 for s in timed if s % a.eval_interval == 0 or s % a.sink_interval == 0 or s == a.steps)
    ev_ms = next(r["ms_per_step"] for r in prof["phases"] if r["phase"].startswith("evaluation"))
    per_event_s = ev_ms * prof["steps"] / 1e3 / max(events, 1)
    tokens_per_step = a.global_batch * block
    logged = prof["loop_tokens_per_s_logged"]
    projected = tokens_per_step / (tokens_per_step / logged + per_event_s / a.default_sink_interval) if logged else None
    prof.update(evaluation_seconds_per_event=round(per_event_s, 3), timed_half_steps=half,
                projected_tokens_per_s_at_default_intervals=projected,
                projected_over_bare=projected / prof["bare_step_tokens_per_s"] if projected else None)
    rows = [{"what": "bare optimizer step (fixed batch on the device)", "tokens/s": round(prof["bare_step_tokens_per_s"])},
            {"what": "training loop, tokens/s as logged (evaluation excluded)",
             "tokens/s": round(prof["loop_tokens_per_s_logged"] or 0), "x_bare": round(prof["loop_over_bare_logged"] or 0, 3)},
            {"what": "training loop, wall clock (evaluation + probes included)",
             "tokens/s": round(prof["loop_tokens_per_s_wall"] or 0), "x_bare": round(prof["loop_over_bare_wall"] or 0, 3)},
            {"what": f"training loop, probes + validation every {a.default_sink_interval} steps (projected from "
                     f"{per_event_s:.2f} s per evaluation measured here)",
             "tokens/s": round(projected or 0), "x_bare": round(prof["projected_over_bare"] or 0, 3)}]
    print_table(rows, ["what", "tokens/s", "x_bare"])
    print_table(prof["phases"], ["phase", "ms_per_step", "share_%"])
    write_json(a.out, rows, {"profile": prof, "run": run, "summary": {k: v for k, v in summary.items()
                                                                      if k not in ("final", "sink_1_curve")}})


if __name__ == "__main__":
    main()
