#!/usr/bin/env bash
# The README's main command: a few minutes on a 2-core CPU, no GPU, no internet.
#   bash scripts/demo_cpu.sh [CONTRAST]       CONTRAST: a row of configs/repro/<REGIME> (default: k_bias, the sink
#                                              moving to a learned key slot; sigmoid_no_norm: no normalisation)
# 1. builds the regime's corpus on first use (cpu2: the first 60 Gutenberg books of ../shared/corpus, bytes; cpu: the
#    standard library's docstrings, the same 1.5M bytes on every machine),
# 2. trains the regime's default (REGIME=cpu2, the default: configs/repro/cpu2/default.yaml, a byte-level LLaMA-style
#    model, 4 layers x 8 heads of width 8, 4,000 steps, whose sink forms in every seed tried; REGIME=cpu: the first CPU
#    regime, 4 x 4 heads of width 8, 2,500 steps, whose sink forms in one seed of nine: docs/repro.md) and the
#    contrast side by side, one CPU thread each (scripts/repro_run.py),
# 3. prints both Sink_1 curves (Sink_1* for a row with a key slot or sink token) and writes
#    checkpoints/demo_cpu/curves.png with both runs side by side.
# DEMO_SET="train.max_steps=300" (space-separated overrides) shortens both runs, e.g. for a smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."
CONTRAST=${1:-k_bias}
REGIME=${REGIME:-cpu2}
[ -f "configs/repro/$REGIME/default.yaml" ] || { echo "error: REGIME=$REGIME is invalid; allowed: cpu, cpu2" >&2; exit 2; }
# use the current python when it has what the repo needs, else install into ./.venv (scripts/install.sh)
if [ -z "${PYTHON:-}" ]; then
  if python -c "import torch, lightning, yaml, numpy, matplotlib" 2>/dev/null; then
    PYTHON=python
  else
    bash scripts/install.sh
    PYTHON=.venv/bin/python
  fi
fi
t0=$(date +%s)
DEMO=datasets/demo_cpu
if [ "$REGIME" = cpu ] && [ ! -f "$DEMO/packed/manifest.json" ]; then
  "$PYTHON" -m preprocess.demo_corpus --out "$DEMO" --source stdlib --tokenizer bytes --block_size 64
fi
RUNS=checkpoints/demo_cpu
if [ -d "$RUNS" ]; then        # keep the previous demo run (one generation) instead of deleting it
  rm -rf "$RUNS.prev" && mv "$RUNS" "$RUNS.prev"
fi
SETS=()
for s in ${DEMO_SET:-}; do SETS+=(--set "$s"); done
"$PYTHON" scripts/repro_run.py --regime "$REGIME" default "$CONTRAST" --parallel 2 --threads 1 --runs "$RUNS" \
  --results "$RUNS/records" "${SETS[@]}"
"$PYTHON" -m lit_gpt.training_curves "$RUNS/$REGIME/default/metrics.csv" "$RUNS/$REGIME/$CONTRAST/metrics.csv" \
  --labels "default (softmax)" "$CONTRAST" --out "$RUNS/curves.png" --title "${REGIME^^} regime: default vs $CONTRAST"
"$PYTHON" - "$RUNS/records/$REGIME/default.json" "$RUNS/records/$REGIME/$CONTRAST.json" "$(( $(date +%s) - t0 ))" \
  "$RUNS/demo.json" "$( [ "$REGIME" = cpu2 ] || echo "REGIME=$REGIME " )bash scripts/demo_cpu.sh${1:+ $1}" "$REGIME" <<'PY'
import json, sys, time
from lit_gpt.results import environment
from lit_gpt.utils import atomic_write_text
a, b = (json.load(open(p)) for p in sys.argv[1:3])
def col(r):
    extra = [k for k in r["curve"] if k.startswith("sink_extra_")]
    return (extra[0], "Sink_1*") if extra else ("sink_1", "Sink_1")
(ka, na), (kb, nb) = col(a), col(b)
print(f"\n{'step':>6} {'tokens':>10} | default {na:>7} | {b['row']} {nb}")
for i, step in enumerate(a["curve"]["step"]):
    vb = b["curve"][kb][i] if i < len(b["curve"][kb]) else None
    print(f"{step:>6} {a['curve']['tokens'][i]:>10,} | {a['curve'][ka][i]:>14.1f}% | "
          + ("-" if vb is None else f"{vb:.1f}%") + ("" if kb == "sink_1" else f"  (Sink_1 {b['curve']['sink_1'][i]:.1f}%)"))
for r in (a, b):
    f = r["final"]
    extra = "".join(f", Sink_1* {v:.1f}%" for v in f["sink_extra"] if v is not None)
    print(f"{r['row']}: {r['steps']} steps, {r['tokens']:,} tokens in {r['train_seconds']:.0f} s "
          f"({r['tokens_per_s_median'] or 0:,.0f} tokens/s); val loss {f['val_loss']:.3f}; Sink_1 {f['sink'][0]:.1f}%{extra}")
print(f"wall time of the demo: {int(sys.argv[3]) // 60} min {int(sys.argv[3]) % 60} s")
atomic_write_text(sys.argv[4], json.dumps({
    "schema": "asl-demo-run/1", "command": sys.argv[5], "regime": sys.argv[6], "wall_seconds": int(sys.argv[3]),
    "rows": [a["row"], b["row"]], "date": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment()}, indent=1))
PY
echo "plot: $RUNS/curves.png   runs: $RUNS/$REGIME/{default,$CONTRAST}   records: $RUNS/records/$REGIME   timing: $RUNS/demo.json"
