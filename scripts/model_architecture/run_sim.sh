#!/usr/bin/env bash
# bash scripts/model_architecture/run_sim.sh SIM   SIM in sigmoid_norm sigmoid_no_norm elu_norm elu_no_norm,
#   or softmax_alpha0.5 / softmax_alpha2.0 (softmax rows summing to alpha)
source "$(dirname "$0")/../lib.sh"
S=${1:?usage: run_sim.sh SIM (sigmoid_no_norm, ...)}; shift
C="configs/attnsim/tinyllama_60m_sim_$S.yaml"; [ -f "$C" ] || C="configs/attnsim/tinyllama_60m_$S.yaml"
train_and_eval "$C" "tinyllama_60M_sim_$S" "$@"
