#!/usr/bin/env bash
# From a fresh clone to a serving endpoint on http://127.0.0.1:8000: install, make the tiny
# models, serve configs/app.yaml (or the config given as the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Ray's processes inherit how Serve runs (HAProxy in front, the throughput mode).
set -a
. configs/ray-serve.env
set +a
export RAY_SERVE_HAPROXY_BINARY_PATH="$PWD/.venv/bin/llm-gateway-haproxy"  # the connection cap
exec .venv/bin/serve run "${1:-configs/app.yaml}"
