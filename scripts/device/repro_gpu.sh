#!/usr/bin/env bash
# The GPU regime of the reproduction study (issue #10, docs/repro.md) in ONE command on a bare GPU box: byte-level
# shards from a carried Gutenberg file, then the rows of configs/repro/gpu/ (PARALLEL at a time on the one GPU:
# these models are too small to fill it), each for SECONDS_PER_ROW seconds of training, then a side-by-side plot.
#
#   bash scripts/device/repro_gpu.sh        # 6 rows in 2 waves of 3: default seed2 seed3 | sigmoid_no_norm k_bias no_bos
#   ROWS="wide" PARALLEL=1 SECONDS_PER_ROW=400 bash scripts/device/repro_gpu.sh
#
# Inputs: CORPUS (default dev_cache/gutenberg-train-00.jsonl.xz: any JSONL(.xz) of {"text": ...} documents),
# carried in an ignored folder next to the repository. Knobs: ROWS, PARALLEL (3), SECONDS_PER_ROW (150),
# VALID_FRACTION (0.02), WORK (/tmp/asl_repro_gpu), EXTRA (overrides for every row, space-separated),
# PYTHON (python3), GIT_COMMIT (recorded in every summary; there is no .git on the box).
# Output ($OUT, 3 files): log.txt, curves.png (the rows side by side) and runs.tar.gz (<row>/metrics.csv,
# <row>/summary.json, <row>/curves.png, and <row>/final_checks.json with train.save_final=true: the per-layer
# checks of lit_gpt.repro.final_checks, measured on the box; each summary holds its run config and environment). Back home:
#   python scripts/repro_run.py --regime gpu --import <files_at>/runs.tar.gz --command "..." && python scripts/repro_tables.py
# A CPU dry run of the whole script with a tiny budget: docs/repro.md ("The GPU regime").
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${PYTHON:=python3}" "${OUT:=out/repro_gpu}" "${WORK:=/tmp/asl_repro_gpu}" "${SECONDS_PER_ROW:=150}" "${PARALLEL:=3}"
: "${CORPUS:=dev_cache/gutenberg-train-00.jsonl.xz}" "${ROWS:=default seed2 seed3 sigmoid_no_norm k_bias no_bos}"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$WORK"

main() {
  [ -e "$CORPUS" ] || { echo "error: CORPUS=$CORPUS not found (carry a JSONL(.xz) file, see docs/repro.md)" >&2; return 2; }
  for r in $ROWS; do
    [ -f "configs/repro/gpu/$r.yaml" ] || { echo "error: no configs/repro/gpu/$r.yaml; rows: $(ls configs/repro/gpu)" >&2; return 2; }
  done
  "$PYTHON" -c "import torch, lightning; print(f'torch {torch.__version__}, lightning {lightning.__version__}, ' \
    f'{torch.cuda.device_count()} x {torch.cuda.get_device_name() if torch.cuda.is_available() else \"cpu\"}')"
  local block t0 status=0
  block=$("$PYTHON" pretrain.py --config configs/repro/gpu/default.yaml --print_config | "$PYTHON" -c \
    "import sys, yaml; print(yaml.safe_load(sys.stdin)['model']['block_size'])")
  t0=$(date +%s)
  "$PYTHON" -m preprocess.prepare --source "$CORPUS" --tokenizer bytes --out "$WORK/packed" --block_size "$block" \
    --valid_fraction "${VALID_FRACTION:-0.02}" --domain gutenberg --split train --chunks_per_shard 16384 --overwrite --quiet
  echo "preprocess (bytes, block $block): $(( $(date +%s) - t0 )) s"
  local sets=(--set "data.train_dir=$WORK/packed" --set "train.max_time_s=$SECONDS_PER_ROW")
  for e in ${EXTRA:-}; do sets+=(--set "$e"); done
  # shellcheck disable=SC2086
  "$PYTHON" scripts/repro_run.py --regime gpu $ROWS --parallel "$PARALLEL" --threads 0 --runs "$WORK/runs" \
    --results "$WORK/results" "${sets[@]}" --note "scripts/device/repro_gpu.sh, $PARALLEL rows at a time" || status=$?
  local labels=() csvs=() done_rows=()
  for r in $ROWS; do
    if [ -f "$WORK/runs/gpu/$r/summary.json" ]; then
      labels+=("$r") csvs+=("$WORK/runs/gpu/$r/metrics.csv") done_rows+=("$r")
    else
      echo "no summary for $r"
    fi
  done
  [ ${#done_rows[@]} -gt 0 ] || return 1
  (cd "$WORK/runs/gpu" && tar -czf "$OUT/runs.tar.gz" $(for r in "${done_rows[@]}"; do
     for f in metrics.csv summary.json curves.png final_checks.json; do [ -f "$r/$f" ] && echo "$r/$f"; done; done))
  "$PYTHON" -m lit_gpt.training_curves "${csvs[@]}" --labels "${labels[@]}" --out "$OUT/curves.png" \
    --title "GPU regime (configs/repro/gpu)"
  for r in "${done_rows[@]}"; do
    "$PYTHON" - "$WORK/results/gpu/$r.json" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
f, c = r["final"], r["curve"]
extra = "".join(f" Sink_1*={v:.1f}%" for v in f["sink_extra"] if v is not None)
print(f"SUMMARY {r['row']}: {r['steps']} steps, {r['tokens']:,} tokens, {r['tokens_per_s_median'] or 0:,.0f} tokens/s, "
      f"val_loss {f['val_loss']:.3f}, Sink_1={f['sink'][0]:.1f}%{extra}")
key = next((k for k in c if k.startswith("sink_extra_")), "sink_1")
print(f"  {key} curve (step, %):", [(s, round(v, 1)) for s, v in zip(c["step"], c[key])])
PY
  done
  return $status
}

set -o pipefail
main 2>&1 | tee "$OUT/log.txt"
