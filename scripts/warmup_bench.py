"""Warm-up on vs off: what clients see in a fresh replica's first minute.

Each round starts the app (configs/bench.yaml's model) with warm-up off, or warmed with the FAQ
workload's shared system prompts, and the moment `serve.run` returns (the replica reports ready)
sends the FAQ workload open loop for `--duration` seconds. It records the first request's TTFT
and the TTFT percentiles over the window, then shuts the app down. Rounds alternate off/on,
on/off, so neither mode always runs on a warmer machine; the report gives each figure's ratio
on/off.

    python -m scripts.warmup_bench --rounds 2 --duration 60 --rate 4 --out results/warmup.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve
from ray.serve._private.api import serve_start
from ray.serve.schema import ServeDeploySchema

from apps.applications import compose_file, split_args
from scripts.loadgen import RequestResult, merge, ratio_table, run_load, summarize
from scripts.workloads import make_workload

ROOT = Path(__file__).resolve().parent.parent
MODES = ("off", "on")


def app_args(warm_prompts: list[str] | None) -> dict[str, Any]:
    """configs/bench.yaml's whole config; warm-up off (None) or warmed with these system prompts."""
    serve_config = yaml.safe_load((ROOT / "configs" / "bench.yaml").read_text())
    args = compose_file(serve_config)
    (model,) = args["models"]
    model["path"] = str(ROOT / model["path"])
    if warm_prompts is None:
        model["warmup"] = {"enabled": False}
    else:
        model["warmup"] = {
            "prompts": [{"messages": [{"role": "system", "content": p}]} for p in warm_prompts]
        }
    return args


def deploy(whole: dict[str, Any], port: int) -> None:
    """Deploy the config's applications, as `serve deploy` does, and wait until they run."""
    applications = split_args(whole)
    client = serve_start(http_options={"host": "127.0.0.1", "port": port})
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": applications}))
    for application in applications:
        client._wait_for_application_running(application["name"], timeout_s=600)


def one_window(args: argparse.Namespace, mode: str, seed: int) -> dict[str, Any]:
    specs = make_workload(
        "faq",
        max(1, math.ceil(args.rate * args.duration)),
        seed=seed,
        input_len=args.input_len,
        output_len=args.output_len,
        num_prefixes=args.num_prefixes,
        prefix_len=args.prefix_len,
    )
    prefixes = sorted({spec.messages[0]["content"] for spec in specs})
    started = time.monotonic()
    deploy(app_args(prefixes if mode == "on" else None), args.port)
    ready_s = time.monotonic() - started
    try:
        results, elapsed = asyncio.run(
            run_load(
                f"http://127.0.0.1:{args.port}",
                "tiny-chat",
                specs,
                rate=args.rate,
                concurrency=args.concurrency,
                seed=seed,
            )
        )
    finally:
        serve.shutdown()
    first = results[0]
    summary = summarize(results, elapsed, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=50.0)
    return {
        "mode": mode,
        "start_to_ready_s": ready_s,
        "first_request_ttft_ms": first.ttft_s * 1e3 if first.status == 200 else None,
        "results": results,
        "summary": summary,
    }


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    windows: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    try:
        for round_index in range(args.rounds):
            order = MODES if round_index % 2 == 0 else MODES[::-1]
            for mode in order:
                window = one_window(args, mode, seed=args.seed + round_index)
                windows[mode].append(window)
                print(
                    f"round {round_index} {mode}: ready in {window['start_to_ready_s']:.1f}s, "
                    f"first TTFT {window['first_request_ttft_ms']:.0f} ms, "
                    f"TTFT p50/p95 {window['summary']['ttft_ms']['p50']:.1f}/"
                    f"{window['summary']['ttft_ms']['p95']:.1f} ms"
                )
    finally:
        serve.shutdown()
        ray.shutdown()
    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}, "modes": {}}
    summaries = {}
    for mode, mode_windows in windows.items():
        results: list[RequestResult] = merge([w["results"] for w in mode_windows])
        elapsed = sum(w["summary"]["duration_s"] for w in mode_windows) if mode_windows else 0.0
        summaries[mode] = summarize(results, elapsed, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=50.0)
        firsts = [w["first_request_ttft_ms"] for w in mode_windows]
        report["modes"][mode] = {
            "first_request_ttft_ms": firsts,
            "start_to_ready_s": [w["start_to_ready_s"] for w in mode_windows],
            "summary": summaries[mode],
        }
    report["ratio_on_over_off"] = ratio_table(summaries["off"], summaries["on"])
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per window")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=512, help="words per shared system prompt")
    parser.add_argument("--slo-ttft-ms", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = benchmark(args)
    for mode, data in report["modes"].items():
        s = data["summary"]
        print(
            f"{mode}: first-request TTFT {data['first_request_ttft_ms']} ms, TTFT p50/p95/p99 "
            f"{s['ttft_ms']['p50']:.1f}/{s['ttft_ms']['p95']:.1f}/{s['ttft_ms']['p99']:.1f} ms, "
            f"{s['completed']}/{s['requests']} ok"
        )
    for name in ("ttft_ms.p50", "ttft_ms.p95", "ttft_ms.p99", "ttft_ms.mean"):
        print(f"  on/off {name}: {report['ratio_on_over_off'][name]:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
