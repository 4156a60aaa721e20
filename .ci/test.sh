#!/usr/bin/env bash
# The whole meshchat test suite, from a fresh machine: installs what the tests need when it
# is missing, boots a real single-node Apache Cassandra 5.0 for the Cassandra contract suite,
# then builds the fuzz target, runs the patched quinn-proto's own unit tests and every
# workspace test with cargo-nextest.
# README.md's test command and .ci/run both run exactly this script.
#
# Cassandra: unless MESHCHAT_CQL_NODES already points at a cluster, the script starts its own
# server (deploy/cassandra-dev/cassandra.sh) on free ports in a fresh temp dir, in the
# background, so its boot overlaps the build; it waits for it only right before the tests run,
# and stops exactly that server on exit. If the server cannot be fetched or does not boot, the
# script fails (it never skips the suite).
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

JDK17=/usr/lib/jvm/java-17-openjdk-amd64

# Servers started by tests and benches on free ports (Redis for membership, Redis and NATS as
# the mesh hop bench's peers), and what boots Cassandra (Maven fetches it; JDK 17 runs it).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
# The load test's partition fault puts nodes in network namespaces (`ip netns`, as root).
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
# systemd-analyze verifies the deploy kit's units (messaging/tests/deploy_kit.rs).
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ -z "${MESHCHAT_CQL_NODES:-}" ]; then
  command -v mvn >/dev/null 2>&1 || missing+=(maven)
  [ -x "$JDK17/bin/java" ] || missing+=(openjdk-17-jre-headless)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest

cass_root=""
cass_dir=""
cass_starter=""
cleanup() {
  local rc=$?
  if [ -n "$cass_root" ]; then
    # The starter writes the pid file right after it launches the JVM: wait for that (or for
    # the starter to give up) so a JVM that is still booting is stopped too.
    while [ -n "$cass_starter" ] && kill -0 "$cass_starter" 2>/dev/null &&
      [ ! -s "$cass_dir/cassandra.pid" ]; do
      sleep 0.1
    done
    [ -n "$cass_starter" ] && kill "$cass_starter" 2>/dev/null || true
    deploy/cassandra-dev/cassandra.sh stop "$cass_dir" >/dev/null 2>&1 ||
      echo "WARNING: could not stop the test Cassandra in $cass_dir" >&2
    rm -rf "$cass_root"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [ -z "${MESHCHAT_CQL_NODES:-}" ]; then
  # Jars come from Maven Central (cached in ~/.m2 and ~/.cache/meshchat-cassandra).
  if ! deploy/cassandra-dev/cassandra.sh fetch; then
    echo "FAILED: deploy/cassandra-dev/cassandra.sh fetch (see the output above); the Cassandra contract suite cannot run" >&2
    exit 1
  fi
  # A CQL port p with p+1 (storage) and p+2 (JMX) free too.
  port=""
  for _ in $(seq 1 50); do
    p=$((20000 + RANDOM % 30000))
    if port_free "$p" && port_free $((p + 1)) && port_free $((p + 2)); then
      port=$p
      break
    fi
  done
  [ -n "$port" ] || { echo "FAILED: no free port for Cassandra" >&2; exit 1; }
  cass_root=$(mktemp -d "${TMPDIR:-/tmp}/meshchat-ci-cassandra.XXXXXX")
  cass_dir="$cass_root/server"
  deploy/cassandra-dev/cassandra.sh start "$cass_dir" "$port" >"$cass_root/start.log" 2>&1 &
  cass_starter=$!
  export MESHCHAT_CQL_NODES="127.0.0.1:$port"
  echo "booting Cassandra on $MESHCHAT_CQL_NODES in the background (log: $cass_root/start.log)"
fi

# The decoder fuzz target must keep building (cargo fuzz itself needs nightly; see
# proto/fuzz/README.md). Plain cargo builds it without sanitizers, into the shared target dir.
cargo build --quiet --manifest-path proto/fuzz/Cargo.toml --target-dir target

# quinn-proto's own unit tests against meshchat's patched copy (docs/QUINN-PATCHES.md), with its
# own lock file and target dir; a debug build, so the patches' debug assertions are checked.
cargo test --locked --quiet --manifest-path vendor/quinn-proto/Cargo.toml --lib \
  --target-dir target/quinn-proto

# Build every test binary while Cassandra boots.
args=(--workspace --features meshchat-storage/cassandra)
cargo nextest run --no-run "${args[@]}" "$@"

if [ -n "$cass_starter" ]; then
  if ! wait "$cass_starter"; then
    cass_starter=""
    echo "FAILED: the test Cassandra did not boot: deploy/cassandra-dev/cassandra.sh start $cass_dir ${MESHCHAT_CQL_NODES##*:}" >&2
    cat "$cass_root/start.log" >&2
    exit 1
  fi
  cass_starter=""
  cat "$cass_root/start.log"
fi

# The Cassandra contract suite is #[ignore]d (reported as skipped by a plain `cargo test`
# without a server); here a server is always there, so every ignored test runs.
cargo nextest run "${args[@]}" --no-fail-fast --run-ignored all "$@"

# The node's tests once more with every node they start on quinn's endpoint
# (`transport.endpoint = "quinn"`, the quinn driver in messaging/src/session/mod.rs) instead of the default
# endpoint loops: the same test binaries, nothing rebuilt.
TEST_CLIENT_ENDPOINT=quinn cargo nextest run "${args[@]}" --no-fail-fast \
  -E 'package(meshchat-messaging)' "$@"
