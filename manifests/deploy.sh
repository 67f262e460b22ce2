#!/usr/bin/env bash
# Deploys iot-stream-processor with monitoring to the current kubectl context:
# builds the image, installs kube-prometheus-stack with Helm, creates the Redis password
# and the cluster token once, applies the manifests with kustomize and waits for the
# rollout. Idempotent: run it again after a change.
#
# Environment: IMAGE (default iot-stream-processor:latest), MONITORING_NAMESPACE
# (default monitoring), SKIP_BUILD=1 to use an image already in the cluster's registry,
# LOAD_INTO=kind|minikube to load the local image into such a cluster.
set -euo pipefail
cd "$(dirname "$0")"

IMAGE=${IMAGE:-iot-stream-processor:latest}
NS=iot-stream-processor
MON_NS=${MONITORING_NAMESPACE:-monitoring}

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' is required but not installed ($2)" >&2; exit 1; }
}
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need helm "https://helm.sh/docs/intro/install/"
kubectl cluster-info >/dev/null 2>&1 || { echo "error: kubectl cannot reach a cluster (check the current context)" >&2; exit 1; }

step() { printf '\n==> %s\n' "$*"; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step "building image $IMAGE"
  ./build-image.sh "$IMAGE"
  case "${LOAD_INTO:-}" in
    kind) need kind "https://kind.sigs.k8s.io/"; kind load docker-image "$IMAGE" ;;
    minikube) need minikube "https://minikube.sigs.k8s.io/"; minikube image load "$IMAGE" ;;
    "") ;;
    *) echo "error: LOAD_INTO must be kind or minikube" >&2; exit 1 ;;
  esac
fi

step "installing kube-prometheus-stack into namespace $MON_NS"
helm repo add prometheus-community https://prometheus-community.github.io/helm-charts >/dev/null 2>&1 || true
helm repo update prometheus-community >/dev/null
# Pick up ServiceMonitors, PrometheusRules and dashboards from every namespace.
helm upgrade --install kube-prometheus-stack prometheus-community/kube-prometheus-stack \
  --namespace "$MON_NS" --create-namespace --wait --timeout 10m \
  --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false \
  --set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false \
  --set grafana.sidecar.dashboards.enabled=true \
  --set grafana.sidecar.dashboards.searchNamespace=ALL

step "namespace, Redis password, cluster token and client tokens"
kubectl apply -f namespace.yaml
if ! kubectl -n "$NS" get secret redis-auth >/dev/null 2>&1; then
  need openssl "to generate the Redis password"
  kubectl -n "$NS" create secret generic redis-auth --from-literal=password="$(openssl rand -hex 32)"
else
  echo "secret redis-auth exists; keeping its password"
fi
# Never replaced: running pods keep the token they started with, and pods with different
# tokens refuse each other's forwarded events.
if ! kubectl -n "$NS" get secret cluster-token >/dev/null 2>&1; then
  need openssl "to generate the cluster token"
  kubectl -n "$NS" create secret generic cluster-token --from-literal=token="$(openssl rand -hex 32)"
else
  echo "secret cluster-token exists; keeping its token"
fi

# One client token to start with, shown once; the Secret holds only its sha256 digest.
if ! kubectl -n "$NS" get secret client-tokens >/dev/null 2>&1; then
  need openssl "to generate the first client token"
  CLIENT_TOKEN="iot_$(openssl rand -hex 32)"
  DIGEST=$(printf '%s' "$CLIENT_TOKEN" | openssl dgst -sha256 -r | cut -d' ' -f1)
  kubectl -n "$NS" create secret generic client-tokens \
    --from-literal=tokens="default $DIGEST * rw"
  echo "client token (shown once; send it as 'Authorization: Bearer <token>'): $CLIENT_TOKEN"
else
  echo "secret client-tokens exists; keeping its tokens"
fi

step "applying manifests"
kubectl apply -k .
kubectl -n "$NS" set image deployment/iot-processor iot-processor="$IMAGE" >/dev/null

step "waiting for rollout"
kubectl -n "$NS" rollout status deployment/redis --timeout=5m
kubectl -n "$NS" rollout status deployment/iot-processor --timeout=5m
kubectl -n "$NS" get pods,svc,hpa,ingress

cat <<TXT

Deployed. Try it:
  kubectl -n $NS port-forward svc/iot-processor-service 8080:80 &
  curl -s -X POST localhost:8080/metric -H 'Content-Type: application/json' \\
    -H "Authorization: Bearer <the client token printed above>" \\
    -d '{"device_id":"sensor-1","cpu":0.5,"rps":120}'
Grafana: kubectl -n $MON_NS port-forward svc/kube-prometheus-stack-grafana 3000:80
  (dashboard "IoT Stream Processor")
TXT
