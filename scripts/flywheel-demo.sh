#!/usr/bin/env bash
# The flywheel story on SmolLM2-135M with a synthetic agent workload and a stand-in teacher:
# drift → curate → train → evaluate → shadow → canary → champion, then the before/after table.
# Takes about 15 minutes on 2 cores. Extra arguments go to scripts/flywheel_demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
cargo build --release --quiet
python3 scripts/flywheel_demo.py "$@"
