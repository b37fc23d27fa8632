#!/usr/bin/env bash
# The GPU regime of the reproduction study (issue #10, docs/repro.md) in ONE command on a bare GPU box:
# byte-level shards from a carried Gutenberg file, then the rows of configs/repro/gpu/ one after the other, each
# for SECONDS_PER_ROW seconds of training, then the records, metrics and a side-by-side plot in $OUT.
#
#   bash scripts/device/repro_gpu.sh                          # default + sigmoid_no_norm + k_bias, ~8.5 minutes
#   ROWS="default" SECONDS_PER_ROW=400 bash scripts/device/repro_gpu.sh
#
# Inputs: CORPUS (default dev_cache/gutenberg-train-00.jsonl.xz: any JSONL(.xz) of {"text": ...} documents; a
# slice is enough, see docs/repro.md), carried in an ignored folder next to the repository. Knobs: ROWS (rows of
# configs/repro/gpu/, run in this order), SECONDS_PER_ROW (130), VALID_FRACTION (0.02), WORK (/tmp/asl_repro_gpu),
# EXTRA (overrides for every row, space-separated), PYTHON (python3), GIT_COMMIT (recorded; there is no .git here).
# Output ($OUT, at most 8 files, 2 folders deep): log.txt, curves.png (the rows side by side),
# <row>/metrics.csv and <row>/summary.json per row (the summary holds the run config and the environment).
# Back home: python scripts/repro_run.py --regime gpu --import <that folder> --command "..." writes the records,
# python scripts/repro_tables.py the tables.
# A CPU dry run of the whole script (tiny budget): see docs/repro.md ("GPU regime").
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${PYTHON:=python3}" "${OUT:=out/repro_gpu}" "${WORK:=/tmp/asl_repro_gpu}" "${SECONDS_PER_ROW:=130}"
: "${CORPUS:=dev_cache/gutenberg-train-00.jsonl.xz}" "${ROWS:=default sigmoid_no_norm k_bias}"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$WORK"

main() {
[ -e "$CORPUS" ] || { echo "error: CORPUS=$CORPUS not found (carry a JSONL(.xz) file, see docs/repro.md)" >&2; exit 2; }
for r in $ROWS; do
  [ -f "configs/repro/gpu/$r.yaml" ] || { echo "error: no configs/repro/gpu/$r.yaml; rows: $(ls configs/repro/gpu)" >&2; exit 2; }
done
"$PYTHON" -c "import torch, lightning; print(f'torch {torch.__version__}, lightning {lightning.__version__}, ' \
  f'{torch.cuda.device_count()} x {torch.cuda.get_device_name() if torch.cuda.is_available() else \"cpu\"}')"
BLOCK=$("$PYTHON" pretrain.py --config configs/repro/gpu/default.yaml --print_config | "$PYTHON" -c \
  "import sys, yaml; print(yaml.safe_load(sys.stdin)['model']['block_size'])")
t0=$(date +%s)
"$PYTHON" -m preprocess.prepare --source "$CORPUS" --tokenizer bytes --out "$WORK/packed" --block_size "$BLOCK" \
  --valid_fraction "${VALID_FRACTION:-0.02}" --domain gutenberg --split train --overwrite --quiet
echo "preprocess (bytes, block $BLOCK): $(( $(date +%s) - t0 )) s"
# shellcheck disable=SC2086
SETS=(--set "data.train_dir=$WORK/packed" --set "train.max_time_s=$SECONDS_PER_ROW")
for e in ${EXTRA:-}; do SETS+=(--set "$e"); done
status=0
"$PYTHON" scripts/repro_run.py --regime gpu $ROWS --parallel 1 --threads 0 --runs "$WORK/runs" \
  --results "$WORK/results" "${SETS[@]}" --note "scripts/device/repro_gpu.sh" || status=$?
labels=() csvs=()
for r in $ROWS; do
  run="$WORK/runs/gpu/$r"
  [ -f "$run/summary.json" ] || { echo "no summary for $r"; continue; }
  mkdir -p "$OUT/$r"
  cp "$run/metrics.csv" "$run/summary.json" "$OUT/$r/"
  labels+=("$r") csvs+=("$run/metrics.csv")
done
if [ ${#csvs[@]} -gt 0 ]; then
  "$PYTHON" -m lit_gpt.training_curves "${csvs[@]}" --labels "${labels[@]}" --out "$OUT/curves.png" \
    --title "GPU regime (configs/repro/gpu)"
  for r in "${labels[@]}"; do
    "$PYTHON" - "$WORK/results/gpu/$r.json" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
f, c = r["final"], r["curve"]
extra = "".join(f" Sink_1*={v:.1f}%" for v in f["sink_extra"] if v is not None)
print(f"SUMMARY {r['row']}: {r['steps']} steps, {r['tokens']:,} tokens, {r['tokens_per_s_median'] or 0:,.0f} tokens/s, "
      f"val_loss {f['val_loss']:.3f}, Sink_1={f['sink'][0]:.1f}%{extra}")
print("  Sink_1 curve (step, %):", [(s, round(v, 1)) for s, v in zip(c["step"], c["sink_1"])])
PY
  done
fi
return $status
}

set -o pipefail
main 2>&1 | tee "$OUT/log.txt"
