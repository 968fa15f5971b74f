#!/usr/bin/env bash
# Assembles a CUDA compiler toolchain (nvcc, cudafe++, cicc, ptxas, fatbinary, nvlink; the runtime,
# fp16/bf16 and CCCL headers) from NVIDIA's PyPI wheels, pinned by hash in scripts/cuda-toolkit.txt,
# into target/cuda-toolkit. Idempotent; never committed. Prints the CUDA_HOME to use.
set -euo pipefail
cd "$(dirname "$0")/.."
root="target/cuda-toolkit"
home="$root/nvidia/cu13"
stamp="$root/.stamp"
want="$(sha256sum scripts/cuda-toolkit.txt | cut -d' ' -f1)"
if [ -x "$home/bin/nvcc" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "$PWD/$home"
  exit 0
fi
rm -rf "$root"
mkdir -p "$root/wheels"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --require-hashes -r scripts/cuda-toolkit.txt -d "$root/wheels" >&2
python3 - "$root" <<'PY'
import pathlib, sys, zipfile
root = pathlib.Path(sys.argv[1])
for wheel in sorted((root / "wheels").glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.filename.startswith("nvidia/"):
                continue
            path = z.extract(info, root)
            # Wheels keep the executable bit in the upper bits of external_attr.
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                pathlib.Path(path).chmod(mode)
PY
chmod +x "$home"/bin/* "$home"/nvvm/bin/* 2>/dev/null || true
"$home/bin/nvcc" --version >&2
echo "$want" > "$stamp"
echo "$PWD/$home"
