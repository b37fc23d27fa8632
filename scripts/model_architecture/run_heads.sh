#!/usr/bin/env bash
# bash scripts/model_architecture/run_heads.sh HEADS   HEADS in 1 2 4 (default model: 8)
source "$(dirname "$0")/../lib.sh"
H=${1:?usage: run_heads.sh HEADS (1, 2 or 4)}; shift
train_and_eval "configs/heads/tinyllama_60m_head$H.yaml" "tinyllama_60M_head$H" "$@"
