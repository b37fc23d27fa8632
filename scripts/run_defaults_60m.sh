#!/usr/bin/env bash
# The paper's default 60M run (configs/tinyllama_60m.yaml) on every visible GPU, then the sink evaluation.
# Data: `bash preprocess/run_preprocess.sh` first. Overrides: NUM_GPUS, EXTRA="train.max_steps=..." (scripts/lib.sh).
source "$(dirname "$0")/lib.sh"
train_and_eval configs/tinyllama_60m.yaml tinyllama_60M "$@"
