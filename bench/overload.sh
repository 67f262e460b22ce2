#!/usr/bin/env bash
# Overload: wrk with 512 connections for 30 s against the release service (embedded
# store) with MAX_PENDING_EVENTS lowered so that the bound is reached; reports how many
# requests got 503, peak RSS, and that the service answers 200 right after.
# Usage: bench/overload.sh [MAX_PENDING_EVENTS]   (default 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_PENDING=${1:-1000}
SVC=127.0.0.1:18087
command -v wrk >/dev/null || { echo "needs wrk (apt-get install -y wrk)" >&2; exit 1; }
cargo build --release -q -p iot-stream-processor
LISTEN_ADDR=$SVC MAX_PENDING_EVENTS=$MAX_PENDING RUST_LOG=warn RUST_BACKTRACE=0 target/release/iot-processor >/tmp/overload-service.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
until curl -sf "http://$SVC/ready" >/dev/null; do sleep 0.05; done
PEAK=0
( while kill -0 "$PID" 2>/dev/null; do awk '/^VmRSS/ {print $2}' "/proc/$PID/status"; sleep 0.2; done ) > /tmp/overload-rss.txt &
SAMPLER=$!
wrk -t2 -c512 -d30s --latency -s bench/overload.lua "http://$SVC" | tee /tmp/overload-wrk.txt
AFTER=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://$SVC/metric" -d '{"device_id":"after","cpu":0.5,"rps":1}')
sleep 0.5
kill "$SAMPLER" 2>/dev/null || true
PEAK=$(sort -n /tmp/overload-rss.txt | tail -1)
METRICS=$(curl -s "http://$SVC/metrics")
echo
echo "peak RSS: $((PEAK / 1024)) MB; first POST after the load: $AFTER"
echo "$METRICS" | grep -E '^(events_accepted_total|events_rejected_total\{reason="overloaded"\}|events_processed_total|pending_events) '
