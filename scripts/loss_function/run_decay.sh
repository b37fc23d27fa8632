#!/usr/bin/env bash
# bash scripts/loss_function/run_decay.sh DECAY  DECAY in 0 1e-3 1e-2 5e-1 1e0 2e0 5e0 1e1 (configs/decay/)
source "$(dirname "$0")/../lib.sh"
D=${1:?usage: run_decay.sh DECAY (0, 1e-3, 1e-2, 5e-1, 1e0, 2e0, 5e0, 1e1)}; shift
train_and_eval "configs/decay/tinyllama_60m_decay$D.yaml" "tinyllama_60M_decay$D" "$@"
