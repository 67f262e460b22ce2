# shellcheck shell=bash
# Helpers of the bench scripts (sourced by run.sh, soak.sh, overload.sh, cluster.sh; not
# run itself): free loopback ports, starting processes each with its own log file,
# readiness waits that are bounded and, when a process dies or never gets ready, name its
# log and show its tail, and killing everything started when the script ends. A busy port
# or a crash then stops the script within seconds, saying where to look, instead of
# waiting forever.

# One folder per run for every log (and by default the results): kept afterwards.
BENCH_LOGS=$(mktemp -d "${TMPDIR:-/tmp}/bench.XXXXXX")
# Longest wait for a process to become ready, or for the service to drain, in seconds.
READY_TIMEOUT=${READY_TIMEOUT:-30}
export RUST_BACKTRACE=0 # anyhow would capture a backtrace per error

# What was started: parallel arrays of name, pid and log file.
STARTED_NAMES=()
STARTED_PIDS=()
STARTED_LOGS=()

bench_cleanup() {
  local status=$?
  for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "bench: logs in $BENCH_LOGS" >&2
  exit "$status"
}
trap bench_cleanup EXIT

# need TOOL…: stop unless every tool is installed.
need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || {
      echo "bench: needs $tool (apt-get install -y redis-server python3 curl wrk)" >&2
      exit 1
    }
  done
}

# show_log LOG: the last lines of a log, indented, on stderr.
show_log() {
  echo "bench: log $1, last 20 lines:" >&2
  tail -n 20 "$1" 2>/dev/null | sed 's/^/  | /' >&2
}

# fail MESSAGE [LOG]: stop the script, showing the log's tail when one is given, and
# naming (with its log) any started process that has died meanwhile.
fail() {
  echo "bench: $1" >&2
  [ -n "${2:-}" ] && show_log "$2"
  local i
  for i in "${!STARTED_PIDS[@]}"; do
    if ! alive "${STARTED_PIDS[$i]}"; then
      echo "bench: ${STARTED_NAMES[$i]} (pid ${STARTED_PIDS[$i]}) is not running" >&2
      if [ "${STARTED_LOGS[$i]}" != "${2:-}" ]; then show_log "${STARTED_LOGS[$i]}"; fi
    fi
  done
  exit 1
}

# free_ports N: N distinct free loopback ports, space-separated. All are bound at once so
# they differ; another program could still take one before we bind it, and the readiness
# wait then fails fast naming the log.
free_ports() {
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$1"
}

# start NAME LOG COMMAND…: run COMMAND in the background with stdout and stderr in LOG;
# its pid is in LAST_PID.
start() {
  local name=$1 log=$2
  shift 2
  "$@" >"$log" 2>&1 &
  LAST_PID=$!
  STARTED_NAMES+=("$name")
  STARTED_PIDS+=("$LAST_PID")
  STARTED_LOGS+=("$log")
}

# alive PID: whether the process still runs (bash reaps its finished children, so an
# exited one is gone, not a zombie).
alive() { kill -0 "$1" 2>/dev/null; }

# wait_ready NAME PID LOG CHECK…: wait until CHECK succeeds, at most READY_TIMEOUT seconds;
# stop the script naming LOG if the process exits first or the time runs out.
wait_ready() {
  local name=$1 pid=$2 log=$3
  shift 3
  # SECONDS counts whole seconds, so + 1 makes the wait at least READY_TIMEOUT long.
  local deadline=$((SECONDS + READY_TIMEOUT + 1)) status=0
  until "$@" >/dev/null 2>&1; do
    if ! alive "$pid"; then
      wait "$pid" 2>/dev/null || status=$?
      fail "$name exited (status $status) before it was ready" "$log"
    fi
    if ((SECONDS >= deadline)); then
      fail "$name not ready after ${READY_TIMEOUT}s (READY_TIMEOUT)" "$log"
    fi
    sleep 0.1
  done
}

# http_ok URL: a 2xx answer within 2 s.
http_ok() { curl -sf --max-time 2 -o /dev/null "$1"; }

# redis_ok PORT: Redis answers PING on PORT.
redis_ok() { [ "$(timeout 2 redis-cli -p "$1" ping 2>/dev/null)" = PONG ]; }

# build_release CARGO-ARGS…: the release binaries, with cargo's progress on the terminal
# (a first build takes minutes; silence looked like a hang).
build_release() {
  echo "bench: cargo build --release $* (CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-all cores})" >&2
  cargo build --release "$@"
}

# cpu_ticks PID…: user + system CPU ticks (1/100 s) so far, summed.
cpu_ticks() {
  local pid sum=0
  for pid in "$@"; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$pid/stat"))); done
  echo "$sum"
}

# ctx_switches PID…: voluntary + involuntary context switches of every live thread, summed
# (the wake-ups a process pays for).
ctx_switches() {
  local pid
  for pid in "$@"; do cat "/proc/$pid/task/"*/status; done 2>/dev/null |
    awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s + 0}'
}
