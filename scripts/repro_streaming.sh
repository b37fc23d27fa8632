#!/usr/bin/env bash
# Streaming on our own models (issue #10, part 4; docs/streaming.md, "Our own models"): the CPU regime's default
# (configs/repro/cpu/default.yaml, seed 3406: the seed whose sink forms, in the first layer on the fixed first
# token) and its sink_token row (a learnable sink token before every sequence), both trained at context 64, then
# streamed far past that context over held-out text with eval_long_ppl.py:
#   * the default: dense, window only, 4 sinks + window (re-indexed and at original positions), LM-Infinite,
#     sliding window with recomputation; and a sinks ablation 0 / 1 / 2 / 4 in the same cache (StreamingLLM Table 2)
#   * the sink-token model: the same methods, and 0 / 1 / 4 sinks (StreamingLLM Table 3: a model pretrained with a
#     sink token needs only that token; the token is the first key of the stream, so "1 sink" keeps exactly it)
# The stream: the fixed first token (EOS, id 256, as every training sequence starts) and then the held-out
# documents of the demo corpus (the 5% that preprocess/prepare.py's holdout() keeps out of training), joined by
# blank lines. Compact records go to docs/results/streaming_cpu/repro_*.json (the doc's tables are rendered from
# them by python -m lit_gpt.doc_tables); scratch outputs (nll.pt, plots) to out/repro_streaming/.
#
#   bash scripts/repro_streaming.sh              # train both rows (about 2 x 1 min on quiet cores), then stream
#   TRAIN=0 bash scripts/repro_streaming.sh      # reuse checkpoints/streaming/cpu/<row>/final
# Knobs: TOKENS (2048 = 32 x the context), CACHE (64 keys = the training context), THREADS (1), RUNS, OUT, RECORDS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RUNS=${RUNS:-checkpoints/streaming}
OUT=${OUT:-out/repro_streaming}
REC=${RECORDS:-docs/results/streaming_cpu}
TOKENS=${TOKENS:-2048}
CACHE=${CACHE:-64}
T=${THREADS:-1}
mkdir -p "$OUT" "$REC"

if [[ ${TRAIN:-1} == 1 ]]; then
  # the rows as scripts/repro_run.py trains them (final/ checkpoint: train.save_final defaults to true); their
  # records go to $REC/repro_trained/cpu/, not over the committed ones in docs/results/repro/cpu/ (the doc checks
  # that their curves are the committed ones)
  OMP_NUM_THREADS=1 $PY scripts/repro_run.py --regime cpu default sink_token --runs "$RUNS" --results "$REC/repro_trained"
fi

# the held-out documents of the corpus the models were trained on (datasets/demo_cpu, built by repro_run.py)
$PY - "$OUT/heldout.txt" <<'PY'
import json, sys
from pathlib import Path
from preprocess.prepare import holdout
from lit_gpt.utils import atomic_write_text

src = Path("datasets/demo_cpu/stdlib_docstrings.jsonl")
docs = [json.loads(line)["text"] for line in src.read_text().splitlines() if line.strip()]
held = [d for i, d in enumerate(docs) if holdout(src.name, i, 0.05)]          # demo_corpus.build's valid_fraction
atomic_write_text(sys.argv[1], "\n\n".join(held))
print(f"held-out text: {len(held)} of {len(docs)} documents, {sum(map(len, held))} characters -> {sys.argv[1]}")
PY

common=(--text file --text-file "$OUT/heldout.txt" --first-token 256 --tokens "$TOKENS" --cache-size "$CACHE"
        --chunk "$CACHE" --bin-width "$CACHE" --plot-width 32 --threads "$T")
for row in default sink_token; do
  model="$RUNS/cpu/$row/final"
  $PY eval_long_ppl.py --model "$model" "${common[@]}" \
      --methods dense,window,sink,sink_original,lminfinite,recompute --out "$OUT/${row}_main" \
      --record "$REC/repro_${row}_main.json"
done
$PY eval_long_ppl.py --model "$RUNS/cpu/default/final" "${common[@]}" --sink-ablation 0,1,2,4 \
    --out "$OUT/default_ablation" --record "$REC/repro_default_ablation.json"
$PY eval_long_ppl.py --model "$RUNS/cpu/sink_token/final" "${common[@]}" --sink-ablation 0,1,4 \
    --out "$OUT/sink_token_ablation" --record "$REC/repro_sink_token_ablation.json"
# the rolling log-PPL plots of the two main runs, for the doc
for row in default sink_token; do cp "$OUT/${row}_main/log_ppl.png" "docs/img/repro_streaming_${row}_log_ppl.png"; done
