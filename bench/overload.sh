#!/usr/bin/env bash
# Overload: wrk with 512 connections against the release service (embedded store) with
# MAX_PENDING_EVENTS lowered so that the bound is reached; reports how many requests got
# 503, peak RSS, and that the service answers 200 right after.
#
# Usage: bench/overload.sh [MAX_PENDING_EVENTS] [SECONDS]   (defaults 1000 and 30)
#   SVC_PORT: a fixed port instead of a free one.
#   READY_TIMEOUT (default 30): seconds to wait for the service to become ready.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '6,8s/^# \{0,1\}//p' "$0"; }
for arg in "$@"; do
  case $arg in
    -h | --help) usage; exit 0 ;;
    '' | *[!0-9]*) usage >&2; exit 2 ;;
  esac
done
MAX_PENDING=${1:-1000}
SECS=${2:-30}

. bench/common.sh
need wrk curl python3

build_release -p iot-stream-processor
SVC=127.0.0.1:${SVC_PORT:-$(free_ports 1)}
SVC_LOG=$BENCH_LOGS/service.log
echo "bench: service $SVC; logs in $BENCH_LOGS" >&2
start iot-processor "$SVC_LOG" env LISTEN_ADDR="$SVC" MAX_PENDING_EVENTS="$MAX_PENDING" \
  RUST_LOG=warn target/release/iot-processor
PID=$LAST_PID
wait_ready iot-processor "$PID" "$SVC_LOG" http_ok "http://$SVC/ready"

RSS_SAMPLES=$BENCH_LOGS/rss-kb.txt
( while kill -0 "$PID" 2>/dev/null; do awk '/^VmRSS/ {print $2}' "/proc/$PID/status"; sleep 0.2; done ) >"$RSS_SAMPLES" &
STARTED_NAMES+=(rss-sampler) STARTED_PIDS+=("$!") STARTED_LOGS+=(/dev/null)
SAMPLER=$!
wrk -t2 -c512 -d"${SECS}s" --latency -s bench/overload.lua "http://$SVC" | tee "$BENCH_LOGS/wrk.txt"
alive "$PID" || fail "iot-processor died under the load" "$SVC_LOG"
AFTER=$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' -X POST "http://$SVC/metric" -d '{"device_id":"after","cpu":0.5,"rps":1}')
sleep 0.5
kill "$SAMPLER" 2>/dev/null || true
PEAK=$(sort -n "$RSS_SAMPLES" | tail -1)
METRICS=$(curl -s --max-time 5 "http://$SVC/metrics")
echo
echo "peak RSS: $((PEAK / 1024)) MB; first POST after the load: $AFTER"
echo "$METRICS" | grep -E '^(events_accepted_total|events_rejected_total\{reason="overloaded"\}|events_processed_total|pending_events) '
