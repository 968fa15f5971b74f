#!/usr/bin/env bash
# Gateway overhead vs direct vs LiteLLM's proxy, all against the same mock upstream, in one run.
# Installs litellm[proxy]==1.106.0 (the newest that resolves from PyPI today) into target/litellm-venv.
# Usage: benches/overhead.sh [SECONDS_PER_RUN] [--also-without-log]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
shift || true
venv=target/litellm-venv
if [ ! -x "$venv/bin/litellm" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "litellm[proxy]==1.106.0"
fi
cargo bench --bench gateway_overhead -- --secs "$secs" --litellm "$venv/bin/litellm" "$@"
