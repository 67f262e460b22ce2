#!/usr/bin/env bash
# Every test of the workspace, on a fresh machine: installs what the tests need when it
# can (as root, with apt-get), says in one line what to install when it cannot, then runs
# them with cargo-nextest when it is installed (every test binary at once, about twice as
# fast here; .config/nextest.toml runs the cluster tiers one test at a time), else with
# `cargo test --workspace`. Extra arguments are passed on, e.g. a test name filter.
set -euo pipefail
cd "$(dirname "$0")/.."

# The integration tests start a real redis-server (and use redis-cli) on free ports, also
# with TLS (tests/redis_tls.rs: Debian's redis-server and redis-cli are built with it); the
# multi-host tier (tests/multihost.rs, root only, skipped otherwise) also needs ip.
# Each entry: the command the tests run, then the package that provides it.
NEEDED=(redis-server:redis-server)
if [ "$(id -u)" = 0 ]; then
  NEEDED+=(ip:iproute2)
fi
missing=()
for entry in "${NEEDED[@]}"; do
  command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "--- installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "the tests need ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}' (or your system's equivalent) and try again" >&2
    exit 1
  fi
fi

# The multi-host tier skips without root, and its SKIPPED lines are the output of passing
# tests, which the runners do not show: say so here (docs/testing.md, "Cluster tiers").
if [ "$(id -u)" != 0 ] && [ -z "${MULTIHOST_REQUIRED:-}" ]; then
  echo "--- not root: the multi-host tier (tests/multihost.rs) will skip its tests and count them as passed"
fi

# anyhow would capture a backtrace per error; the tests do not need them.
export RUST_BACKTRACE=0
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --no-fail-fast "$@"
fi
echo "--- cargo-nextest is not installed: running cargo test (slower: one test binary at a time)"
exec cargo test --workspace "$@"
