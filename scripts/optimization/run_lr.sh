#!/usr/bin/env bash
# bash scripts/optimization/run_lr.sh LR        LR in 1e-3 1e-4 1e-5 (configs/lr/)
source "$(dirname "$0")/../lib.sh"
LR=${1:?usage: run_lr.sh LR (1e-3, 1e-4 or 1e-5)}; shift
train_and_eval "configs/lr/tinyllama_60m_lr$LR.yaml" "tinyllama_60M_lr$LR" "$@"
