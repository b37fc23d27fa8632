#!/usr/bin/env bash
# bash scripts/loss_function/run_window.sh WINDOW  WINDOW in 32 64 128 256 512 1024: shifted-window attention
source "$(dirname "$0")/../lib.sh"
W=${1:?usage: run_window.sh WINDOW (32, 64, 128, 256, 512 or 1024)}; shift
train_and_eval "configs/window/tinyllama_60m_window$W.yaml" "tinyllama_60M_window$W" "$@"
