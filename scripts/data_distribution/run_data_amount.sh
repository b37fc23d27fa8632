#!/usr/bin/env bash
# bash scripts/data_distribution/run_data_amount.sh RATIO   keep RATIO (0 < RATIO <= 1) of the training chunks.
# Uses configs/data_amount/tinyllama_60m_downsampleRATIO.yaml when it exists, else the default + the override.
source "$(dirname "$0")/../lib.sh"
R=${1:?usage: run_data_amount.sh RATIO (e.g. 0.1)}; shift
C="configs/data_amount/tinyllama_60m_downsample$R.yaml"
if [ -f "$C" ]; then train_and_eval "$C" "tinyllama_60M_downsample_ratio$R" "$@"
else train_and_eval configs/tinyllama_60m.yaml "tinyllama_60M_downsample_ratio$R" "data.downsample_ratio=$R" "$@"; fi
