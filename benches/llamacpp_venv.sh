#!/usr/bin/env bash
# Installs llama-cpp-python==0.3.36 (it builds llama.cpp: ~7 minutes on 2 cores, once) and prints
# the virtualenv's path. On a CPU with AMX tiles it is built for AVX-512 (VNNI, BF16) without
# llama.cpp's AMX backend: built natively there, 0.3.36 crashes with a segmentation fault in
# ggml_backend_amx_mul_mat on the first prompt. Elsewhere it is a native build.
set -euo pipefail
cd "$(dirname "$0")/.."
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  venv=target/llamacpp-avx512-venv
  flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  venv=target/llamacpp-venv
  flags="-DGGML_NATIVE=ON"
fi
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  CMAKE_ARGS="$flags" "$venv/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check \
    "llama-cpp-python==0.3.36" >&2
fi
echo "$venv"
