#!/usr/bin/env bash
# Rerecords the model-family oracle (tests/data/families) with PyTorch, transformers and PEFT.
# Installs them into target/torch-venv (shared with benches/train.sh). Not part of the test run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/torch-venv
if ! "$venv/bin/python" -c "import torch, peft, transformers, gguf, tokenizers" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers peft gguf
fi
"$venv/bin/python" scripts/record_families.py "$@"
