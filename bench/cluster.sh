#!/usr/bin/env bash
# Scale-out benchmark: one node against two clustered nodes on this machine, same load,
# alternating within one run. Starts a redis-server, one standalone node, a second
# standalone node (the control: two processes, no forwarding) and a two-node cluster,
# all on free loopback ports, and prints a Markdown table.
#
# Usage: bench/cluster.sh [--write] [SECONDS_PER_RUN]   (default 10)
#   --write, or WRITE_RESULTS=1: also replace the tracked bench/cluster-results.md;
#     otherwise the table goes to cluster-results.md in the run's log folder.
#   ROUNDS (default 3): rounds of every measurement; the order of the setups rotates.
#   READY_TIMEOUT (default 30): seconds to wait for a process to become ready.
#   QUIET_TIMEOUT (default 300): before each run, wait up to this many seconds until other
#     programs use less than 0.15 of a core (0: do not wait); each run reports their share.
# Every process logs to its own file in one folder (printed at the end); when one dies or
# does not get ready, or a load run fails, the script stops and shows that log's tail.
#
# Each round measures, in rotating order:
#   max throughput (closed loop, 64 connections, 1000 devices) of one node, of two
#   standalone nodes (load spread over both) and of the two-node cluster (load spread
#   over both public ports, so about half of the events are forwarded);
#   a fixed 10 000 req/s on one node and spread over the cluster (latency);
#   event → visible at 1 000 req/s on one node and on the cluster, where each probe posts
#   to one node and reads /analyze from the other.
# CPU is read from /proc/PID/stat (the service processes) and from Redis' INFO cpu, before
# and after each run; forwarding from each node's /metrics.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '7,15s/^# \{0,1\}//p' "$0"; }
. bench/args.sh
bench_args "$@"
SECS=${POSITIONAL[0]:-10}
ROUNDS=${ROUNDS:-3}
((10#$SECS >= 1)) || { usage >&2; exit 2; }
case $ROUNDS in '' | *[!0-9]* | 0) usage >&2; exit 2 ;; esac

. bench/common.sh
need redis-server redis-cli python3 curl
if [ "$WRITE" = 1 ]; then OUT=bench/cluster-results.md; else OUT=$BENCH_LOGS/cluster-results.md; fi

build_release --workspace --bins
BIN=target/release

read -r P_REDIS P_ONE P_SOLO P_A P_AI P_B P_BI <<<"$(free_ports 7)"
ONE=127.0.0.1:$P_ONE   # the single node (also the first of the standalone pair)
SOLO=127.0.0.1:$P_SOLO # the second standalone node
A=127.0.0.1:$P_A B=127.0.0.1:$P_B
A_INT=127.0.0.1:$P_AI B_INT=127.0.0.1:$P_BI
REDIS_LOG=$BENCH_LOGS/redis.log
echo "bench: one node $ONE, second standalone $SOLO, cluster $A + $B (internal $A_INT, $B_INT), redis 127.0.0.1:$P_REDIS; logs in $BENCH_LOGS" >&2

start redis "$REDIS_LOG" \
  redis-server --port "$P_REDIS" --bind 127.0.0.1 --save '' --appendonly no
REDIS_PID=$LAST_PID
wait_ready redis "$REDIS_PID" "$REDIS_LOG" redis_ok "$P_REDIS"

# Standalone nodes use Redis database 0, the cluster database 1 (its conditional writes
# must not meet the standalone nodes' windows of the same devices).
declare -A PID LOG ADDR
start_node() { # NAME PUBLIC-ADDR DB [VAR=VALUE…]
  local name=$1 addr=$2 db=$3
  shift 3
  LOG[$name]=$BENCH_LOGS/$name.log
  start "$name" "${LOG[$name]}" env LISTEN_ADDR="$addr" REDIS_URL="redis://127.0.0.1:$P_REDIS/$db" \
    RUST_LOG=warn "$@" "$BIN/iot-processor"
  PID[$name]=$LAST_PID
}
TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
start_node one "$ONE" 0
start_node solo "$SOLO" 0
for node in a b; do
  if [ $node = a ]; then pub=$A int=$A_INT; else pub=$B int=$B_INT; fi
  start_node "node-$node" "$pub" 1 CLUSTER_PEERS="$A_INT,$B_INT" CLUSTER_ADVERTISE_ADDR="$int" \
    CLUSTER_LISTEN_ADDR="$int" CLUSTER_TOKEN="$TOKEN"
done
ADDR[one]=$ONE ADDR[solo]=$SOLO ADDR[node-a]=$A ADDR[node-b]=$B
for name in one solo node-a node-b; do
  wait_ready "$name" "${PID[$name]}" "${LOG[$name]}" http_ok "http://${ADDR[$name]}/ready"
done

# metric NAME ADDR…: the sum of a family's samples (all label sets) over the nodes.
metric() {
  local name=$1 addr sum=0 v
  shift
  for addr in "$@"; do
    v=$(curl -sf --max-time 5 "http://$addr/metrics" |
      awk -v m="$name" '$1 == m || index($1, m "{") == 1 {s += $NF} END {print s + 0}') ||
      fail "no /metrics from $addr" "$(log_of "$addr")"
    sum=$(python3 -c "print($sum + $v)")
  done
  echo "$sum"
}
log_of() {
  local name
  for name in "${!ADDR[@]}"; do [ "${ADDR[$name]}" = "$1" ] && echo "${LOG[$name]}"; done
}
two_members() { [ "$(metric cluster_members "$A")" = 2 ] && [ "$(metric cluster_members "$B")" = 2 ]; }
wait_ready "cluster (2 members on both nodes)" "${PID[node-a]}" "${LOG[node-a]}" two_members

cpu_ticks() { # PID…: user + system ticks, summed
  local pid sum=0
  for pid in "$@"; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done
  echo "$sum"
}
# ctx_switches PID…: voluntary + involuntary context switches of every thread, summed.
ctx_switches() {
  local pid
  for pid in "$@"; do cat "/proc/$pid/task/"*/status; done 2>/dev/null |
    awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s + 0}'
}
redis_cpu() { timeout 5 redis-cli -p "$P_REDIS" info cpu | tr -d '\r' |
  awk -F: '$1 == "used_cpu_sys" || $1 == "used_cpu_user" {s += $2} END {print s}'; }
# redis_calls: "SETS EVALSHAS" executed so far (Redis counts the SETs a script makes too).
redis_calls() {
  timeout 5 redis-cli -p "$P_REDIS" info commandstats | tr -d '\r' |
    awk -F'[=:,]' '$1 == "cmdstat_set" {s = $3} $1 == "cmdstat_evalsha" {e = $3} END {print s + 0, e + 0}'
}
TICK=$(getconf CLK_TCK)
busy_ticks() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
# Our own ticks: every started process, plus the finished children of this shell (the
# load generator, curl, python).
own_ticks() {
  local kids
  kids=$(awk '{print $16 + $17}' "/proc/$$/stat")
  echo $(($(cpu_ticks "${STARTED_PIDS[@]}") + kids))
}
# quiet: wait (at most QUIET_TIMEOUT seconds) until other programs (a build, say) use
# less than 0.15 of a core over a second, so they do not distort the next run.
QUIET_TIMEOUT=${QUIET_TIMEOUT:-300}
quiet() {
  local deadline=$((SECONDS + QUIET_TIMEOUT)) b0 o0 others said=0
  while ((QUIET_TIMEOUT > 0)); do
    b0=$(busy_ticks) o0=$(own_ticks)
    sleep 1
    others=$(($(busy_ticks) - b0 - ($(own_ticks) - o0)))
    ((others * 100 < 15 * TICK)) && return 0
    if ((SECONDS >= deadline)); then
      echo "bench: other programs still use $(py "f'{$others / $TICK:.2f}'") cores; measuring anyway" >&2
      return 0
    fi
    ((said)) || echo "bench: waiting for other programs to go quiet ($(py "f'{$others / $TICK:.2f}'") cores busy)…" >&2
    said=1
  done
}
py() { python3 -c "print($1)"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# loadtest ARGS…: one run of the load generator with --json; its report in LOADTEST_JSON.
# A failed run (more than 5 % failed requests) stops the benchmark with the logs.
loadtest() {
  local log=$BENCH_LOGS/loadtest.log
  echo "\$ loadtest $*" >>"$log"
  if ! LOADTEST_JSON=$("$BIN/loadtest" "$@" --json 2>>"$log"); then
    echo "bench: loadtest $* failed; its report:" >&2
    echo "${LOADTEST_JSON:-(none)}" >&2
    show_log "$log"
    for name in one solo node-a node-b; do show_log "${LOG[$name]}"; done
    fail "load run failed"
  fi
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)" <<<"$LOADTEST_JSON"; }

# drained ADDR…: nothing pending on any of the nodes (so a run's events are processed
# before the next one starts).
drained() { [ "$(metric pending_events "$@")" = 0 ]; }

# setup NAME: the nodes (names) of a setup and the URL list the load goes to.
declare -A NODES
NODES[one]="one" NODES[pair]="one solo" NODES[cluster]="node-a node-b"
urls() {
  local name list=""
  for name in ${NODES[$1]}; do list+="http://${ADDR[$name]}/metric,"; done
  echo "${list%,}"
}

# measure SETUP LOADTEST-ARGS…: one SECS-second run against SETUP; sets R (an associative
# array): rps ok failed p50 p95 p99 max cpu (service µs per request), redis (Redis CPU µs
# per request), sets and evals (Redis SETs and EVALSHAs per request), fwd (forwarded share),
# batch (forwarded events per forwarded request), csw (context switches of the service
# processes per request), others (cores
# other programs used meanwhile), vis50 vis99 vismax (event → visible, when probed).
declare -A R
measure() {
  local setup=$1 pids=() addrs=() name t0 t1 r0 r1 s0 s1 e0 e1 acc0 acc1 fw0 fw1 fb0 fb1 x0 x1 b0 b1 o0 o1
  shift
  for name in ${NODES[$setup]}; do
    alive "${PID[$name]}" || fail "$name is not running" "${LOG[$name]}"
    pids+=("${PID[$name]}")
    addrs+=("${ADDR[$name]}")
  done
  acc0=$(metric events_accepted_total "${addrs[@]}")
  fw0=$(metric events_forwarded_total "${addrs[@]}")
  fb0=$(metric forward_batch_duration_seconds_count "${addrs[@]}")
  quiet
  read -r s0 e0 <<<"$(redis_calls)"
  r0=$(redis_cpu) t0=$(cpu_ticks "${pids[@]}") x0=$(ctx_switches "${pids[@]}")
  b0=$(busy_ticks) o0=$(own_ticks)
  loadtest "$(urls "$setup")" 1 64 "${SECS}s" --devices 1000 "$@"
  t1=$(cpu_ticks "${pids[@]}") x1=$(ctx_switches "${pids[@]}")
  b1=$(busy_ticks) o1=$(own_ticks)
  wait_ready "$setup (draining)" "${pids[0]}" "${LOG[${NODES[$setup]%% *}]}" drained "${addrs[@]}"
  sleep 0.1 # the last flush
  r1=$(redis_cpu)
  read -r s1 e1 <<<"$(redis_calls)"
  acc1=$(metric events_accepted_total "${addrs[@]}")
  fw1=$(metric events_forwarded_total "${addrs[@]}")
  fb1=$(metric forward_batch_duration_seconds_count "${addrs[@]}")
  R=()
  read -r 'R[rps]' 'R[ok]' 'R[failed]' 'R[p50]' 'R[p95]' 'R[p99]' 'R[max]' <<<"$(json "f\"{d['requests_per_sec']:.0f} {d['successful']} {d['failed']} {d['latency_ms']['p50']:.3f} {d['latency_ms']['p95']:.3f} {d['latency_ms']['p99']:.3f} {d['latency_ms']['max']:.3f}\"")"
  local ok=$((R[ok] > 0 ? R[ok] : 1))
  R[cpu]=$(py "f'{($t1 - $t0) / $TICK * 1e6 / $ok:.2f}'")
  R[csw]=$(py "f'{($x1 - $x0) / $ok:.2f}'")
  R[redis]=$(py "f'{($r1 - $r0) * 1e6 / $ok:.2f}'")
  R[sets]=$(py "f'{($s1 - $s0) / $ok:.3f}'")
  R[evals]=$(py "f'{($e1 - $e0) / $ok:.3f}'")
  R[fwd]=$(py "f'{($fw1 - $fw0) / max($acc1 - $acc0, 1):.3f}'")
  R[batch]=$(py "f'{($fw1 - $fw0) / ($fb1 - $fb0):.1f}' if $fb1 > $fb0 else '–'")
  # Cores used by other programs meanwhile (noise).
  R[others]=$(py "f'{max(0, ($b1 - $b0) - ($o1 - $o0)) / $TICK / $(json "d['duration_s']"):.2f}'")
  if [ "$(json "'visibility_ms' in d")" = True ]; then
    read -r 'R[vis50]' 'R[vis99]' 'R[vismax]' <<<"$(json "f\"{d['visibility_ms']['p50']:.3f} {d['visibility_ms']['p99']:.3f} {d['visibility_ms']['max']:.3f}\"")"
  fi
}

# Results per round, as space-separated lists keyed "scenario.setup.field".
declare -A ALL
keep() { # KEY FIELD…: append R's fields to ALL[KEY.FIELD]
  local key=$1 f
  shift
  for f in "$@"; do ALL[$key.$f]+="${R[$f]} "; done
}
med() { # KEY.FIELD: the median over the rounds
  local values
  read -ra values <<<"${ALL[$1]}"
  median "${values[@]}"
}
list() { echo "${ALL[$1]% }"; } # KEY.FIELD: every round's value

# Warm-up: the first event of each device starts its actor, which restores its window
# (and, in the cluster, asks the other node to release it first). Measured separately,
# so the rounds compare steady states.
declare -A WARM
for setup in one pair cluster; do
  quiet
  loadtest "$(urls "$setup")" 1 64 60s --devices 1000 --requests 1000 --sequential
  WARM[$setup]=$(json "f\"{d['duration_s'] * 1000:.0f} ms, p99 {d['latency_ms']['p99']:.3f} ms, max {d['latency_ms']['max']:.3f} ms\"")
  for k in $(seq 0 15); do # the visibility probes' devices
    curl -sf --max-time 5 -o /dev/null -X POST "http://${ADDR[${NODES[$setup]%% *}]}/metric" \
      -d "{\"device_id\":\"visibility-$k\",\"cpu\":0.5,\"rps\":1}" ||
      fail "warm-up POST to $setup failed" "${LOG[${NODES[$setup]%% *}]}"
  done
  echo "   warm-up $setup (1000 devices, one event each): ${WARM[$setup]}" >&2
done
sleep 1 # the visibility devices' handoffs follow their 200
HANDOFFS_WARM=$(metric device_handoffs_total "$A" "$B")

SETUPS=(one pair cluster)
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS" >&2
  # Rotate the order so no setup always runs first (or right after another).
  for i in 0 1 2; do
    setup=${SETUPS[$(((i + round - 1) % 3))]}
    measure "$setup"
    keep "max.$setup" rps cpu csw redis sets evals fwd batch failed ok others
    echo "   max $setup: ${R[rps]} req/s, ${R[cpu]} µs CPU/request, Redis ${R[redis]} µs/request, forwarded ${R[fwd]} (${R[batch]} per forward), failed ${R[failed]}, others ${R[others]} cores" >&2
  done
  order=(one cluster)
  if ((round % 2 == 0)); then order=(cluster one); fi
  for setup in "${order[@]}"; do
    measure "$setup" --rate 10000
    keep "fixed.$setup" rps cpu csw redis fwd batch failed ok p50 p95 p99 max others
    echo "   10 000 req/s $setup: p50 ${R[p50]} p99 ${R[p99]} max ${R[max]} ms, failed ${R[failed]}, ${R[cpu]} µs CPU/request, others ${R[others]} cores" >&2
    measure "$setup" --rate 1000 --visibility-probes 200
    keep "vis.$setup" vis50 vis99 vismax failed others
    echo "   visible $setup: p50 ${R[vis50]} p99 ${R[vis99]} max ${R[vismax]} ms, others ${R[others]} cores" >&2
  done
done

# Derived, per round (paired), then the median.
read -ra ONE_RPS <<<"$(list max.one.rps)"
read -ra CL_RPS <<<"$(list max.cluster.rps)"
read -ra ONE_CPU <<<"$(list max.one.cpu)"
read -ra PAIR_CPU <<<"$(list max.pair.cpu)"
read -ra CL_CPU <<<"$(list max.cluster.cpu)"
read -ra CL_FWD <<<"$(list max.cluster.fwd)"
ratio=() extra=() extra_pair=()
for i in "${!ONE_RPS[@]}"; do
  ratio+=("$(py "f'{${CL_RPS[$i]} / ${ONE_RPS[$i]}:.2f}'")")
  extra+=("$(py "f'{(${CL_CPU[$i]} - ${ONE_CPU[$i]}) / max(${CL_FWD[$i]}, 1e-9):.2f}'")")
  extra_pair+=("$(py "f'{(${CL_CPU[$i]} - ${PAIR_CPU[$i]}) / max(${CL_FWD[$i]}, 1e-9):.2f}'")")
done

# Anything that went wrong in the cluster, from its own counters and logs.
FWD_FAIL=$(metric forward_failures_total "$A" "$B")
DUPS=$(metric events_duplicate_total "$A" "$B")
HANDOFFS=$(($(metric device_handoffs_total "$A" "$B") - HANDOFFS_WARM))
ACTORS_A=$(metric device_actors "$A") ACTORS_B=$(metric device_actors "$B")
ACCEPTED=$(metric events_accepted_total "$A" "$B")
PROCESSED=$(metric events_processed_total "$A" "$B")
REJECTED=$(metric events_rejected_total "$A" "$B" "$ONE" "$SOLO")
LOG_LINES=$(cat "${LOG[node-a]}" "${LOG[node-b]}" "${LOG[one]}" "${LOG[solo]}" | grep -c . || true)

row() { # LABEL KEY: a max-throughput row
  echo "| $1 | **$(med "$2.rps")** ($(list "$2.rps")) | $(med "$2.cpu") ($(list "$2.cpu")) | $(med "$2.csw") | $(med "$2.redis") | $(med "$2.sets") / $(med "$2.evals") | $(med "$2.fwd") | $(med "$2.batch") | $(list "$2.failed") | $(list "$2.others") |"
}
fixed() { # LABEL KEY
  echo "| $1 | $(med "$2.rps") | $(med "$2.p50") | $(med "$2.p95") | **$(med "$2.p99")** ($(list "$2.p99")) | $(med "$2.max") | $(list "$2.failed") | $(med "$2.cpu") | $(med "$2.csw") | $(med "$2.fwd") | $(med "$2.batch") | $(list "$2.others") |"
}
vis() { # LABEL KEY
  echo "| $1 | $(med "$2.vis50") | **$(med "$2.vis99")** ($(list "$2.vis99")) | $(med "$2.vismax") | $(list "$2.others") |"
}
{
  echo "Max throughput, closed loop, 64 connections, 1000 devices, ${SECS} s per run, median of $ROUNDS rounds (each round's value in brackets):"
  echo
  echo "| setup | req/s | service CPU µs/request | context switches/request | Redis CPU µs/request | Redis SET / EVALSHA per request | forwarded share | events per forward | failed | others' cores |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  row "1 node" max.one
  row "2 standalone nodes (no forwarding; control)" max.pair
  row "2 clustered nodes" max.cluster
  echo
  echo "- two clustered / one: **$(median "${ratio[@]}")** (${ratio[*]})"
  echo "- extra CPU per forwarded event, (CPU/event 2 clustered − 1 node) / forwarded share: **$(median "${extra[@]}") µs** (${extra[*]})"
  echo "- the same against 2 standalone nodes (forwarding alone, without the cost of a second process): **$(median "${extra_pair[@]}") µs** (${extra_pair[*]})"
  echo "- events/s per core (service + Redis CPU): 1 node $(py "f'{1e6 / ($(med max.one.cpu) + $(med max.one.redis)):.0f}'"), 2 clustered $(py "f'{1e6 / ($(med max.cluster.cpu) + $(med max.cluster.redis)):.0f}'"); Redis alone would fill its one core at $(py "f'{1e6 / $(med max.one.redis):.0f}'") events/s with SETs, $(py "f'{1e6 / $(med max.cluster.redis):.0f}'") with the cluster's EVALSHA"
  echo
  echo "Fixed rates (64 connections, 1000 devices; the cluster's load spread over both nodes), latency in ms:"
  echo
  echo "| 10 000 req/s | req/s | p50 | p95 | p99 | max | failed | service CPU µs/request | context switches/request | forwarded share | events per forward | others' cores |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  fixed "1 node" fixed.one
  fixed "2 clustered nodes" fixed.cluster
  echo
  echo "Warm-up (first event of each of 1000 devices, sequential, 64 connections): 1 node ${WARM[one]}; 2 standalone ${WARM[pair]}; 2 clustered ${WARM[cluster]}."
  echo
  echo "| event → visible at 1 000 req/s, 200 probes | p50 ms | p99 ms | max ms | others' cores |"
  echo "|---|---|---|---|---|"
  vis "1 node" vis.one
  vis "2 clustered nodes (read from the other node)" vis.cluster
  echo
  echo "Cluster totals: accepted $ACCEPTED, processed $PROCESSED, forward failures $FWD_FAIL, duplicates $DUPS, device handoffs (in + out) $HANDOFFS_WARM during the warm-up and $HANDOFFS after it, device actors $ACTORS_A + $ACTORS_B; events rejected on all nodes $REJECTED; log lines (RUST_LOG=warn) $LOG_LINES. \"others' cores\": CPU used meanwhile by programs other than the nodes, Redis and the load generator (each round)."
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(date -u +%Y-%m-%d); seconds per run: $SECS; rounds: $ROUNDS"
} | tee "$OUT"
if [ "$LOG_LINES" != 0 ]; then
  echo "bench: the nodes logged warnings or errors:" >&2
  for name in one solo node-a node-b; do [ -s "${LOG[$name]}" ] && show_log "${LOG[$name]}"; done
fi
echo "bench: results written to $OUT" >&2
