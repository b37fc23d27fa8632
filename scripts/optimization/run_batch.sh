#!/usr/bin/env bash
# bash scripts/optimization/run_batch.sh BATCH  BATCH in 128 256 1024 (global batch, sequences of 2048 tokens)
source "$(dirname "$0")/../lib.sh"
B=${1:?usage: run_batch.sh BATCH (128, 256 or 1024)}; shift
train_and_eval "configs/batch/tinyllama_60m_batch$B.yaml" "tinyllama_60M_batch$B" "$@"
