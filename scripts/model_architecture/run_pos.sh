#!/usr/bin/env bash
# bash scripts/model_architecture/run_pos.sh POS   POS in nope absolute learnable relative alibi
#   (relative = the paper's fixed T5 bucket bias; relative_learned = T5's learned table, not in the paper)
source "$(dirname "$0")/../lib.sh"
P=${1:?usage: run_pos.sh POS (nope, absolute, learnable, relative, relative_learned or alibi)}; shift
train_and_eval "configs/pos/tinyllama_60m_$P.yaml" "tinyllama_60M_pos_$P" "$@"
