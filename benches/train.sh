#!/usr/bin/env bash
# LoRA training throughput beside PyTorch + PEFT on the same GGUF (dequantized to f32), same
# machine, same run. Installs torch, transformers, peft and gguf into target/torch-venv (PyPI's
# torch is the CUDA build, ~4 GB; it runs on the CPU).
# Usage: benches/train.sh [STEPS]   (PyTorch f32 and bf16-autocast, then Flywheel f32 and auto)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-3}"
bash scripts/fetch-model.sh
venv=target/torch-venv
if ! "$venv/bin/python" -c "import torch, peft, transformers, gguf" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers peft gguf
fi
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
"$venv/bin/python" benches/train_peft.py "$model" "$steps"
"$venv/bin/python" benches/train_peft.py "$model" "$steps" --bf16
cargo bench --bench train -- --steps "$steps" --precision f32
cargo bench --bench train -- --steps "$steps" --precision auto
