#!/usr/bin/env bash
# bash scripts/model_architecture/run_ffn.sh FFN   FFN in relu gelu swish reglu geglu (default model: swiglu)
source "$(dirname "$0")/../lib.sh"
F=${1:?usage: run_ffn.sh FFN (relu, gelu, swish, reglu or geglu)}; shift
train_and_eval "configs/ffn/tinyllama_60m_$F.yaml" "tinyllama_60M_$F" "$@"
