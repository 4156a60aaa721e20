#!/usr/bin/env bash
# The whole meshchat test suite, from a fresh machine: installs what the tests need when it
# is missing, then builds the fuzz target and runs every test with cargo-nextest.
# README.md's test command and .ci/run both run exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Servers started by tests on free ports (the mesh and load-test suites need them).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest

# The decoder fuzz target must keep building (cargo fuzz itself needs nightly; see
# proto/fuzz/README.md). Plain cargo builds it without sanitizers, into the shared target dir.
cargo build --quiet --manifest-path proto/fuzz/Cargo.toml --target-dir target

cargo nextest run --workspace --no-fail-fast "$@"
