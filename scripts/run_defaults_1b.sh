#!/usr/bin/env bash
# The 1B scale-up (configs/tinyllama_1b.yaml). On GPUs smaller than 80 GB: STRATEGY=fsdp.
source "$(dirname "$0")/lib.sh"
train_and_eval configs/tinyllama_1b.yaml tinyllama_1b "$@"
