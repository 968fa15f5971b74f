#!/usr/bin/env bash
# Records llama.cpp's logprobs for the engine's token-by-token oracle test
# (tests/data/llamacpp_logprobs.json). Installs llama-cpp-python==0.3.36 into target/llamacpp-venv
# (builds llama.cpp: ~6.5 min on 2 cores) the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
venv=target/llamacpp-venv
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$venv"
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install --quiet --disable-pip-version-check "llama-cpp-python==0.3.36"
fi
"$venv/bin/python" benches/llamacpp_logprobs.py models/SmolLM2-135M-Instruct.Q4_1.gguf tests/data/llamacpp_logprobs.json
