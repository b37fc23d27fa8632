#!/usr/bin/env bash
# The README's main command: a few minutes on a CPU, no GPU, no internet.
#   bash scripts/demo_cpu.sh [overrides, e.g. train.max_time_s=60]
# 1. builds datasets/demo_cpu/ from the standard library's docstrings (preprocess/demo_corpus.py; reused when
#    present; DEMO_SOURCE=shared uses ../shared's held-out Gutenberg + Wikipedia text instead),
# 2. trains configs/demo_cpu.yaml (byte-level 0.4M model, 900 steps, Sink_1..10 logged every 25 steps),
# 3. prints Sink_1..10 of the final model and writes checkpoints/demo_cpu/curves.png (loss + Sink_k vs step).
# DEMO_RECORD=docs/results/demo_cpu also writes the run's raw record there (summary.json, metrics.csv, the corpus
# manifest and run.json with the wall times, lit_gpt.results), the files the README's demo table is rendered from.
set -euo pipefail
T_START=$(date +%s.%N)
cd "$(dirname "$0")/.."
# use the current python when it has what the repo needs, else install into ./.venv (scripts/install.sh)
if [ -z "${PYTHON:-}" ]; then
  if python -c "import torch, lightning, yaml, numpy, matplotlib" 2>/dev/null; then
    PYTHON=python
  else
    bash scripts/install.sh
    PYTHON=.venv/bin/python
  fi
fi
DEMO=datasets/demo_cpu
T_CORPUS=$(date +%s.%N)
if [ ! -f "$DEMO/packed/manifest.json" ]; then
  "$PYTHON" -m preprocess.demo_corpus --out "$DEMO" --source "${DEMO_SOURCE:-stdlib}" --tokenizer bytes --block_size 64
fi
T_TRAIN=$(date +%s.%N)
if [ -d checkpoints/demo_cpu ]; then        # keep the previous demo run (one generation) instead of deleting it
  rm -rf checkpoints/demo_cpu.prev && mv checkpoints/demo_cpu checkpoints/demo_cpu.prev
fi
"$PYTHON" pretrain.py --config configs/demo_cpu.yaml "$@"
T_END=$(date +%s.%N)
T_START=$T_START T_CORPUS=$T_CORPUS T_TRAIN=$T_TRAIN T_END=$T_END "$PYTHON" - <<'PY'
import json
import os
import shutil
s = json.load(open("checkpoints/demo_cpu/summary.json"))
rec = os.environ.get("DEMO_RECORD")
if rec:
    from lit_gpt.results import write_record
    t = {k: float(os.environ[k]) for k in ("T_START", "T_CORPUS", "T_TRAIN", "T_END")}
    os.makedirs(rec, exist_ok=True)
    for name in ("summary.json", "metrics.csv"):
        shutil.copy(f"checkpoints/demo_cpu/{name}", os.path.join(rec, name))
    if os.path.isfile("datasets/demo_cpu/packed/manifest.json"):
        shutil.copy("datasets/demo_cpu/packed/manifest.json", os.path.join(rec, "corpus_manifest.json"))
    write_record(os.path.join(rec, "run.json"), {
        "what": "bash scripts/demo_cpu.sh: wall times (s) of the whole script, of building the corpus (0 when "
                "reused) and of training; the run's summary.json and metrics.csv lie next to this file",
        "wall_s": t["T_END"] - t["T_START"], "corpus_s": t["T_TRAIN"] - t["T_CORPUS"],
        "train_wall_s": t["T_END"] - t["T_TRAIN"]}, argv=["scripts/demo_cpu.sh"])
f = s["final"]
print(f"\nSink_1..10 after {s['step']} steps ({s['tokens_seen']:,} tokens, {s['train_seconds']:.0f} s, "
      f"{s['tokens_per_s_median']:,.0f} tokens/s):")
print("  " + "  ".join(f"Sink_{k}={f[f'sink_{k}']:.2f}%" for k in range(1, 11)))
print("Sink_1 during training (step, %):", [(st, round(v, 2)) for st, v in s["sink_1_curve"]])
print("plot: checkpoints/demo_cpu/curves.png   metrics: checkpoints/demo_cpu/metrics.csv")
PY
