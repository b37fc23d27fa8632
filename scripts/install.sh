#!/usr/bin/env bash
# Install what the repo needs into ./.venv (created if missing): the CPU build of torch first (so nothing pulls a
# multi-GB CUDA build), then requirements.txt and this package in editable mode. Safe to rerun: it installs only
# what is missing. On a GPU machine install torch for your CUDA version first (pytorch.org), then run this.
#   bash scripts/install.sh            # then: source .venv/bin/activate
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.5" --index-url https://download.pytorch.org/whl/cpu
fi
if ! python -c "import lit_gpt, transformers, lightning, tokenizers, sentencepiece, yaml, matplotlib, gguf, accelerate, triton" 2>/dev/null; then
  python -m pip install -q -r requirements.txt
  python -m pip install -q -e . --no-deps
fi
# the linter CI runs, at the version requirements.txt pins (also upgrades an older one in an existing .venv)
RUFF=$(grep -E '^ruff==' requirements.txt)
[ "$(python -m ruff --version 2>/dev/null)" = "ruff ${RUFF#ruff==}" ] || python -m pip install -q "$RUFF"
python -c "import torch, transformers, lightning; print(f'torch {torch.__version__}  transformers {transformers.__version__}  lightning {lightning.__version__}')"
