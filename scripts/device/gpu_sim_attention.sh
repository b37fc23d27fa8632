#!/usr/bin/env bash
# One command on a bare GPU box for the fused sigmoid / elu kernel (lit_gpt/kernels/sim_attention.py):
# the GPU correctness checks of the sim_* cases (benchmarks/gpu_checks.py, one process per case) run while
# bench_sim_attention.py compiles every kernel variant it needs once (Triton's on-disk cache keeps them), then
# the benchmark runs alone on the GPU. Writes $OUT/log.txt, $OUT/gpu_checks_sim.json, $OUT/sim_attention.json.
# Exit status 1 if a check failed.
#
#   OUT=out/gpu_sim bash scripts/device/gpu_sim_attention.sh
#
# Knobs: PYTHON (python3), CHECK_S / WARM_S / BENCH_S (time limits of the three stages, seconds), CHECKS (case
# names), BENCH_ARGS (e.g. "--parts train,attention --lengths 2048 4096"). The benchmark rewrites its JSON after each
# part, so a run cut by BENCH_S keeps the parts it finished (parts_done).
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/gpu_sim}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TMP=$(mktemp -d)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
cd benchmarks
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$LOG"
t0=$(date +%s)
pids=()
for c in ${CHECKS:-sim_sigmoid_z1 sim_sigmoid_norm sim_d96_sigmoid_norm sim_elu_norm_alibi_window \
         sim_sigmoid_kv_prefix sim_elu_z1_sink_token_gqa}; do
  timeout "${CHECK_S:-200}" "$PYTHON" gpu_checks.py --cases "$c" --out "$TMP/gc_$c.json" > "$TMP/gc_$c.log" 2>&1 &
  pids+=($!)
done
# compile each kernel variant once, one process per variant (Triton's cache is shared on disk)
wpids=()
for v in "sigmoid Z=1 (fused)" "sigmoid normalised" "elu+1 Z=1" "elu+1 normalised" "k*/v*" "window" "prefix"; do
  timeout "${WARM_S:-200}" "$PYTHON" bench_sim_attention.py --warmup-only --parts train --only "$v" \
    > "$TMP/warm_${#wpids[@]}.log" 2>&1 &
  wpids+=($!)
done
timeout "${WARM_S:-200}" "$PYTHON" bench_sim_attention.py --warmup-only --parts attention --lengths 1024 \
  > "$TMP/warm_attn.log" 2>&1
for p in "${wpids[@]}"; do wait "$p"; done
echo "warm-up (compile): $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
echo "checks done (exit $status): $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
cat "$TMP"/gc_*.log >> "$LOG"
tail -n 3 "$TMP"/warm_*.log >> "$LOG"
"$PYTHON" - "$TMP" "$OUT/gpu_checks_sim.json" <<'PY' 2>&1 | tee -a "$LOG"
import glob, json, sys
parts = [json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + "/gc_*.json"))]
rows = [r for p in parts for r in p["results"]]
out = {"environment": parts[0]["environment"] if parts else {}, "results": rows}
json.dump(out, open(sys.argv[2], "w"), indent=2)
print(f"{sum(r['ok'] for r in rows)}/{len(rows)} sim checks ok")
PY
timeout "${BENCH_S:-200}" "$PYTHON" bench_sim_attention.py --out "$OUT/sim_attention.json" ${BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
echo "total $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
exit $status
