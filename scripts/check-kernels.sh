#!/usr/bin/env bash
# Compiles every kernel in kernels/*.cu for sm_80 and sm_90 with nvcc (toolchain from
# scripts/cuda-toolkit.sh), writes the cubins under target/kernels/<arch>/, and prints ptxas's
# resource report per kernel as a Markdown table (also written to target/kernels/resources.md).
# Fails on a compile error or on any register spill.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda_home="$(bash scripts/cuda-toolkit.sh)"
out="target/kernels"
mkdir -p "$out"
table="$out/resources.md"
{
  echo "| kernel | arch | registers | spill stores (bytes) | spill loads (bytes) | stack (bytes) | shared memory (bytes) |"
  echo "|---|---|---|---|---|---|---|"
} > "$table"
spills=0
for arch in sm_80 sm_90; do
  mkdir -p "$out/$arch"
  for src in kernels/*.cu; do
    name="$(basename "$src" .cu)"
    log="$out/$arch/$name.ptxas.txt"
    if ! "$cuda_home/bin/nvcc" -cubin -arch="$arch" -O3 -Xptxas -v -I kernels \
        -o "$out/$arch/$name.cubin" "$src" > "$log" 2>&1; then
      cat "$log" >&2
      echo "check-kernels: $src does not compile for $arch" >&2
      exit 1
    fi
    # ptxas prints, per entry: "Compiling entry function 'X' for 'sm_NN'", then
    # "N bytes stack frame, S bytes spill stores, L bytes spill loads", then
    # "Used R registers, ... [M bytes smem] ...".
    awk -v arch="$arch" '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); fn = substr($0, RSTART + 1, RLENGTH - 2) }
      /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
      /Used [0-9]+ registers/ {
        match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
        smem = 0; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
        printf "| %s | %s | %s | %s | %s | %s | %s |\n", fn, arch, regs, st, ld, stack, smem
      }' "$log" | sort >> "$table"
  done
done
spills="$(awk -F'|' 'NR > 2 && ($5 + 0 > 0 || $6 + 0 > 0)' "$table" | wc -l)"
cat "$table"
if [ "$spills" -gt 0 ]; then
  echo "check-kernels: $spills kernel(s) spill registers" >&2
  exit 1
fi
