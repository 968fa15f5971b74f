#!/usr/bin/env bash
# Engine throughput beside llama.cpp on the same GGUF, same machine, same run.
# Installs llama-cpp-python==0.3.36 into target/llamacpp-venv (builds llama.cpp: ~6.5 min on 2 cores).
# Usage: benches/engine.sh [DECODE_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
decode="${1:-128}"
bash scripts/fetch-model.sh
venv=target/llamacpp-venv
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$venv"
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install --quiet --disable-pip-version-check "llama-cpp-python==0.3.36"
fi
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
"$venv/bin/python" benches/llamacpp_bench.py "$model" "$decode"
for w in q8_0 native f32; do
  cargo bench --bench engine -- --weights "$w" --decode "$decode"
done
