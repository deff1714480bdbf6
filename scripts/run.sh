#!/usr/bin/env bash
# From a fresh clone to a serving endpoint on http://127.0.0.1:8000: install, make the tiny
# models, start Ray with its Prometheus endpoint on http://127.0.0.1:8080/metrics, and serve
# configs/app.yaml (or the config given as the first argument) in the foreground.
# Ctrl-C stops everything it started: the app, HAProxy, Ray.
#   LLM_GATEWAY_METRICS_PORT    the Prometheus endpoint's port (default 8080)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
metrics_port="${LLM_GATEWAY_METRICS_PORT:-8080}"
# Ray's processes inherit how Serve runs (HAProxy in front, the throughput mode).
set -a
. configs/ray-serve.env
set +a
export RAY_SERVE_HAPROXY_BINARY_PATH="$PWD/.venv/bin/llm-gateway-haproxy"  # the connection cap
# Ray's token authentication (the token in ~/.ray/auth_token, made here the first time; `ray start`
# does not make one): the `serve` and `ray` commands of the README need the same variable.
export RAY_AUTH_MODE=token
[ -s "$HOME/.ray/auth_token" ] || .venv/bin/ray get-auth-token --generate >/dev/null

# `ray stop` stops every Ray process of the machine: never start (and later stop) over another.
for port in 6379 "$metrics_port" 8000; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "Port $port is taken (another Ray or gateway?): stop it first (.venv/bin/ray stop)." >&2
    exit 1
  fi
done
# A Ray instance of its own (not `serve run`'s implicit one) so that the metrics port is fixed, in
# a session of its own: Ctrl-C reaches this script's process group, and Ray's daemons must not
# die of it before Serve has shut down (stop below stops them in order).
setsid --wait .venv/bin/ray start --head --metrics-export-port "$metrics_port" --disable-usage-stats
stop() {
  trap '' INT  # a second Ctrl-C must not leave HAProxy or Ray half stopped
  .venv/bin/serve shutdown -y >/dev/null 2>&1 || true  # HAProxy and the replicas, if still up
  .venv/bin/ray stop >/dev/null 2>&1 || .venv/bin/ray stop --force >/dev/null 2>&1 || true
  echo "Stopped the gateway and Ray."
}
trap stop EXIT
echo "Metrics: http://127.0.0.1:$metrics_port/metrics"
.venv/bin/serve run --address auto "${1:-configs/app.yaml}"
