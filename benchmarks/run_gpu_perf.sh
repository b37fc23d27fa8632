#!/usr/bin/env bash
# Every issue-9 measurement in one command on a GPU box, each under its own time budget (the box is rented by the
# minute): training step vs the plain reference model and litgpt (MFU), streaming decoding, the real training loop
# vs its bare step, attention cost over T, the 1.1B step, compiled decoding, GPU correctness checks. JSON + log
# to $OUT (8 files).
#
#   OUT=/tmp/perf bash benchmarks/run_gpu_perf.sh          # GPU
#   QUICK=1 OUT=/tmp/perf bash benchmarks/run_gpu_perf.sh  # the same sequence, tiny, on CPU
#   STEPS="train_60m train_loop" ... bash benchmarks/run_gpu_perf.sh   # only these steps
#   EXTRA60="" ...                                         # train_60m without the loss/attention micro-benchmarks
#   EXTRA60="--impls reference,ours --compile blocks,model --micro-batches 16,32 --ref-micro-batches 16,32"
#                                                          # train_60m: compile scopes and micro batches, each side at its best
#   LOOP_SCOPE=model ...                                   # train_loop: train.compile_scope
#   DEC_MODELS=tinyllama_1_1b DEC_EXTRA="--recompute eager --stream 20000" ...   # decode_compiled: models, options
#   CHECKS=flex_ ...                                       # checks: only these gpu_checks.py cases
#   LIMIT_CHECKS / LIMIT_CURVE BUDGET_CURVE / LIMIT_DEC BUDGET_DEC: seconds of those steps
#
# litgpt and jsonargparse come from wheels in .whl/ when present (the GPU box has no internet):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl litgpt==0.5.13 jsonargparse==4.53.0
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-out/gpu_perf}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
Q=${QUICK:+--quick}
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$PY" -c "import litgpt.model; print('litgpt importable')" 2>&1 | tail -1; } 2>&1 | tee "$LOG"
t0=$(date +%s)
step() {   # step NAME SECONDS command...
  local name=$1 limit=$2; shift 2
  [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s, at $(( $(date +%s) - t0 ))s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | grep -v -E "^\s*$|UserWarning|warnings.warn" | tee -a "$LOG"
  echo "=== $name rc=$? ($(( $(date +%s) - t0 ))s)" | tee -a "$LOG"
}
cd benchmarks
# shellcheck disable=SC2086
step train_60m "${LIMIT60:-175}" "$PY" bench_train_step.py --compare --breakdown --budget-s "${BUDGET60:-130}" $Q \
  ${EXTRA60---micro --eager-too} --out "$OUT/train_step_60m.json"
step decode 70 "$PY" bench_decode.py --models tinyllama_60M,tinyllama_1_1b --compile-models none --budget-s 55 $Q \
  --out "$OUT/decode.json"
SDPA=$("$PY" -c "import json; print(json.load(open('$OUT/train_step_60m.json'))['sdpa_ours'])" 2>/dev/null || echo default)
step train_loop 75 "$PY" bench_train_loop.py --sdpa "$SDPA" --compile-scope "${LOOP_SCOPE:-auto}" --steps 40 \
  --log-interval 5 --eval-interval 20 --sink-interval 20 $Q --out "$OUT/train_loop.json"
step attention_curve "${LIMIT_CURVE:-50}" "$PY" bench_attention.py --curve --budget-s "${BUDGET_CURVE:-30}" $Q \
  --out "$OUT/attention_curve.json"
step train_1b 60 "$PY" bench_train_step.py --model tinyllama_1_1b --micro-batch 8 --impls ours --sdpa best \
  --breakdown --repeat 4 $Q --out "$OUT/train_step_1b.json"
# shellcheck disable=SC2086
step decode_compiled "${LIMIT_DEC:-90}" "$PY" bench_decode.py --models "${DEC_MODELS:-tinyllama_1_1b,tinyllama_60M}" \
  --batch-large 0 --checkpoints 4 --budget-s "${BUDGET_DEC:-50}" ${DEC_EXTRA:-} $Q --out "$OUT/decode_compiled.json"
step checks "${LIMIT_CHECKS:-150}" "$PY" gpu_checks.py --cases "${CHECKS:-}" --out "$OUT/gpu_checks.json"
echo "total $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
