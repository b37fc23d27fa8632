#!/usr/bin/env bash
# bash scripts/model_architecture/run_sim.sh SIM   SIM in sigmoid_norm sigmoid_no_norm elu_norm elu_no_norm;
#   softmax rows summing to alpha (Table 14 left): softmax_alpha2.0 softmax_alpha0.2 softmax_alpha0.1
#     softmax_alpha0.05 (and softmax_alpha0.5, not a row of the table);
#   sigmoid without normalisation at other lr / weight decay (Table 14 right): sigmoid_no_norm_decay0
#     sigmoid_no_norm_decay5e-1 sigmoid_no_norm_decay1e0 sigmoid_no_norm_lr1e-3 sigmoid_no_norm_lr1e-4
source "$(dirname "$0")/../lib.sh"
S=${1:?usage: run_sim.sh SIM (sigmoid_no_norm, ...)}; shift
C="configs/attnsim/tinyllama_60m_sim_$S.yaml"; [ -f "$C" ] || C="configs/attnsim/tinyllama_60m_$S.yaml"
train_and_eval "$C" "tinyllama_60M_sim_$S" "$@"
