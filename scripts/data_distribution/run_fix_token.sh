#!/usr/bin/env bash
# bash scripts/data_distribution/run_fix_token.sh POSITION [TOKEN_ID]   the token at POSITION is TOKEN_ID
# (default 1 = <|padding|> of GPT-NeoX) in every training, validation and probe sequence.
source "$(dirname "$0")/../lib.sh"
P=${1:?usage: run_fix_token.sh POSITION [TOKEN_ID]}; T=${2:-1}; shift $(( $# >= 2 ? 2 : 1 ))
C="configs/fix/tinyllama_60m_fix_position$P.yaml"
if [ -f "$C" ] && [ "$T" = 1 ]; then train_and_eval "$C" "tinyllama_60M_fix_position$P" "$@"
else train_and_eval configs/tinyllama_60m.yaml "tinyllama_60M_fix_position${P}_token$T" "data.fixed_token={position: $P, token_id: $T}" "$@"; fi
