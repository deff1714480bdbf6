#!/usr/bin/env bash
# From a fresh clone to a serving endpoint on http://127.0.0.1:8000: install, make the tiny
# models, start Ray with its Prometheus endpoint on http://127.0.0.1:8080/metrics, and serve
# configs/app.yaml (or the config given as the first argument) in the foreground.
# Ctrl-C stops everything it started: the app, HAProxy, Ray.
#   LLM_GATEWAY_HOST            the address Ray and its metrics bind to (default 127.0.0.1)
#   LLM_GATEWAY_METRICS_PORT    the Prometheus endpoint's port (default 8080)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
host="${LLM_GATEWAY_HOST:-127.0.0.1}"
metrics_port="${LLM_GATEWAY_METRICS_PORT:-8080}"
# Ray's processes inherit how Serve runs (HAProxy in front, the throughput mode).
set -a
. configs/ray-serve.env
set +a
export RAY_SERVE_HAPROXY_BINARY_PATH="$PWD/.venv/bin/llm-gateway-haproxy"  # the connection cap
# Ray's token authentication (the token in ~/.ray/auth_token, made on the first start): the
# `serve` and `ray` commands of the README need the same variable.
export RAY_AUTH_MODE=token

if .venv/bin/ray status >/dev/null 2>&1; then
  echo "A Ray instance already runs here; stop it first (.venv/bin/ray stop)." >&2
  exit 1
fi
stop() {
  .venv/bin/serve shutdown -y >/dev/null 2>&1 || true  # HAProxy and the replicas, if still up
  .venv/bin/ray stop >/dev/null 2>&1 || .venv/bin/ray stop --force >/dev/null 2>&1 || true
  echo "Stopped the gateway and Ray."
}
trap stop EXIT
# A Ray instance of its own (not `serve run`'s implicit one) so that the metrics port is fixed.
.venv/bin/ray start --head --node-ip-address "$host" --metrics-export-port "$metrics_port" \
  --disable-usage-stats
echo "Metrics: http://$host:$metrics_port/metrics"
.venv/bin/serve run --address auto "${1:-configs/app.yaml}"
