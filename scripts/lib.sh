#!/usr/bin/env bash
# Shared by the experiment scripts: train one config on every visible GPU (or the CPU), then evaluate the sink.
#
#   NUM_GPUS   devices per node (default: all visible GPUs, 1 on a CPU-only machine)
#   NUM_NODES  nodes (default 1; launch the script on every node under torchrun/SLURM, see docs/pretraining.md)
#   STRATEGY   auto | ddp | fsdp (default auto: DDP when more than one device)
#   MICRO_BATCH_SIZE  per-device micro batch (default: the config's); global batch stays the config's
#   EXTRA      more overrides, e.g. EXTRA="train.max_steps=2000 data.train_dir=datasets/shared_corpus" (split on
#              spaces: pass values with spaces as script arguments, "data.train={train_x: 1.0}")
#   PYTHON     interpreter (default python)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON=${PYTHON:-python}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

detect_gpus() {
  "$PYTHON" - <<'PY'
import torch
print(max(torch.cuda.device_count(), 1))
PY
}

# train_and_eval CONFIG RUN_NAME [override ...]
train_and_eval() {
  local config="$1" name="$2"
  shift 2
  if [ ! -f "$config" ]; then
    echo "error: no config $config; available in $(dirname "$config"):" >&2
    ls "$(dirname "$config")" >&2 || true
    exit 2
  fi
  local gpus=${NUM_GPUS:-$(detect_gpus)}
  local args=("train.name=$name" "train.devices=$gpus" "train.num_nodes=${NUM_NODES:-1}"
              "train.strategy=${STRATEGY:-auto}")
  if [ -n "${MICRO_BATCH_SIZE:-}" ]; then args+=("train.micro_batch_size=$MICRO_BATCH_SIZE"); fi
  # shellcheck disable=SC2206
  if [ -n "${EXTRA:-}" ]; then args+=($EXTRA); fi
  echo "+ $PYTHON pretrain.py --config $config ${args[*]} $*"
  "$PYTHON" pretrain.py --config "$config" "${args[@]}" "$@"
  local out
  out=$("$PYTHON" pretrain.py --config "$config" "${args[@]}" "$@" --print_config | "$PYTHON" -c \
    "import sys, yaml; d = yaml.safe_load(sys.stdin); print(d['train']['out_dir'] or 'checkpoints/' + d['train']['name'])")
  RUN_OUT="$out"     # for scripts that evaluate more checkpoints of the run
  echo "+ $PYTHON eval_sink.py $out --run-probe --out $out/sink_eval.json"
  "$PYTHON" eval_sink.py "$out" --run-probe --out "$out/sink_eval.json"
}
