#!/usr/bin/env bash
# Download -> tokenise -> pack, as the seed's preprocess/run_preprocess.sh, plus the offline corpus.
#
#   bash preprocess/run_preprocess.sh              # sail/regmix-data-sample (The Pile domains) -> datasets/lit_dataset_regmix
#   bash preprocess/run_preprocess.sh offline      # ../shared/corpus (Gutenberg + Wikipedia)   -> datasets/shared_corpus
#
# TOKENIZER (default EleutherAI/gpt-neox-20b from the Hub, or a folder such as ../shared/tokenizers/gpt-neox-20b),
# BLOCK_SIZE (2048), WORKERS (all cores), PYTHON (python). Existing shards are never overwritten (pass OVERWRITE=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MODE=${1:-regmix}
BLOCK_SIZE=${BLOCK_SIZE:-2048}
WORKERS=${WORKERS:-0}
FLAGS=(--block_size "$BLOCK_SIZE" --workers "$WORKERS")
[ "${OVERWRITE:-0}" = 1 ] && FLAGS+=(--overwrite)
case "$MODE" in
  regmix)
    TOKENIZER=${TOKENIZER:-EleutherAI/gpt-neox-20b}
    RAW=datasets/raw/regmix-data-sample
    # the full set (about 1 TB) is sail/regmix-data
    "$PYTHON" -m preprocess.download --repo sail/regmix-data-sample --out "$RAW"
    # train/<domain>-*.jsonl(.zst) -> train_the_pile_<domain>-*.bin ; valid/... -> valid_the_pile_<domain>-*.bin
    "$PYTHON" -m preprocess.prepare --source "$RAW/train" --tokenizer "$TOKENIZER" --out datasets/lit_dataset_regmix \
      --short_name the_pile --split train "${FLAGS[@]}"
    # validation domains are small: shards of 64 chunks (the seed's chunk_size 131136 = 2049 * 64)
    "$PYTHON" -m preprocess.prepare --source "$RAW/valid" --tokenizer "$TOKENIZER" --out datasets/lit_dataset_regmix \
      --short_name the_pile --split valid --chunks_per_shard 64 "${FLAGS[@]}"
    ;;
  offline)
    SHARED=${SHARED:-../shared}
    TOKENIZER=${TOKENIZER:-$SHARED/tokenizers/gpt-neox-20b}
    # gutenberg-train-0N / wikipedia-train-00 -> train_gutenberg, train_wikipedia; *-val -> valid_*
    "$PYTHON" -m preprocess.prepare --source "$SHARED/corpus" --tokenizer "$TOKENIZER" --out datasets/shared_corpus \
      "${FLAGS[@]}"
    echo "train with: python pretrain.py --config configs/tinyllama_60m_shared_corpus.yaml"
    ;;
  *) echo "usage: run_preprocess.sh [regmix|offline]" >&2; exit 2 ;;
esac
