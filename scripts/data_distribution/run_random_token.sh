#!/usr/bin/env bash
# bash scripts/data_distribution/run_random_token.sh START END   random token ids at positions [START, END),
# drawn on the fly (no second copy of the dataset as the seed's random_data.py made).
source "$(dirname "$0")/../lib.sh"
S=${1:?usage: run_random_token.sh START END}; E=${2:?usage: run_random_token.sh START END}; shift 2
C="configs/random/tinyllama_60m_random${S}_${E}.yaml"
if [ -f "$C" ]; then train_and_eval "$C" "tinyllama_60M_random${S}_${E}" "$@"
else train_and_eval configs/tinyllama_60m.yaml "tinyllama_60M_random${S}_${E}" "data.random_tokens={start: $S, end: $E}" "$@"; fi
