#!/usr/bin/env bash
# bash scripts/model_architecture/run_postln.sh   post-LN blocks
source "$(dirname "$0")/../lib.sh"
train_and_eval configs/postln/tinyllama_60m_postln.yaml tinyllama_60M_postln "$@"
