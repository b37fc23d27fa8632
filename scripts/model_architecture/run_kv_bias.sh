#!/usr/bin/env bash
# bash scripts/model_architecture/run_kv_bias.sh SUFFIX
#   the seed's: k_bias k_head_bias kv_bias kv_head_bias v_bias v_head_bias
#   rows the seed did not release: sink_token sink_logit;
#   Table 5 (fixed v* = m v' / m v''): k_bias_fixed_v_one_hot k_bias_fixed_v_one_hot_m5 k_bias_fixed_v_one_hot_m20
#     k_bias_fixed_v_uniform k_bias_fixed_v_uniform_m5 k_bias_fixed_v_uniform_m20;
#   Table 13 (learnable dims d_a of k*): k_bias_dims1 k_bias_dims2 k_bias_dims4 k_bias_dims8 k_bias_dims16
#     k_bias_dims32 k_bias_dims64
source "$(dirname "$0")/../lib.sh"
S=${1:?usage: run_kv_bias.sh SUFFIX (see configs/kv_bias/)}; shift
train_and_eval "configs/kv_bias/tinyllama_60m_$S.yaml" "tinyllama_60M_$S" "$@"
