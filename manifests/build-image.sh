#!/usr/bin/env bash
# Builds the container image with podman (or docker). Usage: build-image.sh [IMAGE]
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-iot-stream-processor:latest}
if command -v podman >/dev/null 2>&1; then
  engine=podman
elif command -v docker >/dev/null 2>&1; then
  engine=docker
else
  echo "error: neither podman nor docker is installed" >&2
  exit 1
fi
"$engine" build -f Containerfile -t "$image" .
"$engine" image ls "$image"
