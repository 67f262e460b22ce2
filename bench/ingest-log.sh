#!/usr/bin/env bash
# The ingest log's cost and recovery: one node with INGEST_LOG=on beside one with
# INGEST_LOG=off, each on its own redis-server (so each Redis's CPU is its node's), the
# same load on both in alternating rounds; then the replay after a SIGKILL of a node
# holding 1 000 active devices.
#
# Usage: bench/ingest-log.sh [--write] [SECONDS_PER_RUN]   (default 10)
#   --write, or WRITE_RESULTS=1: also replace the tracked bench/ingest-log-results.md;
#     otherwise the table goes to the run's log folder, whose path is printed.
#   ROUNDS (default 3): alternating rounds of the throughput and fixed-rate runs.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '7,10s/^# \{0,1\}//p' "$0"; }
. bench/args.sh
bench_args "$@"
SECS=${POSITIONAL[0]:-10}
((10#$SECS >= 1)) || { usage >&2; exit 2; }
ROUNDS=${ROUNDS:-3}

. bench/common.sh
need redis-server redis-cli python3 curl
if [ "$WRITE" = 1 ]; then OUT=bench/ingest-log-results.md; else OUT=$BENCH_LOGS/ingest-log-results.md; fi
build_release --workspace --bins
BIN=target/release

read -r P_ON P_OFF R_ON R_OFF <<<"$(free_ports 4)"
declare -A ADDR=([on]=127.0.0.1:$P_ON [off]=127.0.0.1:$P_OFF) REDIS=([on]=$R_ON [off]=$R_OFF) PID=()
for mode in on off; do
  start "redis-$mode" "$BENCH_LOGS/redis-$mode.log" \
    redis-server --port "${REDIS[$mode]}" --bind 127.0.0.1 --save '' --appendonly no
  wait_ready "redis-$mode" "$LAST_PID" "$BENCH_LOGS/redis-$mode.log" redis_ok "${REDIS[$mode]}"
done

# start_node MODE: the release service with INGEST_LOG=MODE on its own Redis.
start_node() {
  local mode=$1
  start "iot-processor-$mode" "$BENCH_LOGS/service-$mode.log" env LISTEN_ADDR="${ADDR[$mode]}" \
    REDIS_URL="redis://127.0.0.1:${REDIS[$mode]}/" INGEST_LOG="$mode" RUST_LOG=warn RUST_BACKTRACE=0 \
    "$BIN/iot-processor"
  PID[$mode]=$LAST_PID
  wait_ready "iot-processor-$mode" "${PID[$mode]}" "$BENCH_LOGS/service-$mode.log" http_ok "http://${ADDR[$mode]}/ready"
}
start_node on
start_node off

redis_cpu() { timeout 5 redis-cli -p "$1" info cpu | tr -d '\r' |
  awk -F: '$1 == "used_cpu_sys" || $1 == "used_cpu_user" {s += $2} END {print s}'; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
metric() { curl -s --max-time 5 "http://$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
pending_drained() { [ "$(metric "$1" pending_events)" = 0 ]; }

# run MODE ARGS…: one load run against MODE's node; RESULT = "rps p99 svc_us redis_us failed events".
run() {
  local mode=$1 t0 r0 t1 r1 events
  shift
  alive "${PID[$mode]}" || fail "the $mode node is not running" "$BENCH_LOGS/service-$mode.log"
  t0=$(cpu_ticks "${PID[$mode]}"); r0=$(redis_cpu "${REDIS[$mode]}")
  if ! LOADTEST_JSON=$("$BIN/loadtest" "http://${ADDR[$mode]}/metric" 1 "$@" --json 2>>"$BENCH_LOGS/loadtest.log"); then
    fail "load run against the $mode node failed: ${LOADTEST_JSON:-}" "$BENCH_LOGS/service-$mode.log"
  fi
  wait_ready "iot-processor-$mode (draining)" "${PID[$mode]}" "$BENCH_LOGS/service-$mode.log" pending_drained "${ADDR[$mode]}"
  sleep 0.2
  t1=$(cpu_ticks "${PID[$mode]}"); r1=$(redis_cpu "${REDIS[$mode]}")
  events=$(json "d['successful']*d['batch']" <<<"$LOADTEST_JSON")
  RESULT="$(json "f\"{d['events_per_sec']:.0f} {d['latency_ms']['p99']:.3f}\"" <<<"$LOADTEST_JSON")"
  RESULT+=" $(python3 -c "print(f'{($t1-$t0)/100*1e6/max($events,1):.2f} {($r1-$r0)*1e6/max($events,1):.2f}')")"
  RESULT+=" $(json "d['failed']" <<<"$LOADTEST_JSON") $events"
}

# scenario NAME ARGS…: ROUNDS alternating runs on both nodes; medians in S_<mode>.
declare -A S
scenario() {
  local name=$1 mode
  shift
  declare -A rps p99 svc red
  for mode in on off; do rps[$mode]=""; p99[$mode]=""; svc[$mode]=""; red[$mode]=""; done
  for round in $(seq "$ROUNDS"); do
    for mode in on off; do
      run "$mode" "$@"
      read -r r p s d f _ <<<"$RESULT"
      [ "$f" = 0 ] || fail "$name: $f failed requests on the $mode node" "$BENCH_LOGS/service-$mode.log"
      rps[$mode]+="$r "; p99[$mode]+="$p "; svc[$mode]+="$s "; red[$mode]+="$d "
      [ "$mode" = off ] || RESULT_ON=$RESULT
    done
    echo "   $name round $round: on $RESULT_ON … off $RESULT" >&2
  done
  for mode in on off; do
    # shellcheck disable=SC2086
    S[$name.$mode]="$(median ${rps[$mode]}) $(median ${p99[$mode]}) $(median ${svc[$mode]}) $(median ${red[$mode]})"
    S[$name.$mode.all]="${rps[$mode]% }"
  done
}

echo "== single events, closed loop, 64 connections, 1000 devices" >&2
scenario max 64 "${SECS}s" --devices 1000
echo "== single events at 10 000 req/s" >&2
scenario fixed 64 "${SECS}s" --devices 1000 --rate 10000
echo "== batches of 1000 events, 8 connections" >&2
scenario batch 8 "${SECS}s" --devices 1000 --batch 1000

echo "== replay: SIGKILL of the node holding 1000 active devices, restart, time to ready" >&2
"$BIN/loadtest" "http://${ADDR[on]}/metric" 1 64 3s --devices 1000 --json >/dev/null 2>>"$BENCH_LOGS/loadtest.log"
kill -9 "${PID[on]}"; wait "${PID[on]}" 2>/dev/null || true
LOG_LEN=$(timeout 5 redis-cli -p "${REDIS[on]}" xlen ingest-log)
LOG_MEM=$(timeout 5 redis-cli -p "${REDIS[on]}" memory usage ingest-log)
T0=$(date +%s.%N)
start_node on
T1=$(date +%s.%N)
REPLAYED=$(metric "${ADDR[on]}" ingest_log_replayed_total)
REPLAY_S=$(python3 -c "print(f'{$T1-$T0:.2f}')")
echo "   $LOG_LEN entries ($LOG_MEM bytes) in the log at the kill; restart to ready $REPLAY_S s; $REPLAYED events replayed" >&2

row() { # row LABEL NAME FIELD TARGET
  local on off
  read -r -a on <<<"${S[$2.on]}"; read -r -a off <<<"${S[$2.off]}"
  echo "| $1 | ${on[$3]} | ${off[$3]} | $(python3 -c "print(f'{${on[$3]}/${off[$3]}:.2f}×  ({${on[$3]}-${off[$3]}:+.2f})')") | $4 |"
}
{
  echo "| measure | log on | log off | on / off (difference) | target |"
  echo "|---|---|---|---|---|"
  row "single events at saturation, req/s (rounds: on ${S[max.on.all]}; off ${S[max.off.all]})" max 0 "≥ 0.9×"
  row "single events at saturation, p99 ms" max 1 ""
  row "single events at saturation, service CPU µs/event" max 2 ""
  row "single events at saturation, Redis CPU µs/event" max 3 ""
  row "10 000 req/s, p99 ms" fixed 1 "< 5 ms"
  row "10 000 req/s, service CPU µs/event" fixed 2 ""
  row "10 000 req/s, Redis CPU µs/event" fixed 3 "+ ≤ 1.5 µs"
  row "batches of 1 000, events/s" batch 0 "≥ 1 000 000"
  row "batches of 1 000, Redis CPU µs/event" batch 3 ""
  echo "| replay after SIGKILL, 1 000 active devices: restart to ready | $REPLAY_S s ($REPLAYED events replayed; log $LOG_LEN entries, $LOG_MEM bytes) | | | ≤ 2 s |"
} | tee "$OUT"
echo "machine: $(nproc) cores, $(date -u +%Y-%m-%d); seconds per run: $SECS; rounds: $ROUNDS (medians)" | tee -a "$OUT"
echo "bench: results written to $OUT" >&2
