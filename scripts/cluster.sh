#!/usr/bin/env bash
# Three clustered nodes on this machine, sharing a redis-server of their own:
# public ports 8080, 8090, 8100; internal ports 8081, 8091, 8101. The nodes find each other
# through their heartbeats in that Redis (no peer list). Ctrl-C stops everything.
# Usage: scripts/cluster.sh [NODES]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${1:-3}
REDIS_PORT=${REDIS_PORT:-6390}
command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install -y redis-server)" >&2; exit 1; }
cargo build --release --bin iot-processor
LOGS=$(mktemp -d /tmp/iot-cluster.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$LOGS/redis.log" 2>&1 &
PIDS+=("$!")
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.05; done

TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
for i in $(seq 0 $((NODES - 1))); do
  pub=$((8080 + 10 * i)); int=$((8081 + 10 * i))
  LISTEN_ADDR=127.0.0.1:$pub REDIS_URL=redis://127.0.0.1:$REDIS_PORT/ \
    CLUSTER_ADVERTISE_ADDR=127.0.0.1:$int CLUSTER_LISTEN_ADDR=127.0.0.1:$int \
    CLUSTER_TOKEN=$TOKEN target/release/iot-processor >"$LOGS/node$i.log" 2>&1 &
  PIDS+=("$!")
done
for i in $(seq 0 $((NODES - 1))); do
  pub=$((8080 + 10 * i))
  for _ in $(seq 1 200); do
    curl -sf "http://127.0.0.1:$pub/ready" >/dev/null && break
    kill -0 "${PIDS[$((i + 1))]}" 2>/dev/null || { echo "node $i died; its log:" >&2; tail -20 "$LOGS/node$i.log" >&2; exit 1; }
    sleep 0.1
  done
done
echo "cluster of $NODES ready: public ports $(for i in $(seq 0 $((NODES - 1))); do printf '%d ' $((8080 + 10 * i)); done)(logs in $LOGS)"
echo "try: curl -s -X POST localhost:8090/metric -d '{\"device_id\":\"sensor-1\",\"cpu\":0.5,\"rps\":100}'; curl -s localhost:8080/analyze?device_id=sensor-1"
wait
