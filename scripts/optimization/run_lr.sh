#!/usr/bin/env bash
# bash scripts/optimization/run_lr.sh LR            LR in 1e-3 1e-4 1e-5 (configs/lr/, the seed's runs: 20k / 40k / 80k
#                                                   steps, Figure 4 right)
# bash scripts/optimization/run_lr.sh LR STEPS      a learning rate x steps pair of Table 9 (configs/lr_steps/):
#                                                   8e-4 10 | 8e-4 20 | 4e-4 20 | 2e-4 20 | 2e-4 40 | 1e-4 20 | 1e-4 80
source "$(dirname "$0")/../lib.sh"
LR=${1:?usage: run_lr.sh LR [STEPS_IN_THOUSANDS]}; shift
if [ $# -ge 1 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
  K=$1; shift
  train_and_eval "configs/lr_steps/tinyllama_60m_lr${LR}_steps${K}k.yaml" "tinyllama_60M_lr${LR}_steps${K}k" "$@"
else
  train_and_eval "configs/lr/tinyllama_60m_lr$LR.yaml" "tinyllama_60M_lr$LR" "$@"
fi
# The seed's run_lr.sh evaluates iter-020000 of every run; with a constant lr that checkpoint of a longer run is the
# 20k-step run of the same lr (Table 9's "x 20k" rows). Evaluate it too when the run went past step 20000.
if [ -f "$RUN_OUT/step-0020000/checkpoint.json" ]; then
  echo "+ $PYTHON eval_sink.py $RUN_OUT/step-0020000 --run-probe --out $RUN_OUT/sink_eval_step20000.json"
  "$PYTHON" eval_sink.py "$RUN_OUT/step-0020000" --run-probe --out "$RUN_OUT/sink_eval_step20000.json"
fi
