#!/usr/bin/env bash
# Records llama.cpp's logprobs for the engine's token-by-token oracle test
# (tests/data/llamacpp_logprobs.json). Installs llama-cpp-python==0.3.36 through
# benches/llamacpp_venv.sh (builds llama.cpp once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
venv="$(bash benches/llamacpp_venv.sh)"
"$venv/bin/python" benches/llamacpp_logprobs.py models/SmolLM2-135M-Instruct.Q4_1.gguf tests/data/llamacpp_logprobs.json
