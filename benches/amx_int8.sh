#!/usr/bin/env bash
# Serving on AMX-INT8 tiles against the same build with AMX turned off (FLYWHEEL_NO_AMX=1: the
# AVX-512 VNNI kernels) and llama.cpp, on the same GGUF, same machine, same run: the int8 product
# alone at prefill and decode batch sizes, then the engine's prefill and 1/4/8/16-stream decode,
# twice each in alternation.
#
# llama.cpp is built for AVX-512 (VNNI, BF16) without its own AMX backend: built natively on an AMX
# Xeon (-DGGML_NATIVE=ON, as benches/engine.sh does), llama-cpp-python 0.3.36 crashes with a
# segmentation fault in ggml_backend_amx_mul_mat on the first prompt. The build takes ~7 minutes on
# 2 cores, once, into target/llamacpp-avx512-venv.
# Usage: benches/amx_int8.sh [DECODE_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
decode="${1:-64}"
bash scripts/fetch-model.sh
venv=target/llamacpp-avx512-venv
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$venv"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    "$venv/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check "llama-cpp-python==0.3.36"
fi
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
