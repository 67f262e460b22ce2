#!/usr/bin/env bash
# Soak: MINUTES (default 10) of mixed load against the release service on Redis: ingest
# at a fixed rate, /analyze reads and /metrics scrapes in the background, and a Redis
# restart in the middle. Prints per-minute latency, errors and RSS as a Markdown table.
#
# Usage: bench/soak.sh [--write] [MINUTES] [RATE]   (defaults 10 and 2000)
#   --write, or WRITE_RESULTS=1: also replace the tracked bench/soak.md; otherwise the
#     table goes to soak.md in the run's log folder, whose path is printed.
#   SVC_PORT, REDIS_PORT: fixed ports instead of free ones.
#   READY_TIMEOUT (default 30): seconds to wait for a process to become ready.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '6,10s/^# \{0,1\}//p' "$0"; }
. bench/args.sh
bench_args "$@"
MINUTES=${POSITIONAL[0]:-10}
RATE=${POSITIONAL[1]:-2000}
((10#$MINUTES >= 1 && 10#$RATE >= 1)) || { usage >&2; exit 2; }

. bench/common.sh
need redis-server redis-cli python3 curl
if [ "$WRITE" = 1 ]; then OUT=bench/soak.md; else OUT=$BENCH_LOGS/soak.md; fi

build_release --workspace --bins
BIN=target/release

read -r FREE1 FREE2 <<<"$(free_ports 2)"
SVC=127.0.0.1:${SVC_PORT:-$FREE1}
REDIS_PORT=${REDIS_PORT:-$FREE2}
SVC_LOG=$BENCH_LOGS/service.log
REDIS_LOG=$BENCH_LOGS/redis.log
echo "bench: service $SVC, redis 127.0.0.1:$REDIS_PORT; logs in $BENCH_LOGS" >&2

start redis "$REDIS_LOG" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no
REDIS_PID=$LAST_PID
wait_ready redis "$REDIS_PID" "$REDIS_LOG" redis_ok "$REDIS_PORT"
start iot-processor "$SVC_LOG" env LISTEN_ADDR="$SVC" REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" \
  RUST_LOG=warn "$BIN/iot-processor"
SVC_PID=$LAST_PID
wait_ready iot-processor "$SVC_PID" "$SVC_LOG" http_ok "http://$SVC/ready"
rss_mb() { awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$SVC_PID/status"; }
RSS_START=$(rss_mb)

# Background readers: /analyze every 20 ms, /metrics every second; status counts to files.
READS=$BENCH_LOGS/analyze-statuses.txt
SCRAPES=$BENCH_LOGS/metrics-statuses.txt
( while true; do curl -s --max-time 5 -o /dev/null -w '%{http_code}\n' "http://$SVC/analyze?device_id=device-$((RANDOM % 1000))" >>"$READS"; sleep 0.02; done ) &
STARTED_NAMES+=(analyze-reader) STARTED_PIDS+=("$!") STARTED_LOGS+=(/dev/null)
( while true; do curl -s --max-time 5 -o /dev/null -w '%{http_code}\n' "http://$SVC/metrics" >>"$SCRAPES"; sleep 1; done ) &
STARTED_NAMES+=(metrics-reader) STARTED_PIDS+=("$!") STARTED_LOGS+=(/dev/null)

# Redis stops for 10 s halfway; the restarted one logs to the same file.
HALF=$((MINUTES * 60 / 2))
restart_redis() {
  # Sleeps run in the background so that the TERM of the cleanup is handled at once, and
  # it takes the restarted redis-server along instead of leaving it behind.
  trap 'kill $(jobs -p) 2>/dev/null; exit 0' TERM
  sleep "$HALF" & wait $!
  echo "   [$(date -u +%T)] stopping Redis for 10 s" >&2
  kill "$REDIS_PID"
  sleep 10 & wait $!
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >>"$REDIS_LOG" 2>&1 &
  echo "   [$(date -u +%T)] Redis back" >&2
  wait
}
restart_redis &
STARTED_NAMES+=(redis-restarter) STARTED_PIDS+=("$!") STARTED_LOGS+=("$REDIS_LOG")

{
  echo "| minute | req/s | p50 ms | p99 ms | max ms | failed | RSS MB |"
  echo "|---|---|---|---|---|---|---|"
} | tee "$OUT"
for m in $(seq 1 "$MINUTES"); do
  alive "$SVC_PID" || fail "iot-processor is not running (minute $m)" "$SVC_LOG"
  # Failures are what the table records (the failed column), so no minute stops the soak
  # (--min-success 0); a dead service is caught above.
  report=$("$BIN/loadtest" "http://$SVC/metric" 1 64 60s --devices 1000 --rate "$RATE" \
    --min-success 0 --json 2>>"$BENCH_LOGS/loadtest.log") ||
    fail "loadtest failed in minute $m" "$BENCH_LOGS/loadtest.log"
  line=$(python3 -c "import json,sys; d=json.load(sys.stdin); l=d['latency_ms'] or {'p50': 0, 'p99': 0, 'max': 0}; print(f\"{d['requests_per_sec']:.0f} | {l['p50']:.3f} | {l['p99']:.3f} | {l['max']:.3f} | {d['failed']}\")" <<<"$report")
  echo "| $m | $line | $(rss_mb) |" | tee -a "$OUT"
done
count() { grep -c "^$2$" "$1" || true; }
{
  echo
  echo "RSS at start $RSS_START MB, at end $(rss_mb) MB. /analyze reads: $(count "$READS" 200) × 200, $(count "$READS" 404) × 404, $(count "$READS" 503) × 503 (during the Redis restart), $(grep -cv '^\(200\|404\|503\)$' "$READS" || true) other. /metrics scrapes: $(count "$SCRAPES" 200) × 200, $(grep -cv '^200$' "$SCRAPES" || true) other."
  echo "Redis stopped for 10 s at $HALF s. $(date -u +%Y-%m-%d), $(nproc) cores, fixed rate $RATE req/s, 1000 devices."
} | tee -a "$OUT"
echo "bench: results written to $OUT" >&2
