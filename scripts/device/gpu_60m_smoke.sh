#!/usr/bin/env bash
# One command on a bare GPU box: preprocess one corpus shard, train the 60M default for ~5 minutes (bf16-mixed,
# SDPA), log validation loss and Sink_1..10 curves, and copy metrics.csv, curves.png, summary.json, the resolved
# config and the logs to $OUT (6 files, no checkpoint).
#
#   bash scripts/device/gpu_60m_smoke.sh                 # 1 GPU
#   DEVICES=2 SECONDS_BUDGET=120 bash scripts/device/gpu_60m_smoke.sh   # 2-GPU DDP smoke run
#
# Inputs (ignored folder dev_cache/, carried next to the repo): CORPUS (default dev_cache/gutenberg-train-00.jsonl.xz),
# TOKENIZER (default dev_cache/gpt-neox-20b). Knobs: SECONDS_BUDGET (training seconds, default 300), DEVICES (1),
# GLOBAL_BATCH (64), MICRO_BATCH (16), BLOCK (2048), COMPILE (0/1), VALID_FRACTION (0.02: 15 of the 558 books of
# gutenberg-train-00 held out, ~700 chunks), WORK (/tmp/asl_gpu_smoke), EXTRA (overrides),
# PYTHON (python3). A CPU dry run of the whole script: see docs/pretraining.md ("GPU smoke run").
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/gpu_smoke}
WORK=${WORK:-/tmp/asl_gpu_smoke}
CORPUS=${CORPUS:-dev_cache/gutenberg-train-00.jsonl.xz}
TOKENIZER=${TOKENIZER:-dev_cache/gpt-neox-20b}
DEVICES=${DEVICES:-1}
BLOCK=${BLOCK:-2048}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
for f in "$CORPUS" "$TOKENIZER"; do
  [ -e "$f" ] || { echo "error: $f not found (set CORPUS / TOKENIZER)" >&2; exit 2; }
done
"$PYTHON" - <<'PY' 2>&1 | tee "$OUT/train.log"
import torch, lightning
print(f"torch {torch.__version__}, lightning {lightning.__version__}, cuda {torch.cuda.is_available()}, "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
PY
t0=$(date +%s)
"$PYTHON" -m preprocess.prepare --source "$CORPUS" --tokenizer "$TOKENIZER" --out "$WORK/packed" \
  --block_size "$BLOCK" --valid_fraction "${VALID_FRACTION:-0.02}" --domain gutenberg --split train --overwrite --quiet \
  2>&1 | tee "$OUT/preprocess.log"
echo "preprocess: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/preprocess.log"
# shellcheck disable=SC2206
ARGS=(data.train_dir="$WORK/packed" data.tokenizer="$TOKENIZER" train.out_dir="$WORK/run"
      train.max_time_s="${SECONDS_BUDGET:-300}" train.devices="$DEVICES" model.block_size="$BLOCK"
      train.global_batch_size="${GLOBAL_BATCH:-64}" train.micro_batch_size="${MICRO_BATCH:-16}"
      train.compile="$([ "${COMPILE:-0}" = 1 ] && echo true || echo false)" train.save_final=false ${EXTRA:-})
rm -rf "$WORK/run"
"$PYTHON" pretrain.py --config configs/device/gpu_60m_smoke.yaml "${ARGS[@]}" 2>&1 | tee -a "$OUT/train.log"
for f in metrics.csv curves.png summary.json run_config.yaml; do cp "$WORK/run/$f" "$OUT/$f"; done
"$PYTHON" - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
f = s["final"]
nan = float("nan")
print(f"SUMMARY device={s['device']} world={s['world_size']} steps={s['step']} tokens={s['tokens_seen']:,} "
      f"tokens/s(median)={s['tokens_per_s_median'] or nan:,.0f} train_seconds={s['train_seconds']:.0f} "
      f"train_loss={f.get('train_loss', nan):.4f} val_loss={f.get('val_loss', nan):.4f} "
      f"probe_loss={f.get('probe_loss', nan):.4f} peak_mem_gb={s['peak_mem_gb']}")
print("Sink_1 curve (step, %):", [(st, round(v, 1)) for st, v in s["sink_1_curve"]])
print("final Sink_1..10:", [round(f[f"sink_{k}"], 1) for k in range(1, 11) if f"sink_{k}" in f])
PY
