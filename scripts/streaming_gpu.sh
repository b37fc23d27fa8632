#!/usr/bin/env bash
# One command for a GPU box (the lead runs it; ~5 minutes on an H100). Needs no downloads: random weights.
#  1. the streaming test files on that box's transformers (5.17 there, 5.23 here): the HF Cache API moves fast;
#  2. CUDA: decoding latency and cache memory of 4 sinks + 1020 vs dense attention at stream positions
#     4k-64k for the paper's 60M model in bf16, and chunked prefill == token by token on the GPU kernels.
# Usage: OUT=/path bash scripts/streaming_gpu.sh     (writes $OUT/tests.txt, $OUT/streaming_speed.json)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-out/streaming_gpu}
mkdir -p "$OUT"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available())" | tee "$OUT/versions.txt"
$PY -m pytest -q tests/test_streaming.py tests/test_streaming_hf.py tests/test_streaming_io.py tests/test_llama2c.py \
    2>&1 | tail -20 | tee "$OUT/tests.txt"
$PY benchmarks/streaming_speed.py --model tinyllama_60M --device cuda --dtype bfloat16 --positions 4096,16384,65536 \
    --cache-size 1024 --chunk 2048 --steps 50 --check-tokens 400 --out "$OUT/streaming_speed.json" 2>&1 \
    | tee "$OUT/streaming_speed.txt"
