#!/usr/bin/env bash
# Soak: MINUTES (default 10) of mixed load against the release service on Redis: ingest
# at a fixed rate, /analyze reads and /metrics scrapes in the background, and a Redis
# restart in the middle. Prints per-minute latency, errors and RSS as a Markdown table
# (also written to bench/soak.md). Usage: bench/soak.sh [MINUTES] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=${1:-10}
RATE=${2:-2000}
REDIS_PORT=${REDIS_PORT:-16398}
SVC=127.0.0.1:18088
OUT=bench/soak.md
export RUST_BACKTRACE=0

cargo build --release --workspace --bins -q
BIN=target/release
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

start_redis() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.05; done
}
start_redis
LISTEN_ADDR=$SVC REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" RUST_LOG=warn "$BIN/iot-processor" >/tmp/soak-service.log 2>&1 &
SVC_PID=$!
PIDS+=("$SVC_PID")
until curl -sf "http://$SVC/ready" >/dev/null; do sleep 0.05; done
rss_mb() { awk '/^VmRSS/ {printf "%.1f", $2/1024}' "/proc/$SVC_PID/status"; }
RSS_START=$(rss_mb)

# Background readers: /analyze every 20 ms, /metrics every second; status counts to files.
READS=$(mktemp)
SCRAPES=$(mktemp)
( while true; do curl -s -o /dev/null -w '%{http_code}\n' "http://$SVC/analyze?device_id=device-$((RANDOM % 1000))" >>"$READS"; sleep 0.02; done ) &
PIDS+=("$!")
( while true; do curl -s -o /dev/null -w '%{http_code}\n' "http://$SVC/metrics" >>"$SCRAPES"; sleep 1; done ) &
PIDS+=("$!")

HALF=$(( MINUTES * 60 / 2 ))
(
  sleep "$HALF"
  echo "   [$(date -u +%T)] stopping Redis for 10 s" >&2
  kill "$REDIS_PID"; sleep 10
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
  echo "   [$(date -u +%T)] Redis back" >&2
  wait
) &
RESTARTER=$!
PIDS+=("$RESTARTER")

{
  echo "| minute | req/s | p50 ms | p99 ms | max ms | failed | RSS MB |"
  echo "|---|---|---|---|---|---|---|"
} | tee "$OUT"
for m in $(seq 1 "$MINUTES"); do
  line=$("$BIN/loadtest" "http://$SVC/metric" 1 64 60s --devices 1000 --rate "$RATE" --json 2>/dev/null |
    python3 -c "import json,sys; d=json.load(sys.stdin); l=d['latency_ms']; print(f\"{d['requests_per_sec']:.0f} | {l['p50']:.3f} | {l['p99']:.3f} | {l['max']:.3f} | {d['failed']}\")")
  echo "| $m | $line | $(rss_mb) |" | tee -a "$OUT"
done
count() { grep -c "^$2$" "$1" || true; }
{
  echo
  echo "RSS at start $RSS_START MB, at end $(rss_mb) MB. /analyze reads: $(count "$READS" 200) × 200, $(count "$READS" 404) × 404, $(count "$READS" 503) × 503 (during the Redis restart), $(grep -cv '^\(200\|404\|503\)$' "$READS" || true) other. /metrics scrapes: $(count "$SCRAPES" 200) × 200, $(grep -cv '^200$' "$SCRAPES" || true) other."
  echo "Redis stopped for 10 s at $HALF s. $(date -u +%Y-%m-%d), $(nproc) cores, fixed rate $RATE req/s, 1000 devices."
} | tee -a "$OUT"
rm -f "$READS" "$SCRAPES"
