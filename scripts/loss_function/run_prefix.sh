#!/usr/bin/env bash
# bash scripts/loss_function/run_prefix.sh PREFIX  PREFIX in 2 3 4 5 10: prefix LM, the loss skips the prefix
source "$(dirname "$0")/../lib.sh"
P=${1:?usage: run_prefix.sh PREFIX (2, 3, 4, 5 or 10)}; shift
train_and_eval "configs/prefix/tinyllama_60m_prefix$P.yaml" "tinyllama_60M_prefix$P" "$@"
