#!/usr/bin/env bash
# bash scripts/data_distribution/run_data_amount.sh RATIO   keep RATIO (0 < RATIO <= 1) of the training chunks.
# The paper's points (§5, Figure 5 right): 1.0 0.5 0.1 0.04 0.02 0.01 = 5B 2.5B 500M 200M 100M 50M tokens.
# Uses configs/data_amount/tinyllama_60m_downsampleRATIO.yaml when it exists, else the default + the override.
source "$(dirname "$0")/../lib.sh"
R=${1:?usage: run_data_amount.sh RATIO (e.g. 0.1)}; shift
C="configs/data_amount/tinyllama_60m_downsample$R.yaml"
if [ -f "$C" ]; then train_and_eval "$C" "tinyllama_60M_downsample_ratio$R" "$@"
else train_and_eval configs/tinyllama_60m.yaml "tinyllama_60M_downsample_ratio$R" "data.downsample_ratio=$R" "$@"; fi
