#!/usr/bin/env bash
# bash scripts/model_architecture/run_kernel.sh KERNEL   KERNEL in elu_norm elu_no_norm linear_norm linear_no_norm
#   mlp_norm mlp_no_norm (kernel / linear attention)
source "$(dirname "$0")/../lib.sh"
K=${1:?usage: run_kernel.sh KERNEL (elu_norm, ..., mlp_no_norm)}; shift
train_and_eval "configs/attnkernel/tinyllama_60m_$K.yaml" "tinyllama_60M_kernel_$K" "$@"
