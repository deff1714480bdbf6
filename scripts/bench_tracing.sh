#!/usr/bin/env bash
# Tracing's end-to-end cost: the same loadgen run against configs/bench.yaml with tracing off and
# on, alternated ROUNDS times (off, on, off, on, ...). Ray is restarted for each run, because
# every Ray process reads the OTEL_* environment when it starts. With tracing on, spans go to an
# OTLP/HTTP receiver here that decodes nothing and answers 200 (the gateway's and vLLM's
# exporters do all their work). Results: results/tracing-{off,on}-N.json and a summary.
#   scripts/bench_tracing.sh [ROUNDS] [loadgen arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-2}"
shift || true
loadgen_args=("$@")
[ ${#loadgen_args[@]} -gt 0 ] || loadgen_args=(--workload random --num-requests 120 --input-len 128 \
  --output-len 64 --concurrency 8 --warmup 8)
sink_port=4318
set -a
. configs/ray-serve.env
set +a
export RAY_SERVE_HAPROXY_BINARY_PATH="$PWD/.venv/bin/llm-gateway-haproxy" RAY_AUTH_MODE=token
mkdir -p results

.venv/bin/python - "$sink_port" <<'EOF' &
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
EOF
sink=$!
trap 'kill $sink; .venv/bin/ray stop --force >/dev/null 2>&1 || true' EXIT

run() {  # $1: off|on, $2: round
  (
    if [ "$1" = on ]; then
      export OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink_port"
    fi
    .venv/bin/ray start --head --num-cpus 2 --disable-usage-stats >/dev/null
    .venv/bin/serve deploy configs/bench.yaml >/dev/null
    until curl -sf 127.0.0.1:8000/health >/dev/null; do sleep 2; done
    .venv/bin/python -m scripts.loadgen --url http://127.0.0.1:8000 --model tiny-chat \
      "${loadgen_args[@]}" --out "results/tracing-$1-$2.json" >/dev/null 2>&1
    .venv/bin/serve shutdown -y >/dev/null
    .venv/bin/ray stop >/dev/null
  )
  echo "tracing $1, round $2: results/tracing-$1-$2.json"
}
for round in $(seq 1 "$rounds"); do
  run off "$round"
  run on "$round"
done

.venv/bin/python - "$rounds" <<'EOF'
import json, statistics, sys

def figures(state: str) -> dict[str, float]:
    runs = []
    for round_ in range(1, int(sys.argv[1]) + 1):
        with open(f"results/tracing-{state}-{round_}.json") as file:
            (endpoint,) = json.load(file)["runs"][0]["endpoints"].values()
        runs.append(endpoint)
    return {
        "output tokens/s": statistics.median(r["output_tokens_per_s"] for r in runs),
        "TTFT p50 ms": statistics.median(r["ttft_ms"]["p50"] for r in runs),
        "TTFT p95 ms": statistics.median(r["ttft_ms"]["p95"] for r in runs),
        "errors": sum(sum(r["errors"].values()) for r in runs),
    }

off, on = figures("off"), figures("on")
for name in off:
    ratio = f"{on[name] / off[name]:.2f}x" if off[name] else "-"
    print(f"{name:16s} off {off[name]:9.1f}   on {on[name]:9.1f}   on/off {ratio}")
EOF
