#!/usr/bin/env bash
# Scale-out benchmark: one node against a three-node cluster on this machine, same load,
# alternating within one run. Starts a redis-server, one standalone node, two more
# standalone nodes (with the first, the control "trio": three processes, no forwarding)
# and a three-node cluster (node-a, node-b, node-c: shards in Redis, peers found through
# their heartbeats), all on free loopback ports, and prints a Markdown table.
#
# Usage: bench/cluster.sh [--write] [SECONDS_PER_RUN]   (default 10)
#   --write, or WRITE_RESULTS=1: also replace the tracked bench/cluster-results.md;
#     otherwise the table goes to cluster-results.md in the run's log folder.
#   ROUNDS (default 3): rounds of every measurement; the order of the setups rotates.
#   READY_TIMEOUT (default 30): seconds to wait for a process to become ready (and for
#     the cluster's shards to be spread over its three nodes).
#   QUIET_TIMEOUT (default 300): before each run, wait up to this many seconds until other
#     programs use less than 0.15 of a core (0: do not wait); each run reports their share.
# Every process logs to its own file in one folder (printed at the end); when one dies or
# does not get ready, or a load run fails, the script stops and shows that log's tail.
#
# Before measuring it waits until every node answers /ready, every cluster node counts 3
# members and the cluster's shards are spread: cluster_shards_owned summed over the three
# nodes is CLUSTER_SHARDS (256) and each owns some (then, for at most READY_TIMEOUT more,
# until the counts differ by at most one; a cluster that does not get there is reported).
# Each round measures, in rotating order:
#   max throughput (closed loop, 64 connections, 1000 devices) of one node, of the three
#   standalone nodes (load spread over the three) and of the cluster (load spread over
#   its three public ports, so about two thirds of the events are forwarded);
#   a fixed 10 000 req/s on one node and spread over the cluster (latency, CPU and Redis
#   cost per event at the same load);
#   event → visible at 1 000 req/s on one node and on the cluster, where each probe posts
#   to one node and reads /analyze from the next.
# Per setup the table shows req/s (one event per request), the ratio to one node, p99,
# service CPU µs per event (/proc/PID/stat of the setup's nodes), Redis CPU µs per event
# (INFO cpu), Redis SETs and commands of any kind per event (INFO commandstats, which counts the SETs
# a script makes too) and the forwarded share (events_forwarded_total / accepted), all
# read before and after each run. Derived, paired per round, against issue #22's targets:
#   3 clustered / 1 node at saturation (≥ 0.7);
#   Redis CPU per event, cluster / one node, at 10 000 req/s (≤ 1.2);
#   extra service CPU per forwarded event, (CPU/event cluster − 1 node) / forwarded
#   share, sender and receiver together (≤ 5 µs), at saturation and at 10 000 req/s; and
#   against the trio (forwarding alone, without the cost of more processes).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '8,17s/^# \{0,1\}//p' "$0"; }
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
SHARDS=256 # CLUSTER_SHARDS, given to every cluster node

# Public addresses of every node; internal (cluster) addresses of the cluster's.
declare -A PID LOG ADDR INT
read -r P_REDIS P_ONE P_S2 P_S3 P_A P_AI P_B P_BI P_C P_CI <<<"$(free_ports 10)"
ADDR[one]=127.0.0.1:$P_ONE # the single node (also the first of the standalone trio)
ADDR[solo-2]=127.0.0.1:$P_S2 ADDR[solo-3]=127.0.0.1:$P_S3
ADDR[node-a]=127.0.0.1:$P_A ADDR[node-b]=127.0.0.1:$P_B ADDR[node-c]=127.0.0.1:$P_C
INT[node-a]=127.0.0.1:$P_AI INT[node-b]=127.0.0.1:$P_BI INT[node-c]=127.0.0.1:$P_CI
ALL_NODES=(one solo-2 solo-3 node-a node-b node-c)
CLUSTER=(node-a node-b node-c)
CL_ADDRS=("${ADDR[node-a]}" "${ADDR[node-b]}" "${ADDR[node-c]}")
REDIS_LOG=$BENCH_LOGS/redis.log
echo "bench: one node ${ADDR[one]}, standalone ${ADDR[solo-2]} ${ADDR[solo-3]}, cluster ${CL_ADDRS[*]} (internal ${INT[node-a]} ${INT[node-b]} ${INT[node-c]}), redis 127.0.0.1:$P_REDIS; logs in $BENCH_LOGS" >&2

start redis "$REDIS_LOG" \
  redis-server --port "$P_REDIS" --bind 127.0.0.1 --save '' --appendonly no
REDIS_PID=$LAST_PID
wait_ready redis "$REDIS_PID" "$REDIS_LOG" redis_ok "$P_REDIS"

# Standalone nodes use Redis database 0, the cluster database 1 (its fenced writes and
# shard table must not meet the standalone nodes' windows of the same devices).
start_node() { # NAME DB [VAR=VALUE…]
  local name=$1 db=$2
  shift 2
  LOG[$name]=$BENCH_LOGS/$name.log
  start "$name" "${LOG[$name]}" env LISTEN_ADDR="${ADDR[$name]}" REDIS_URL="redis://127.0.0.1:$P_REDIS/$db" \
    RUST_LOG=warn "$@" "$BIN/iot-processor"
  PID[$name]=$LAST_PID
}
TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
# Each standalone node has a log stream of its own (one stream per writer).
for name in one solo-2 solo-3; do start_node "$name" 0 INGEST_LOG_KEY="ingest-log-$name"; done
for name in "${CLUSTER[@]}"; do
  start_node "$name" 1 CLUSTER_ADVERTISE_ADDR="${INT[$name]}" CLUSTER_LISTEN_ADDR="${INT[$name]}" \
    CLUSTER_TOKEN="$TOKEN" CLUSTER_SHARDS="$SHARDS"
done
for name in "${ALL_NODES[@]}"; do
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
# by_label NAME ADDR…: a family's non-zero samples summed over the nodes per label set,
# on one line ("{reason="unroutable"} 3, …"; "0" when every sample is zero).
by_label() {
  local name=$1 addr
  shift
  for addr in "$@"; do curl -sf --max-time 5 "http://$addr/metrics" || true; done |
    awk -v m="$name" 'index($1, m "{") == 1 {s[substr($1, length(m) + 1)] += $NF}
      END {out = ""; for (k in s) if (s[k] != 0) out = out (out == "" ? "" : ", ") k " " s[k]; print (out == "" ? 0 : out)}'
}
log_of() {
  local name
  for name in "${!ADDR[@]}"; do [ "${ADDR[$name]}" = "$1" ] && echo "${LOG[$name]}"; done
}
# shards_owned: cluster_shards_owned of node-a, node-b and node-c, space-separated.
shards_owned() {
  local addr out=()
  for addr in "${CL_ADDRS[@]}"; do out+=("$(metric cluster_shards_owned "$addr")"); done
  echo "${out[*]}"
}
# spread: every cluster node counts 3 members, the shards owned sum to SHARDS and each
# node owns some.
spread() {
  local addr n sum=0
  for addr in "${CL_ADDRS[@]}"; do [ "$(metric cluster_members "$addr")" = 3 ] || return 1; done
  for n in $(shards_owned); do
    ((n > 0)) || return 1
    sum=$((sum + n))
  done
  ((sum == SHARDS))
}
# balanced: spread, and the counts differ by at most one (as the shard assignment promises).
balanced() {
  spread || return 1
  local counts
  read -ra counts <<<"$(shards_owned)"
  (($(printf '%s\n' "${counts[@]}" | sort -n | tail -1) - $(printf '%s\n' "${counts[@]}" | sort -n | head -1) <= 1))
}
wait_ready "cluster (3 members on every node, $SHARDS shards spread over the three)" \
  "${PID[node-a]}" "${LOG[node-a]}" spread
SHARDS_SPREAD=$(shards_owned) SPREAD_AT=$SECONDS
until balanced; do
  if ((SECONDS - SPREAD_AT >= READY_TIMEOUT)); then
    echo "bench: the cluster's shards are not balanced after ${READY_TIMEOUT}s: $(shards_owned) (node-a node-b node-c); measuring anyway" >&2
    break
  fi
  sleep 0.2
done
SHARDS_START=$(shards_owned)
HANDOFFS_START=$(metric shard_handoffs_total "${CL_ADDRS[@]}")
echo "bench: cluster ready; shards owned (node-a node-b node-c): $SHARDS_SPREAD when first spread, $SHARDS_START at the start; $HANDOFFS_START shard handoffs (in + out) so far" >&2

redis_cpu() { timeout 5 redis-cli -p "$P_REDIS" info cpu | tr -d '\r' |
  awk -F: '$1 == "used_cpu_sys" || $1 == "used_cpu_user" {s += $2} END {print s}'; }
# redis_calls: "SETS COMMANDS" executed so far (Redis counts the commands a script or a
# transaction runs too); the whole INFO commandstats goes to $CMDSTATS.
CMDSTATS=$BENCH_LOGS/commandstats.now
redis_calls() {
  timeout 5 redis-cli -p "$P_REDIS" info commandstats | tr -d '\r' | tee "$CMDSTATS" |
    awk -F'[=:,]' '$1 == "cmdstat_set" {s = $3} $1 ~ /^cmdstat_/ {a += $3} END {print s + 0, a + 0}'
}
# cmdstats_delta BEFORE AFTER EVENTS: per command, calls and Redis µs per event.
cmdstats_delta() {
  python3 - "$@" <<'PY'
import re, sys
def read(path):
    out = {}
    for line in open(path):
        m = re.match(r"cmdstat_(\w+):calls=(\d+),usec=(\d+)", line)
        if m:
            out[m[1]] = (int(m[2]), int(m[3]))
    return out
a, b, n = read(sys.argv[1]), read(sys.argv[2]), max(int(sys.argv[3]), 1)
rows = [(k, (v[0] - a.get(k, (0, 0))[0]) / n, (v[1] - a.get(k, (0, 0))[1]) / n) for k, v in b.items()]
for k, calls, usec in sorted(rows, key=lambda r: -r[2]):
    if calls > 0:
        print(f"{k:12} {calls:8.3f} calls/event {usec:7.3f} µs/event")
PY
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
    for name in "${ALL_NODES[@]}"; do show_log "${LOG[$name]}"; done
    fail "load run failed"
  fi
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)" <<<"$LOADTEST_JSON"; }


# drained ADDR…: nothing pending on any of the nodes (so a run's events are processed
# before the next one starts).
drained() { [ "$(metric pending_events "$@")" = 0 ]; }

# setup NAME: the nodes (names) of a setup and the URL list the load goes to.
declare -A NODES
NODES[one]="one" NODES[trio]="one solo-2 solo-3" NODES[cluster]="${CLUSTER[*]}"
urls() {
  local name list=""
  for name in ${NODES[$1]}; do list+="http://${ADDR[$name]}/metric,"; done
  echo "${list%,}"
}

# measure SETUP LOADTEST-ARGS…: one SECS-second run against SETUP; sets R (an associative
# array): rps ok failed p50 p95 p99 max cpu (service µs per event), redis (Redis CPU µs
# per event), sets and cmds (Redis SETs and commands of any kind per event), fwd (forwarded share),
# batch (forwarded events per forwarded request), csw (context switches of the service
# processes per event), others (cores other programs used meanwhile), why (the failed
# requests by status or error, "" when none), vis50 vis99 vismax (event → visible, when
# probed). One request is one event (POST /metric).
declare -A R
FAILURES=() # every run's failed requests, "SETUP ARGS: by status / error"
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
  cp "$CMDSTATS" "$CMDSTATS.before"
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
  R[cmds]=$(py "f'{($e1 - $e0) / $ok:.3f}'")
  { echo "$setup ${*:-(max)}:"; cmdstats_delta "$CMDSTATS.before" "$CMDSTATS" "$ok"; } >>"$BENCH_LOGS/commandstats.txt"
  R[fwd]=$(py "f'{($fw1 - $fw0) / max($acc1 - $acc0, 1):.3f}'")
  R[batch]=$(py "f'{($fw1 - $fw0) / ($fb1 - $fb0):.1f}' if $fb1 > $fb0 else '–'")
  # Cores used by other programs meanwhile (noise).
  R[others]=$(py "f'{max(0, ($b1 - $b0) - ($o1 - $o0)) / $TICK / $(json "d['duration_s']"):.2f}'")
  R[why]=$(json "', '.join([f'{k}: {v}' for k, v in d['failures']['by_status'].items()] + [f'{k}: {v}' for k, v in d['failures']['by_error'].items()])")
  if [ -n "${R[why]}" ]; then FAILURES+=("$setup ${*:-(max)}: ${R[why]}"); fi
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
# from Redis (in the cluster on the shard's owner, after a forward when it arrived at
# another node). Measured separately, so the rounds compare steady states.
declare -A WARM
for setup in one trio cluster; do
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
HANDOFFS_WARM=$(metric shard_handoffs_total "${CL_ADDRS[@]}")

SETUPS=(one trio cluster)
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS" >&2
  # Rotate the order so no setup always runs first (or right after another).
  for i in 0 1 2; do
    setup=${SETUPS[$(((i + round - 1) % 3))]}
    measure "$setup"
    keep "max.$setup" rps p99 cpu csw redis sets cmds fwd batch failed ok others
    echo "   max $setup: ${R[rps]} req/s, p99 ${R[p99]} ms, ${R[cpu]} µs CPU/event, Redis ${R[redis]} µs/event (SET ${R[sets]}, commands ${R[cmds]}), forwarded ${R[fwd]} (${R[batch]} per forward), failed ${R[failed]}${R[why]:+ (${R[why]})}, others ${R[others]} cores" >&2
  done
  order=(one cluster)
  if ((round % 2 == 0)); then order=(cluster one); fi
  for setup in "${order[@]}"; do
    measure "$setup" --rate 10000
    keep "fixed.$setup" rps cpu csw redis sets cmds fwd batch failed ok p50 p95 p99 max others
    echo "   10 000 req/s $setup: p50 ${R[p50]} p99 ${R[p99]} max ${R[max]} ms, failed ${R[failed]}${R[why]:+ (${R[why]})}, ${R[cpu]} µs CPU/event, Redis ${R[redis]} µs/event, forwarded ${R[fwd]}, others ${R[others]} cores" >&2
    measure "$setup" --rate 1000 --visibility-probes 200
    keep "vis.$setup" vis50 vis99 vismax failed others
    echo "   visible $setup: p50 ${R[vis50]} p99 ${R[vis99]} max ${R[vismax]} ms, failed ${R[failed]}, others ${R[others]} cores" >&2
  done
done

# Derived, per round (paired), then the median.
# per_round EXPR KEY…: EXPR (Python, in a, b, c: the keys' values of a round) for every
# round, space-separated; e.g. per_round 'a / b' max.cluster.rps max.one.rps.
per_round() {
  local expr=$1 out=() i k args
  shift
  local -a cols=() first vals
  for k in "$@"; do cols+=("$(list "$k")"); done
  read -ra first <<<"${cols[0]}"
  for i in "${!first[@]}"; do
    args=""
    for k in "${!cols[@]}"; do
      read -ra vals <<<"${cols[$k]}"
      args+="${vals[$i]},"
    done
    out+=("$(py "(lambda a, b=0, c=0: f'{$expr:.2f}')($args)")")
  done
  echo "${out[*]}"
}
ALL[max.one.ratio]=$(per_round 'a / b' max.one.rps max.one.rps)
ALL[max.trio.ratio]=$(per_round 'a / b' max.trio.rps max.one.rps)
ALL[max.cluster.ratio]=$(per_round 'a / b' max.cluster.rps max.one.rps)
ALL[d.redis_fixed]=$(per_round 'a / max(b, 1e-9)' fixed.cluster.redis fixed.one.redis)
ALL[d.redis_max]=$(per_round 'a / max(b, 1e-9)' max.cluster.redis max.one.redis)
ALL[d.extra_max]=$(per_round '(a - b) / max(c, 1e-9)' max.cluster.cpu max.one.cpu max.cluster.fwd)
ALL[d.extra_fixed]=$(per_round '(a - b) / max(c, 1e-9)' fixed.cluster.cpu fixed.one.cpu fixed.cluster.fwd)
ALL[d.extra_trio]=$(per_round '(a - b) / max(c, 1e-9)' max.cluster.cpu max.trio.cpu max.cluster.fwd)
# verdict VALUE OP TARGET: "meets" or "misses" issue #22's target.
verdict() { if [ "$(py "$1 $2 $3")" = True ]; then echo "meets $2 $3"; else echo "MISSES $2 $3"; fi; }

# Anything that went wrong in the cluster, from its own counters and logs.
FWD_FAIL=$(by_label forward_failures_total "${CL_ADDRS[@]}")
DUPS=$(metric events_duplicate_total "${CL_ADDRS[@]}")
EXPIRED=$(metric forwarded_batches_expired_total "${CL_ADDRS[@]}")
HANDOFFS_END=$(metric shard_handoffs_total "${CL_ADDRS[@]}")
SHARDS_END=$(shards_owned)
MEMBERS_END=$(for addr in "${CL_ADDRS[@]}"; do metric cluster_members "$addr"; done | paste -sd ' ')
ACTORS=$(for addr in "${CL_ADDRS[@]}"; do metric device_actors "$addr"; done | paste -sd ' ')
ACCEPTED=$(metric events_accepted_total "${CL_ADDRS[@]}")
PROCESSED=$(metric events_processed_total "${CL_ADDRS[@]}")
FORWARDED=$(metric events_forwarded_total "${CL_ADDRS[@]}")
RECEIVED=$(metric forwarded_events_received_total "${CL_ADDRS[@]}")
REJECTED_CL=$(by_label events_rejected_total "${CL_ADDRS[@]}")
REJECTED_SOLO=$(by_label events_rejected_total "${ADDR[one]}" "${ADDR[solo-2]}" "${ADDR[solo-3]}")
FAILED_TEXT=$(if ((${#FAILURES[@]})); then printf '%s; ' "${FAILURES[@]}" | sed 's/; $//'; else echo none; fi)
LOG_LINES=$(for name in "${ALL_NODES[@]}"; do cat "${LOG[$name]}"; done | grep -c . || true)

row() { # LABEL KEY: a max-throughput row
  echo "| $1 | **$(med "$2.rps")** ($(list "$2.rps")) | $(med "$2.ratio") ($(list "$2.ratio")) | $(med "$2.p99") | $(med "$2.cpu") ($(list "$2.cpu")) | $(med "$2.csw") | $(med "$2.redis") ($(list "$2.redis")) | $(med "$2.sets") / $(med "$2.cmds") | $(med "$2.fwd") | $(med "$2.batch") | $(list "$2.failed") | $(list "$2.others") |"
}
fixed() { # LABEL KEY
  echo "| $1 | $(med "$2.rps") | $(med "$2.p50") | $(med "$2.p95") | **$(med "$2.p99")** ($(list "$2.p99")) | $(med "$2.max") | $(list "$2.failed") | $(med "$2.cpu") ($(list "$2.cpu")) | $(med "$2.csw") | **$(med "$2.redis")** ($(list "$2.redis")) | $(med "$2.sets") / $(med "$2.cmds") | $(med "$2.fwd") | $(med "$2.batch") | $(list "$2.others") |"
}
vis() { # LABEL KEY
  echo "| $1 | $(med "$2.vis50") | **$(med "$2.vis99")** ($(list "$2.vis99")) | $(med "$2.vismax") | $(list "$2.others") |"
}
dmed() { med "d.$1"; } # the median of a derived value
{
  echo "Max throughput, closed loop, 64 connections, 1000 devices, ${SECS} s per run, median of $ROUNDS rounds (each round's value in brackets); one event per request:"
  echo
  echo "| setup | req/s | ratio to 1 node | p99 ms | service CPU µs/event | context switches/event | Redis CPU µs/event | Redis SET / all commands per event | forwarded share | events per forward | failed | others' cores |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  row "1 node" max.one
  row "3 standalone nodes (no forwarding; control)" max.trio
  row "3 clustered nodes" max.cluster
  echo
  echo "Fixed rate (64 connections, 1000 devices; the cluster's load spread over its three nodes), latency in ms:"
  echo
  echo "| 10 000 req/s | req/s | p50 | p95 | p99 | max | failed | service CPU µs/event | context switches/event | Redis CPU µs/event | Redis SET / all commands per event | forwarded share | events per forward | others' cores |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  fixed "1 node" fixed.one
  fixed "3 clustered nodes" fixed.cluster
  echo
  echo "- 3 clustered / 1 node at saturation: **$(med max.cluster.ratio)** ($(list max.cluster.ratio)); $(verdict "$(med max.cluster.ratio)" '>=' 0.7)"
  echo "- Redis CPU per event, cluster / one node, at 10 000 req/s: **$(dmed redis_fixed)** ($(list d.redis_fixed)); $(verdict "$(dmed redis_fixed)" '<=' 1.2); at saturation $(dmed redis_max) ($(list d.redis_max))"
  echo "- extra service CPU per forwarded event (sender and receiver together), (CPU/event 3 clustered − 1 node) / forwarded share: at saturation **$(dmed extra_max) µs** ($(list d.extra_max)), $(verdict "$(dmed extra_max)" '<=' 5); at 10 000 req/s **$(dmed extra_fixed) µs** ($(list d.extra_fixed)), $(verdict "$(dmed extra_fixed)" '<=' 5)"
  echo "- the same against 3 standalone nodes at saturation (forwarding alone, without the cost of more processes): $(dmed extra_trio) µs ($(list d.extra_trio))"
  echo "- events/s per core (service + Redis CPU) at saturation: 1 node $(py "f'{1e6 / ($(med max.one.cpu) + $(med max.one.redis)):.0f}'"), 3 clustered $(py "f'{1e6 / ($(med max.cluster.cpu) + $(med max.cluster.redis)):.0f}'"); Redis alone would fill its one core at $(py "f'{1e6 / max($(med max.one.redis), 1e-9):.0f}'") events/s with one node's commands, $(py "f'{1e6 / max($(med max.cluster.redis), 1e-9):.0f}'") with the cluster's"
  echo
  echo "Warm-up (first event of each of 1000 devices, sequential, 64 connections): 1 node ${WARM[one]}; 3 standalone ${WARM[trio]}; 3 clustered ${WARM[cluster]}."
  echo
  echo "| event → visible at 1 000 req/s, 200 probes | p50 ms | p99 ms | max ms | others' cores |"
  echo "|---|---|---|---|---|"
  vis "1 node" vis.one
  vis "3 clustered nodes (read from the next node)" vis.cluster
  echo
  echo "Cluster: shards owned (node-a node-b node-c) $SHARDS_SPREAD when first spread, $SHARDS_START at the start, $SHARDS_END at the end; members at the end $MEMBERS_END; shard handoffs (in + out) $HANDOFFS_START until balanced, $((HANDOFFS_WARM - HANDOFFS_START)) during the warm-up and $((HANDOFFS_END - HANDOFFS_WARM)) after it. Totals: accepted $ACCEPTED, processed $PROCESSED, forwarded $FORWARDED, received $RECEIVED, forward failures $FWD_FAIL, duplicates $DUPS, expired batches $EXPIRED, device actors $ACTORS; events rejected: cluster $REJECTED_CL, standalone $REJECTED_SOLO; failed requests $FAILED_TEXT; log lines (RUST_LOG=warn) $LOG_LINES. \"others' cores\": CPU used meanwhile by programs other than the nodes, Redis and the load generator (each round)."
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(date -u +%Y-%m-%d); seconds per run: $SECS; rounds: $ROUNDS"
} | tee "$OUT"
if [ "$LOG_LINES" != 0 ]; then
  echo "bench: the nodes logged warnings or errors:" >&2
  for name in "${ALL_NODES[@]}"; do [ -s "${LOG[$name]}" ] && show_log "${LOG[$name]}"; done
fi
echo "bench: results written to $OUT" >&2
