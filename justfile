# Everyday commands. `cargo install just --locked` if you do not have it; each recipe is a
# plain command you can also run by hand (README.md lists the script each one runs).

set shell := ["bash", "-euo", "pipefail", "-c"]

image := "iot-stream-processor:latest"

# Run the service on :8080 with the embedded store.
run:
    cargo run --release

# Run against a local Redis (redis-server must be running on :6379).
run-redis:
    REDIS_URL=redis://127.0.0.1:6379/ cargo run --release

# Every test (installs redis-server if missing and run as root).
test:
    scripts/test.sh

# Mutation testing of src/ and actors/src (cargo-mutants; installs it if missing). Arguments
# are passed on: just mutants -f src/auth/check.rs
mutants *args:
    scripts/mutants.sh {{args}}

# The API contract: schemathesis against the live binary (installs it in a venv once).
contract examples="100":
    scripts/contract.sh {{examples}}

# What CI runs: install redis-server if missing, fmt, clippy, tests.
ci:
    bash .ci/run

# Formatting and lints.
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets --workspace -- -D warnings

# Three clustered nodes (public ports 8080, 8090, 8100) sharing a local redis-server.
cluster nodes="3":
    scripts/cluster.sh {{nodes}}

# The benchmark (starts redis-server, the service and the limit server itself).
bench seconds="10":
    bench/run.sh {{seconds}}

# Scale-out benchmark: one node against a three-node cluster and three standalone nodes (starts redis-server and the nodes itself).
bench-cluster seconds="10":
    bench/cluster.sh {{seconds}}

# The ingest log's cost (INGEST_LOG=on beside off) and its replay after a SIGKILL.
bench-log seconds="10":
    bench/ingest-log.sh {{seconds}}

# Load test a running service: just load http://127.0.0.1:8080/metric 1 64 30s
load url="http://127.0.0.1:8080/metric" threads="1" connections="64" duration="30s":
    cargo run --release -p bench --bin loadtest -- {{url}} {{threads}} {{connections}} {{duration}}

# Build the container image (podman or docker).
image:
    manifests/build-image.sh {{image}}

# Deploy to the current kubectl context.
deploy:
    manifests/deploy.sh

# Offline validation of the manifests, rules, dashboard and Containerfile.
validate:
    manifests/validate.sh
