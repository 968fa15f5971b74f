#!/usr/bin/env bash
# The engine bench of an earlier revision against this checkout's, on the same machine in one run:
# prefill of a 256-token prompt and 1/4/8/16-stream decode, each build once on AMX tiles and once
# with FLYWHEEL_NO_AMX=1 (the AVX-512 VNNI kernels), alternating, ROUNDS rounds; this checkout's
# build also with FLYWHEEL_NO_AVX512=1 (the AVX2 kernels an AVX2-only CPU runs).
# The earlier revision is built in a worktree under target/ab/ (a few minutes the first time).
# Usage: benches/engine_ab.sh BEFORE_REV [ROUNDS] [DECODE_TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
before="${1:?usage: benches/engine_ab.sh BEFORE_REV [ROUNDS] [DECODE_TOKENS]}"
rounds="${2:-2}"
decode="${3:-64}"
bash scripts/fetch-model.sh
tree="target/ab/tree"
rm -rf "$tree"
git worktree prune
git worktree add --detach "$tree" "$before" >/dev/null
mkdir -p "$tree/models"
cp -n models/SmolLM2-135M-Instruct.Q4_1.gguf "$tree/models/"
bench_binary() { # the engine bench built in directory $1 with target directory $2
  (cd "$1" && CARGO_TARGET_DIR="$2" cargo bench --bench engine --no-run --message-format=json 2>/dev/null) |
    grep -o '"executable":"[^"]*engine-[^"]*"' | tail -1 | cut -d'"' -f4
}
old="$(bench_binary "$tree" "$PWD/target/ab/target")"
new="$(bench_binary . "$PWD/target")"
grep -m1 "model name" /proc/cpuinfo || true
echo "before: $(git rev-parse --short "$before"), after: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)')"
for round in $(seq "$rounds"); do
  for build in before after; do
    modes="tiles vnni avx2"
    bin="$new"
    if [ "$build" = before ]; then bin="$old" modes="tiles vnni"; fi
    for mode in $modes; do
      echo "== $build, $mode, round $round"
      unset FLYWHEEL_NO_AMX FLYWHEEL_NO_AVX512
      if [ "$mode" = vnni ]; then export FLYWHEEL_NO_AMX=1; fi
      if [ "$mode" = avx2 ]; then export FLYWHEEL_NO_AVX512=1; fi
      "$bin" --weights q8_0 --decode "$decode" --plain-only
    done
  done
done
git worktree remove --force "$tree"
