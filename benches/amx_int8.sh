#!/usr/bin/env bash
# Serving on AMX-INT8 tiles against the same build with AMX turned off (FLYWHEEL_NO_AMX=1: the
# AVX-512 VNNI kernels) and llama.cpp, on the same GGUF, same machine, same run: the int8 product
# alone at prefill and decode batch sizes, then the engine's prefill and 1/4/8/16-stream decode,
# twice each in alternation.
# llama.cpp comes from benches/llamacpp_venv.sh: on an AMX host, an AVX-512 build without its own
# AMX backend (which crashes there).
# Usage: benches/amx_int8.sh [DECODE_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
decode="${1:-64}"
bash scripts/fetch-model.sh
venv="$(bash benches/llamacpp_venv.sh)"
grep -m1 "model name" /proc/cpuinfo || true
cargo bench --bench qgemm --no-run
cargo bench --bench engine --no-run
for mode in tiles vnni; do
  echo "== int8 product, $mode"
  if [ "$mode" = vnni ]; then export FLYWHEEL_NO_AMX=1; else unset FLYWHEEL_NO_AMX; fi
  cargo bench --bench qgemm -- cached
  cargo bench --bench qgemm -- prefill
done
unset FLYWHEEL_NO_AMX
"$venv/bin/python" benches/llamacpp_bench.py models/SmolLM2-135M-Instruct.Q4_1.gguf "$decode"
for round in 1 2; do
  for mode in tiles vnni; do
    echo "== engine, $mode, round $round"
    if [ "$mode" = vnni ]; then export FLYWHEEL_NO_AMX=1; else unset FLYWHEEL_NO_AMX; fi
    cargo bench --bench engine -- --weights q8_0 --decode "$decode" --plain-only
  done
done
