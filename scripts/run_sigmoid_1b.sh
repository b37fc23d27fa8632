#!/usr/bin/env bash
# The 1B scale-up with sigmoid attention without normalisation (configs/tinyllama_1b_sigmoid.yaml).
source "$(dirname "$0")/lib.sh"
train_and_eval configs/tinyllama_1b_sigmoid.yaml tinyllama_1b_sigmoid "$@"
