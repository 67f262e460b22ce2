# Deploys iot-stream-processor with monitoring to the current kubectl context (Windows).
# The same steps as deploy.sh: build the image, install kube-prometheus-stack with Helm,
# create the Redis password and the cluster token once, apply the manifests with
# kustomize, wait for rollout.
# Idempotent. Parameters mirror deploy.sh's environment variables.
[CmdletBinding()]
param(
    [string]$Image = "iot-stream-processor:latest",
    [string]$MonitoringNamespace = "monitoring",
    [switch]$SkipBuild,
    [ValidateSet("", "kind", "minikube")][string]$LoadInto = ""
)
$ErrorActionPreference = "Stop"
Set-Location -Path $PSScriptRoot
$Namespace = "iot-stream-processor"

function Require-Tool([string]$Name, [string]$Hint) {
    if (-not (Get-Command $Name -ErrorAction SilentlyContinue)) {
        throw "'$Name' is required but not installed ($Hint)"
    }
}
function Step([string]$Text) { Write-Host "`n==> $Text" -ForegroundColor Cyan }
function Invoke-Checked([scriptblock]$Block) {
    & $Block
    if ($LASTEXITCODE -ne 0) { throw "command failed with exit code ${LASTEXITCODE}: $Block" }
}

Require-Tool kubectl "https://kubernetes.io/docs/tasks/tools/"
Require-Tool helm "https://helm.sh/docs/intro/install/"
kubectl cluster-info *> $null
if ($LASTEXITCODE -ne 0) { throw "kubectl cannot reach a cluster (check the current context)" }

if (-not $SkipBuild) {
    Step "building image $Image"
    $engine = if (Get-Command podman -ErrorAction SilentlyContinue) { "podman" }
              elseif (Get-Command docker -ErrorAction SilentlyContinue) { "docker" }
              else { throw "neither podman nor docker is installed" }
    Invoke-Checked { & $engine build -f ..\Containerfile -t $Image .. }
    switch ($LoadInto) {
        "kind" { Require-Tool kind "https://kind.sigs.k8s.io/"; Invoke-Checked { kind load docker-image $Image } }
        "minikube" { Require-Tool minikube "https://minikube.sigs.k8s.io/"; Invoke-Checked { minikube image load $Image } }
    }
}

Step "installing kube-prometheus-stack into namespace $MonitoringNamespace"
helm repo add prometheus-community https://prometheus-community.github.io/helm-charts *> $null
Invoke-Checked { helm repo update prometheus-community }
Invoke-Checked {
    helm upgrade --install kube-prometheus-stack prometheus-community/kube-prometheus-stack `
        --namespace $MonitoringNamespace --create-namespace --wait --timeout 10m `
        --set prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false `
        --set prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false `
        --set grafana.sidecar.dashboards.enabled=true `
        --set grafana.sidecar.dashboards.searchNamespace=ALL
}

# 32 random bytes as 64 hex digits, like `openssl rand -hex 32` in deploy.sh.
function New-RandomHex {
    $bytes = New-Object byte[] 32
    [System.Security.Cryptography.RandomNumberGenerator]::Create().GetBytes($bytes)
    -join ($bytes | ForEach-Object { $_.ToString("x2") })
}

Step "namespace, Redis password and cluster token"
Invoke-Checked { kubectl apply -f namespace.yaml }
kubectl -n $Namespace get secret redis-auth *> $null
if ($LASTEXITCODE -ne 0) {
    $password = New-RandomHex
    Invoke-Checked { kubectl -n $Namespace create secret generic redis-auth --from-literal=password=$password }
} else {
    Write-Host "secret redis-auth exists; keeping its password"
}
# Never replaced: running pods keep the token they started with, and pods with different
# tokens refuse each other's forwarded events.
kubectl -n $Namespace get secret cluster-token *> $null
if ($LASTEXITCODE -ne 0) {
    $token = New-RandomHex
    Invoke-Checked { kubectl -n $Namespace create secret generic cluster-token --from-literal=token=$token }
} else {
    Write-Host "secret cluster-token exists; keeping its token"
}

# One client token to start with, shown once; the Secret holds only its sha256 digest.
kubectl -n $Namespace get secret client-tokens *> $null
if ($LASTEXITCODE -ne 0) {
    $clientToken = "iot_" + (New-RandomHex)
    $sha = [System.Security.Cryptography.SHA256]::Create()
    $digest = -join ($sha.ComputeHash([System.Text.Encoding]::UTF8.GetBytes($clientToken)) | ForEach-Object { $_.ToString("x2") })
    Invoke-Checked { kubectl -n $Namespace create secret generic client-tokens "--from-literal=tokens=default $digest * rw" }
    Write-Host "client token (shown once; send it as 'Authorization: Bearer <token>'): $clientToken"
} else {
    Write-Host "secret client-tokens exists; keeping its tokens"
}

Step "applying manifests"
Invoke-Checked { kubectl apply -k . }
Invoke-Checked { kubectl -n $Namespace set image deployment/iot-processor iot-processor=$Image }

Step "waiting for rollout"
Invoke-Checked { kubectl -n $Namespace rollout status deployment/redis --timeout=5m }
Invoke-Checked { kubectl -n $Namespace rollout status deployment/iot-processor --timeout=5m }
kubectl -n $Namespace get pods,svc,hpa,ingress
Write-Host "`nDeployed. kubectl -n $Namespace port-forward svc/iot-processor-service 8080:80"
