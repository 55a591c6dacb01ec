#!/usr/bin/env bash
# Set up and run Tidegate's whole test suite: format and lint checks, unit
# tests, runtime tests against real components, and end-to-end tests against
# the real binary, real TLS WebSockets and a real RabbitMQ on 127.0.0.1:5672.
#
# Then checks deploy/ offline (the Helm chart, kustomize, alert rules, the
# dashboard, the systemd unit) and builds and runs the container image.
#
# Installs what is missing (the wasm32-wasip2 target, RabbitMQ, promtool,
# podman, musl-tools) and starts RabbitMQ when it is down. Needs Rust (rustup) and, for the
# installs, apt-get (run as root or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
    || { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; }
}

say "toolchain"
rustup target add wasm32-wasip2
rustup component add rustfmt clippy >/dev/null 2>&1 || true

say "RabbitMQ"
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  apt_install rabbitmq-server
fi
if ! as_root rabbitmqctl -q status >/dev/null 2>&1; then
  echo "RabbitMQ is not running: starting it"
  as_root rabbitmq-server -detached
fi
for _ in $(seq 1 90); do
  if as_root rabbitmqctl -q await_startup >/dev/null 2>&1; then break; fi
  sleep 1
done
as_root rabbitmqctl -q await_startup

say "promtool (checks /metrics in the tests), openssl (checks TLS versions and suites)"
command -v promtool >/dev/null 2>&1 || apt_install prometheus
command -v openssl >/dev/null 2>&1 || apt_install openssl

say "deploy/ checks and the container image: kubectl (its kustomize), podman, musl"
command -v kubectl >/dev/null 2>&1 || apt_install kubectl
command -v podman >/dev/null 2>&1 || apt_install podman runc
command -v musl-gcc >/dev/null 2>&1 || apt_install musl-tools
command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd

say "JavaScript and Python toolchains (the echo examples in functions/js and functions/python)"
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_install python3-venv
guests="${CARGO_TARGET_DIR:-target}/guest-components"
functions/build-guests.sh "$guests"
export TIDEGATE_GUEST_COMPONENTS="$(cd "$guests" && pwd)"

say "format"
cargo fmt --all --check
(cd functions && cargo fmt --all --check)

say "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
(cd functions && cargo clippy --workspace --all-targets --locked -- -D warnings)

say "tests"
cargo test --workspace --locked
# The JavaScript and Python components against the runtime alone (their
# compiled code is kept in the target's scratch directory between runs).
cargo test -p runtime --test foreign_guests --locked -- --ignored
# The SDK's own tests run on the host, not on wasm32-wasip2.
(cd functions && cargo test -p tidegate-sdk --locked --target "$(rustc -vV | sed -n 's/^host: //p')")

# The gateway binary the end-to-end tests ran (cargo test builds it).
tidegate="${CARGO_TARGET_DIR:-target}/debug/tidegate"

say "RFC 6455 conformance (Autobahn, ws:// and wss://)"
tests/autobahn.sh "$tidegate"

say "deploy/: the chart and kustomize rendered and validated, rules, dashboard, systemd unit"
deploy_out="$(mktemp -d)"
TIDEGATE_BINARY="$tidegate" deploy/check.sh "$deploy_out"

say "container image: built (deploy/image/build.sh) and run with podman"
deploy/image/build.sh localhost/tidegate:ci
TIDEGATE_IMAGE=localhost/tidegate:ci TIDEGATE_CHART_CONFIG="$deploy_out/helm/chart-tidegate.toml" \
  cargo test -p gateway --test e2e --locked image:: -- --ignored
rm -rf "$deploy_out"
