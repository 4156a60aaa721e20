#!/usr/bin/env bash
# The whole meshchat test suite, from a fresh machine: installs what the tests need when it
# is missing, then builds the fuzz target and runs every test with cargo-nextest.
# README.md's test command and .ci/run both run exactly this script.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Servers started by tests and benches on free ports (Redis for membership, Redis and NATS as
# the mesh hop bench's peers).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest

# The decoder fuzz target must keep building (cargo fuzz itself needs nightly; see
# proto/fuzz/README.md). Plain cargo builds it without sanitizers, into the shared target dir.
cargo build --quiet --manifest-path proto/fuzz/Cargo.toml --target-dir target

# The Cassandra backend is compiled and unit-tested always; its contract suite needs a real
# cluster (none can be installed here) and is reported as skipped unless MESHCHAT_CQL_NODES
# points at one.
extra=()
if [ -n "${MESHCHAT_CQL_NODES:-}" ]; then
  extra+=(--run-ignored all)
else
  echo "NOTE: MESHCHAT_CQL_NODES is not set: the Cassandra contract suite is SKIPPED (listed as skipped below)"
fi
cargo nextest run --workspace --features meshchat-storage/cassandra --no-fail-fast "${extra[@]}" "$@"
