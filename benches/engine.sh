#!/usr/bin/env bash
# Engine throughput beside llama.cpp on the same GGUF, same machine, same run.
# Installs llama-cpp-python==0.3.36 through benches/llamacpp_venv.sh (builds llama.cpp once).
# Usage: benches/engine.sh [DECODE_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
decode="${1:-128}"
bash scripts/fetch-model.sh
venv="$(bash benches/llamacpp_venv.sh)"
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
"$venv/bin/python" benches/llamacpp_bench.py "$model" "$decode"
for w in q8_0 native f32; do
  cargo bench --bench engine -- --weights "$w" --decode "$decode"
done
