#!/usr/bin/env bash
# bash scripts/model_architecture/run_relpos.sh POS   POS in alibi relative (the seed's name; same as run_pos.sh;
#   relative is the seed's model_relpos.py bias: the fixed bucket index, no parameters)
exec bash "$(dirname "$0")/run_pos.sh" "$@"
