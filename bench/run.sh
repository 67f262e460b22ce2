#!/usr/bin/env bash
# The benchmark: builds the release binaries, starts redis-server, the service and the
# limit server on free loopback ports, runs every scenario, and prints a Markdown table.
#
# Usage: bench/run.sh [--write] [SECONDS_PER_RUN]   (default 10)
#   --write, or WRITE_RESULTS=1: also replace the tracked bench/results.md; otherwise the
#     table goes to results.md in the run's log folder, whose path is printed.
#   SVC_PORT, LIMIT_PORT, REDIS_PORT: fixed ports instead of free ones.
#   READY_TIMEOUT (default 30): seconds to wait for a process to become ready.
# Every process logs to its own file in one folder (printed at the end); when one dies or
# does not get ready, or a load run fails, the script stops and shows that log's tail.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '5,9s/^# \{0,1\}//p' "$0"; }
. bench/args.sh
bench_args "$@"
SECS=${POSITIONAL[0]:-10}
((10#$SECS >= 1)) || { usage >&2; exit 2; }

. bench/common.sh
need redis-server redis-cli python3 curl
if [ "$WRITE" = 1 ]; then OUT=bench/results.md; else OUT=$BENCH_LOGS/results.md; fi

build_release --workspace --bins
BIN=target/release

read -r FREE1 FREE2 FREE3 <<<"$(free_ports 3)"
SVC=127.0.0.1:${SVC_PORT:-$FREE1}
LIMIT=127.0.0.1:${LIMIT_PORT:-$FREE2}
REDIS_PORT=${REDIS_PORT:-$FREE3}
echo "bench: service $SVC, limit server $LIMIT, redis 127.0.0.1:$REDIS_PORT; logs in $BENCH_LOGS" >&2

start redis "$BENCH_LOGS/redis.log" \
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no
wait_ready redis "$LAST_PID" "$BENCH_LOGS/redis.log" redis_ok "$REDIS_PORT"

start limit-server "$BENCH_LOGS/limit-server.log" "$BIN/limit-server" "$LIMIT"
LIMIT_PID=$LAST_PID
wait_ready limit-server "$LIMIT_PID" "$BENCH_LOGS/limit-server.log" http_ok "http://$LIMIT/metric"

# start_service LOG: the release service on Redis; sets SVC_PID and SVC_LOG.
start_service() {
  SVC_LOG=$1
  start iot-processor "$SVC_LOG" env LISTEN_ADDR="$SVC" REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" \
    RUST_LOG=warn MAX_DEVICE_LABELS=100000 "$BIN/iot-processor"
  SVC_PID=$LAST_PID
  wait_ready iot-processor "$SVC_PID" "$SVC_LOG" http_ok "http://$SVC/ready"
}
start_service "$BENCH_LOGS/service.log"

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
redis_calls() {
  timeout 5 redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' |
    awk -F'[=:,]' '/^cmdstat_/ && $1 != "cmdstat_info" {s += $3} END {print s+0}'
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
metric() { curl -s --max-time 5 "http://$SVC/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

# loadtest ARGS…: one run of the load generator with --json; its report in LOADTEST_JSON,
# its progress lines in loadtest.log. A failed run (too many failed requests, by default
# more than 5 %) stops the benchmark with the failure breakdown and the logs.
loadtest() {
  local log=$BENCH_LOGS/loadtest.log
  echo "\$ loadtest $*" >>"$log"
  if ! LOADTEST_JSON=$("$BIN/loadtest" "$@" --json 2>>"$log"); then
    echo "bench: loadtest $* failed; its report:" >&2
    echo "${LOADTEST_JSON:-(none)}" >&2
    show_log "$log"
    fail "load run failed (service log: $SVC_LOG)" "$SVC_LOG"
  fi
}

# run ADDR PID [flags…]: a SECS-second run against ADDR, whose server is PID; sets RESULT to
# "rps cpu_us_per_req p50 p95 p99 max failed successful ctx_switches_per_req".
run() {
  local addr=$1 pid=$2 t0 t1 w0 w1
  shift 2
  alive "$pid" || fail "the server on $addr is not running"
  t0=$(cpu_ticks "$pid"); w0=$(ctx_switches "$pid")
  loadtest "http://$addr/metric" 1 64 "${SECS}s" "$@"
  t1=$(cpu_ticks "$pid"); w1=$(ctx_switches "$pid")
  RESULT=$(json "f\"{d['requests_per_sec']:.0f} {($t1-$t0)/100*1e6/max(d['successful'],1):.1f} {d['latency_ms']['p50']:.3f} {d['latency_ms']['p95']:.3f} {d['latency_ms']['p99']:.3f} {d['latency_ms']['max']:.3f} {d['failed']} {d['successful']} {($w1-$w0)/max(d['successful'],1):.2f}\"" <<<"$LOADTEST_JSON")
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "== 1+2. maximum throughput, closed loop, 64 connections, 1000 devices (service and limit alternating)" >&2
svc_rps=(); lim_rps=(); svc_cpu=(); lim_cpu=(); svc_p99=(); lim_p99=(); svc_csw=(); lim_csw=()
for round in 1 2 3; do
  run "$SVC" "$SVC_PID" --devices 1000
  read -r r c _ _ p99 _ _ _ w <<<"$RESULT"
  svc_rps+=("$r"); svc_cpu+=("$c"); svc_p99+=("$p99"); svc_csw+=("$w")
  run "$LIMIT" "$LIMIT_PID" --devices 1000
  read -r r c _ _ p99 _ _ _ w <<<"$RESULT"
  lim_rps+=("$r"); lim_cpu+=("$c"); lim_p99+=("$p99"); lim_csw+=("$w")
  echo "   round $round: service ${svc_rps[-1]} req/s, limit ${lim_rps[-1]} req/s" >&2
done
S_RPS=$(median "${svc_rps[@]}"); L_RPS=$(median "${lim_rps[@]}")
S_CPU=$(median "${svc_cpu[@]}"); L_CPU=$(median "${lim_cpu[@]}")
S_P99=$(median "${svc_p99[@]}"); L_P99=$(median "${lim_p99[@]}")
S_CSW=$(median "${svc_csw[@]}"); L_CSW=$(median "${lim_csw[@]}")
RATIO=$(python3 -c "print(f'{$S_RPS/$L_RPS:.2f}')")

echo "== 3+6. fixed rates" >&2
declare -A FIXED
for rate in 1000 10000; do
  c0=$(redis_calls); k0=$(metric store_keys_written_total)
  run "$SVC" "$SVC_PID" --devices 1000 --rate "$rate"
  read -r r c p50 p95 p99 max failed ok w <<<"$RESULT"
  sleep 0.1
  c1=$(redis_calls); k1=$(metric store_keys_written_total)
  per_event=$(python3 -c "print(f'{($c1-$c0)/max($ok,1):.3f}')")
  keys_per_event=$(python3 -c "print(f'{($k1-$k0)/max($ok,1):.3f}')")
  FIXED[$rate]="$p50 $p95 $p99 $max $failed $ok $per_event $c $keys_per_event $w"
  echo "   $rate req/s: p50 $p50 p95 $p95 p99 $p99 max $max ms, failed $failed, redis cmds/event $per_event" >&2
done

# Coalescing at work: the same 10 000 req/s from 10 hot devices (1 000 events/s each,
# 200 flushes/s), so most events of a device share a flush.
c0=$(redis_calls)
run "$SVC" "$SVC_PID" --devices 10 --rate 10000
read -r _ _ _ _ _ _ _ HOT_OK _ <<<"$RESULT"
sleep 0.1
c1=$(redis_calls)
HOT_CMD=$(python3 -c "print(f'{($c1-$c0)/max($HOT_OK,1):.3f}')")
echo "   10 000 req/s over 10 devices: redis cmds/event $HOT_CMD" >&2

echo "== 7. batch ingest: NDJSON batches of 1000 events over 1000 devices" >&2
keys() { metric store_keys_written_total; }
# batch_run FLAGS…: a closed-loop batch run; sets BATCH to "events/s(accepted and processed)
# keys/event p99 failed", counting until every accepted event is processed.
batch_run() {
  local k0 p0 t0 k1 p1 t1 accepted
  k0=$(keys); p0=$(metric events_processed_total); t0=$(date +%s.%N)
  loadtest "http://$SVC/metric" 1 8 "${SECS}s" --devices 1000 --batch 1000 "$@"
  wait_ready "iot-processor (draining pending events)" "$SVC_PID" "$SVC_LOG" pending_drained
  t1=$(date +%s.%N); sleep 0.1
  k1=$(keys); p1=$(metric events_processed_total)
  accepted=$(json "d['successful']*d['batch']" <<<"$LOADTEST_JSON")
  BATCH=$(python3 -c "print(f'{($p1-$p0)/($t1-$t0):.0f} {($k1-$k0)/max($p1-$p0,1):.3f} {$accepted} {$p1-$p0:.0f}')")
  BATCH="$BATCH $(json "f\"{d['latency_ms']['p99']:.2f} {d['failed']}\"" <<<"$LOADTEST_JSON")"
}
pending_drained() { [ "$(metric pending_events)" = 0 ]; }
batch_run
read -r B_EPS B_KEYS B_ACC B_PROC B_P99 B_FAIL <<<"$BATCH"
echo "   plain: $B_EPS events/s accepted and processed ($B_ACC accepted, $B_PROC processed), $B_KEYS keys/event, p99 $B_P99 ms" >&2
batch_run --gzip
read -r G_EPS G_KEYS G_ACC G_PROC G_P99 G_FAIL <<<"$BATCH"
echo "   gzip: $G_EPS events/s, $G_KEYS keys/event, p99 $G_P99 ms" >&2
HALF=$(python3 -c "print(max(1, round($B_EPS / 2 / 1000)))")
loadtest "http://$SVC/metric" 1 8 "${SECS}s" --devices 1000 --batch 1000 --rate "$HALF"
read -r H50 H99 HMAX HFAIL <<<"$(json "f\"{d['latency_ms']['p50']:.2f} {d['latency_ms']['p99']:.2f} {d['latency_ms']['max']:.2f} {d['failed']}\"" <<<"$LOADTEST_JSON")"
echo "   at $HALF batches/s: p50 $H50 ms, p99 $H99 ms" >&2

echo "== 8. anomaly stream: CPU with and without it, anomaly → SSE latency" >&2
# The load has 1 % spikes (--spike-share 0.01), so about 1 % of events are anomalies.
read -r FREE4 <<<"$(free_ports 1)"
NOSTREAM=127.0.0.1:$FREE4
# Its own ingest-log stream: two single nodes never share one (the second would wait,
# not ready, for the first's writer key).
start iot-processor-nostream "$BENCH_LOGS/service-nostream.log" env LISTEN_ADDR="$NOSTREAM" \
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/" RUST_LOG=warn MAX_DEVICE_LABELS=100000 \
  ANOMALY_STREAM_MAXLEN=0 INGEST_LOG_KEY=ingest-log-nostream "$BIN/iot-processor"
NOSTREAM_PID=$LAST_PID
wait_ready iot-processor-nostream "$NOSTREAM_PID" "$BENCH_LOGS/service-nostream.log" http_ok "http://$NOSTREAM/ready"
with_cpu=(); without_cpu=()
# Five alternating rounds: the effect is a few per cent, about the spread of three.
for round in 1 2 3 4 5; do
  run "$SVC" "$SVC_PID" --devices 1000 --rate 10000
  read -r _ c _ <<<"$RESULT"; with_cpu+=("$c")
  run "$NOSTREAM" "$NOSTREAM_PID" --devices 1000 --rate 10000
  read -r _ c _ <<<"$RESULT"; without_cpu+=("$c")
done
kill "$NOSTREAM_PID"; wait "$NOSTREAM_PID" 2>/dev/null || true
W_CPU=$(median "${with_cpu[@]}"); WO_CPU=$(median "${without_cpu[@]}")
STREAM_COST=$(python3 -c "print(f'{($W_CPU/$WO_CPU-1)*100:+.1f}')")
echo "   CPU/event with the stream $W_CPU µs, without $WO_CPU µs ($STREAM_COST %)" >&2
loadtest "http://$SVC/metric" 1 64 "${SECS}s" --devices 1000 --rate 1000 --sse-probes 100
read -r S50 S99 SMAX <<<"$(json "f\"{d['sse_ms']['p50']:.3f} {d['sse_ms']['p99']:.3f} {d['sse_ms']['max']:.3f}\"" <<<"$LOADTEST_JSON")"
echo "   anomaly → SSE: p50 $S50 ms, p99 $S99 ms" >&2

echo "== 4. event-to-visible latency at 1000 req/s" >&2
loadtest "http://$SVC/metric" 1 64 "${SECS}s" --devices 1000 --rate 1000 --visibility-probes 200
read -r V50 V99 VMAX <<<"$(json "f\"{d['visibility_ms']['p50']:.3f} {d['visibility_ms']['p99']:.3f} {d['visibility_ms']['max']:.3f}\"" <<<"$LOADTEST_JSON")"
echo "   p50 $V50 ms, p99 $V99 ms" >&2

echo "== 5. memory: 100 000 distinct devices, one event each (fresh service)" >&2
kill "$SVC_PID"; wait "$SVC_PID" 2>/dev/null || true
timeout 5 redis-cli -p "$REDIS_PORT" flushall >/dev/null
start_service "$BENCH_LOGS/service-memory.log"
RSS0=$(rss_kb "$SVC_PID")
loadtest "http://$SVC/metric" 1 64 120s --devices 100000 --requests 100000 --sequential
wait_ready "iot-processor (draining pending events)" "$SVC_PID" "$SVC_LOG" pending_drained
sleep 0.5
RSS1=$(rss_kb "$SVC_PID")
ACTORS=$(metric device_actors)
PER_DEVICE=$(python3 -c "print(f'{($RSS1-$RSS0)*1024/100000:.0f}')")
echo "   RSS $RSS0 kB → $RSS1 kB with $ACTORS device actors: $PER_DEVICE bytes/device" >&2

read -r F1_50 F1_95 F1_99 F1_MAX F1_FAIL F1_OK F1_CMD F1_CPU F1_KEYS _ <<<"${FIXED[1000]}"
read -r F10_50 F10_95 F10_99 F10_MAX F10_FAIL F10_OK F10_CMD F10_CPU F10_KEYS F10_CSW <<<"${FIXED[10000]}"
{
  echo "| scenario | result | target |"
  echo "|---|---|---|"
  echo "| 1. max throughput, POST /metric (64 conns, 1000 devices, Redis) | **$S_RPS req/s** (median of 3; ${svc_rps[*]}), $S_CPU µs CPU/request, p99 **$S_P99 ms**, $S_CSW context switches/request | p99 ≤ 3 ms |"
  echo "| 2. limit: bare hyper server, same load | $L_RPS req/s (${lim_rps[*]}), $L_CPU µs CPU/request, p99 $L_P99 ms, $L_CSW context switches/request; **service/limit = $RATIO** | ≥ 0.85 |"
  echo "| 3a. fixed 1 000 req/s | p50 $F1_50 ms, p95 $F1_95 ms, p99 **$F1_99 ms**, max $F1_MAX ms, $F1_FAIL failed of $((F1_OK+F1_FAIL)); $F1_CPU µs CPU/request | p99 < 1 ms, 0 errors |"
  echo "| 3b. fixed 10 000 req/s | p50 $F10_50 ms, p95 $F10_95 ms, p99 **$F10_99 ms**, max $F10_MAX ms, $F10_FAIL failed of $((F10_OK+F10_FAIL)); $F10_CPU µs CPU/request, $F10_CSW context switches/request | p99 < 2 ms, 0 errors |"
  echo "| 4. event → visible in /analyze (at 1 000 req/s) | p50 $V50 ms, p99 **$V99 ms**, max $VMAX ms | p99 ≤ FLUSH_INTERVAL + 5 ms = 10 ms |"
  echo "| 5. RSS per device at 100 000 devices | **$PER_DEVICE bytes** ($RSS0 → $RSS1 kB, $ACTORS live actors) | ≤ 10 KB |"
  echo "| 6. Redis commands per accepted event | 1 000 devices: **$F1_CMD** at 1 000 req/s, **$F10_CMD** at 10 000 req/s; 10 devices at 10 000 req/s: **$HOT_CMD** | ≤ 0.1 |"
  echo "| 6b. Redis keys written per event, single events, 1 000 devices | **$F1_KEYS** at 1 000 req/s, **$F10_KEYS** at 10 000 req/s | ≤ 1.05 |"
  echo "| 7a. batch: NDJSON, 1 000 events per request, 1 000 devices, 8 conns | **$B_EPS events/s accepted and processed** ($B_ACC accepted, $B_PROC processed); $B_KEYS keys/event; p99 $B_P99 ms per batch (closed loop), $B_FAIL failed | ≥ 1 000 000; keys ≤ 0.25 |"
  echo "| 7b. batch, gzip | **$G_EPS events/s** ($G_ACC accepted, $G_PROC processed); $G_KEYS keys/event; p99 $G_P99 ms, $G_FAIL failed | within 25 % of 7a |"
  echo "| 7c. batch at half of 7a ($HALF batches/s) | p50 $H50 ms, p99 **$H99 ms**, max $HMAX ms per batch, $HFAIL failed | p99 < 10 ms |"
  echo "| 8a. anomaly stream CPU cost (10 000 req/s, 1 % anomalies, median of 5 alternating) | $W_CPU µs/event with the stream, $WO_CPU µs without: **$STREAM_COST %** (${with_cpu[*]} vs ${without_cpu[*]}) | ≤ 5 % |"
  echo "| 8b. anomaly → on the SSE feed (at 1 000 req/s) | p50 $S50 ms, p99 **$S99 ms**, max $SMAX ms | p99 ≤ FLUSH_INTERVAL + 10 ms = 15 ms |"
} | tee "$OUT"
echo >&2
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(date -u +%Y-%m-%d); seconds per run: $SECS" | tee -a "$OUT"
echo "bench: results written to $OUT" >&2
