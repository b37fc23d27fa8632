#!/usr/bin/env bash
# bash scripts/model_architecture/run_heads.sh HEADS   HEADS in 1 2 4 (default model: 8), or sum: the 8 head outputs
#   added instead of concatenated (Table 12 left, "addition")
source "$(dirname "$0")/../lib.sh"
H=${1:?usage: run_heads.sh HEADS (1, 2, 4 or sum)}; shift
if [ "$H" = sum ]; then train_and_eval configs/heads/tinyllama_60m_head_sum.yaml tinyllama_60M_head_sum "$@"
else train_and_eval "configs/heads/tinyllama_60m_head$H.yaml" "tinyllama_60M_head$H" "$@"; fi
