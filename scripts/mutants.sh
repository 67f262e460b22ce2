#!/usr/bin/env bash
# Mutation testing of the production code (src/ and actors/src) with cargo-mutants: each
# mutant (a small change to the code: a condition inverted, a `+` made a `-`, a function
# body replaced by a default value) is built and tested; a mutant the tests do not catch
# ("missed") is behaviour no test checks. .cargo/mutants.toml keeps the load generator,
# the tests and test-only code out. docs/testing.md ("Mutation testing") has the current
# score and the accepted survivors.
#
#   scripts/mutants.sh                      every mutant (about 2 150 listed: hours on 2 cores)
#   scripts/mutants.sh -f src/auth/check.rs some files (cargo-mutants arguments are passed
#   scripts/mutants.sh --in-diff my.diff    on: -f, -F/--re, -e, --in-diff, --list, --iterate)
#
# Each mutant is tested with the unit and integration tests of both packages except the
# two cluster tiers (the loopback tier, tests/cluster.rs and tests/cluster_log.rs, and
# tests/multihost.rs; 30-80 s a run, the multi-host tier also needs root):
# MUTANTS_TESTS=cluster adds the loopback tier, for mutants of src/cluster and
# actors/src/cluster.
#
# Environment: MUTANTS_JOBS (mutants built and tested at once, default 1),
# MUTANTS_TIMEOUT (seconds for one mutant's tests before it counts as a timeout, default
# 180), MUTANTS_BUDGET (seconds for the whole run, default none: when it runs out the
# mutants tested so far are reported, and the run fails only if one of them was missed).
#
# Exit status: 0 when no mutant was missed (timeouts are reported but do not fail: the
# tests did not pass against them), 2 when one was, other values as cargo-mutants.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-mutants >/dev/null 2>&1; then
  echo "--- installing cargo-mutants (crates.io)"
  cargo install cargo-mutants --locked --version 27.1.0
fi

# Every test target of both packages but the cluster tiers, found by file so that a new
# test file is never left out.
tiers=(cluster cluster_log multihost)
tests=(--lib --bins)
for file in tests/*.rs actors/tests/*.rs; do
  name=$(basename "$file" .rs)
  case " ${tiers[*]} " in
    *" $name "*) ;;
    *) tests+=("--test=$name") ;;
  esac
done
case "${MUTANTS_TESTS:-default}" in
  default) ;;
  cluster) tests+=(--test=cluster --test=cluster_log) ;;
  *)
    echo "MUTANTS_TESTS must be 'default' or 'cluster', not '${MUTANTS_TESTS}'" >&2
    exit 1
    ;;
esac
# The same targets for the build and the test of a mutant (-C applies to both), so that
# nothing else is built (bench's binaries depend on no production crate: built once).
cargo_args=()
for t in "${tests[@]}"; do
  cargo_args+=("--cargo-arg=$t")
done

jobs=${MUTANTS_JOBS:-1}
# One mutant at a time: its builds share one target directory across runs, so the
# dependencies are compiled once, not in every scratch copy of the tree.
if [ "$jobs" = 1 ]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/mutants}"
fi
export RUST_BACKTRACE=0
# No debug info: nobody steps through a mutant, and the dozen test binaries it links
# then build and link markedly faster.
export CARGO_PROFILE_DEV_DEBUG=0

out=target/mutants.out
budget=()
if [ -n "${MUTANTS_BUDGET:-}" ]; then
  budget=(timeout --signal=INT --kill-after=60 "$MUTANTS_BUDGET")
fi

# cargo-mutants' own baseline builds only the mutated packages, where these targets do
# not all exist (actors has no HTTP tests, bench none of these); so the same
# tests run here on the unmutated tree first, and cargo-mutants skips its baseline.
baseline=1
for arg in "$@"; do
  case "$arg" in
    --list | --list-files | --baseline=skip | --help | -h | --version | -V) baseline=0 ;;
  esac
done
skip=()
if [ "$baseline" = 1 ]; then
  echo "--- baseline: the tests pass on the unmutated tree"
  cargo test --workspace "${tests[@]}"
  skip=(--baseline=skip)
fi

started=$(mktemp)
trap 'rm -f "$started"' EXIT
status=0
"${budget[@]}" cargo mutants --workspace --test-workspace=true --jobs "$jobs" \
  --timeout "${MUTANTS_TIMEOUT:-180}" --build-timeout 900 --output target \
  "${skip[@]}" "${cargo_args[@]}" "$@" || status=$?

# --list and friends write no outcomes (an older run's may be there).
[ "$out/caught.txt" -nt "$started" ] || exit "$status"

count() { if [ -f "$out/$1.txt" ]; then grep -c . "$out/$1.txt" || true; else echo 0; fi; }
caught=$(count caught)
missed=$(count missed)
timeouts=$(count timeout)
unviable=$(count unviable)
viable=$((caught + missed + timeouts))
echo
echo "--- mutation testing summary ($out)"
echo "caught $caught, missed $missed, timeouts $timeouts, unviable $unviable"
if [ "$viable" -gt 0 ]; then
  # A timeout is a mutant the tests did not pass against: counted as caught.
  echo "score: $(((caught + timeouts) * 1000 / viable / 10)).$(((caught + timeouts) * 1000 / viable % 10)) % of $viable viable mutants caught (timeouts counted as caught)"
fi
if [ "$missed" -gt 0 ]; then
  echo "missed (no test fails with this change):"
  sed 's/^/  /' "$out/missed.txt"
fi
if [ "$timeouts" -gt 0 ]; then
  echo "timeouts:"
  sed 's/^/  /' "$out/timeout.txt"
fi
if [ "$status" = 124 ] || [ "$status" = 130 ]; then
  echo "WARNING: MUTANTS_BUDGET (${MUTANTS_BUDGET}s) ran out; the counts above are of the mutants tested until then"
  [ "$missed" -gt 0 ] && exit 2
  exit 0
fi
# cargo-mutants: 2 = missed, 3 = timeouts (also when some were missed besides).
if [ "$status" = 3 ]; then
  [ "$missed" -gt 0 ] && exit 2
  exit 0
fi
exit "$status"
