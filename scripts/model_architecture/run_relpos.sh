#!/usr/bin/env bash
# bash scripts/model_architecture/run_relpos.sh POS   POS in alibi relative (the seed's name; same as run_pos.sh)
exec bash "$(dirname "$0")/run_pos.sh" "$@"
