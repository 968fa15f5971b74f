#!/usr/bin/env bash
# LoRA training throughput beside PyTorch + PEFT on the same GGUF (dequantized to f32), same
# machine, same run. Installs torch, transformers, peft and gguf into target/torch-venv (PyPI's
# torch is the CUDA build, ~4 GB; it runs on the CPU).
# Usage: benches/train.sh [STEPS] [--avx2|--no-amx]   (PyTorch f32 and bf16-autocast, then
# Flywheel f32 and auto)
# --avx2: both sides limited to what an AVX2-only CPU runs, on this host, in f32 only: PyTorch with
# ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2 and ONEDNN_MAX_CPU_ISA=AVX2 (its bf16
# autocast has no bf16 instructions to use there and runs many times slower than f32); Flywheel
# built without gemm's AVX-512 kernels (in target/avx2) and run with FLYWHEEL_NO_AVX512=1, where
# `auto` is f32.
# --no-amx: an AVX-512 host without AMX, on this one: PyTorch with ONEDNN_MAX_CPU_ISA=
# AVX512_CORE_BF16 (oneDNN keeps AVX-512 and its bf16 instructions, not the tiles), f32 and bf16
# autocast; Flywheel with FLYWHEEL_NO_AMX=1, where `auto` is f32 on gemm's AVX-512 kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-3}"
mode="${2:-}"
case "$mode" in
  "" | --avx2 | --no-amx) ;;
  *) echo "usage: benches/train.sh [STEPS] [--avx2|--no-amx]" >&2; exit 2 ;;
esac
bash scripts/fetch-model.sh
venv=target/torch-venv
if ! "$venv/bin/python" -c "import torch, peft, transformers, gguf" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers peft gguf
fi
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "$mode" = --no-amx ]; then
  grep -m1 "model name" /proc/cpuinfo || true
  echo "No AMX: PyTorch with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16; Flywheel with FLYWHEEL_NO_AMX=1"
  export ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 FLYWHEEL_NO_AMX=1
  "$venv/bin/python" benches/train_peft.py "$model" "$steps"
  "$venv/bin/python" benches/train_peft.py "$model" "$steps" --bf16
  cargo bench --bench train -- --steps "$steps" --precision auto
  exit 0
fi
if [ "$mode" = --avx2 ]; then
  grep -m1 "model name" /proc/cpuinfo || true
  echo "AVX2 only: PyTorch with ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2"
  echo "ONEDNN_MAX_CPU_ISA=AVX2; Flywheel without gemm's AVX-512 kernels, FLYWHEEL_NO_AVX512=1"
  export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
  export FLYWHEEL_NO_AVX512=1
  "$venv/bin/python" -c "import torch; print(torch.backends.cpu.get_cpu_capability())"
  "$venv/bin/python" benches/train_peft.py "$model" "$steps"
  CARGO_TARGET_DIR=target/avx2 cargo bench --no-default-features --bench train -- \
    --steps "$steps" --precision auto
  exit 0
fi
"$venv/bin/python" benches/train_peft.py "$model" "$steps"
"$venv/bin/python" benches/train_peft.py "$model" "$steps" --bf16
cargo bench --bench train -- --steps "$steps" --precision f32
cargo bench --bench train -- --steps "$steps" --precision auto
