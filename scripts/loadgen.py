"""OpenAI-compatible load generator: latency percentiles, throughput and goodput, one or two
endpoints compared in the same run.

    python -m scripts.loadgen --url http://127.0.0.1:8000 --model tiny-chat \\
        --workload random --num-requests 200 --concurrency 32 --out results/run.json
    python -m scripts.loadgen ... --compare http://127.0.0.1:8001   # ratios B/A, interleaved
    python -m scripts.loadgen ... --rates 2,4,8                      # open-loop sweep + plot

Arrivals are open loop (`--rates`: Poisson, or gamma with `--burstiness` < 1 for bursts) and/or
closed loop (`--concurrency` caps requests in flight). `--warmup` requests run first and are not
counted. With `--compare`, each rate runs in `--rounds` rounds alternating A,B then B,A, so both
endpoints see the same machine load; the report gives each figure's ratio B/A.

Times are measured as the client sees them: TTFT to the first content token, ITL between
content events, TPOT = (E2E - TTFT) / (output tokens - 1), E2E to the last byte.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from scripts.sse import aiter_sse_lines
from scripts.workloads import WORKLOADS, RequestSpec, make_workload

PERCENTILES = (50, 95, 99)
LATENCY_FIELDS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
RATIO_FIELDS = ("output_tokens_per_s", "requests_per_s", "goodput_requests_per_s") + tuple(
    f"{metric}.{stat}" for metric in LATENCY_FIELDS for stat in ("mean", "p50", "p95", "p99")
)


@dataclass
class RequestResult:
    """What one request measured; `status` is the HTTP status (0 for a transport error)."""

    status: int
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    """Send one chat completion and time it as the client sees it."""
    start = time.perf_counter()
    try:
        if not body.get("stream"):
            response = await client.post(f"{url}/v1/chat/completions", json=body)
            end = time.perf_counter()
            if response.status_code != 200:
                return RequestResult(response.status_code, error=response.text[:200])
            usage = response.json().get("usage") or {}
            return RequestResult(
                200, end - start, end - start, [], usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            )
        result = RequestResult(200)
        last_token_at = None
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(response.status_code, error=response.text[:200])
            async for line in aiter_sse_lines(response):
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if "error" in event:
                    result.status, result.error = 599, str(event["error"])[:200]
                    continue
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
                if any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                    if last_token_at is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last_token_at)
                    last_token_at = now
        result.e2e_s = time.perf_counter() - start
        return result
    except httpx.HTTPError as exc:
        return RequestResult(0, error=f"{type(exc).__name__}: {exc}"[:200])


def arrival_gaps(count: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Seconds between arrivals: gamma with mean 1/rate (shape 1 = Poisson); rate inf = all at once."""
    if math.isinf(rate):
        return [0.0] * count
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(count)]


async def run_load(
    url: str,
    model: str,
    specs: list[RequestSpec],
    *,
    rate: float,
    concurrency: int,
    burstiness: float = 1.0,
    seed: int = 0,
    timeout_s: float = 300.0,
    progress: bool = False,
    api_key: str | None = None,
) -> tuple[list[RequestResult], float]:
    """Send `specs` with the given arrivals and concurrency cap; results and wall time."""
    gaps = arrival_gaps(len(specs), rate, burstiness, random.Random(seed))
    limit = asyncio.Semaphore(concurrency)
    bar = _progress(len(specs)) if progress else None
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, headers=headers) as client:

        async def one(spec: RequestSpec) -> RequestResult:
            async with limit:
                result = await send(client, url, spec.body(model))
            if bar is not None:
                bar.update(1)
            return result

        started = time.perf_counter()
        tasks = []
        for spec, gap in zip(specs, gaps):
            tasks.append(asyncio.create_task(one(spec)))
            if gap:
                await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    if bar is not None:
        bar.close()
    return list(results), elapsed


def summarize(
    results: list[RequestResult], elapsed_s: float, *, slo_ttft_ms: float, slo_tpot_ms: float
) -> dict[str, Any]:
    """Percentiles, throughput, goodput and errors of one run."""
    ok = [r for r in results if r.status == 200]
    series = {
        "ttft_ms": [r.ttft_s * 1e3 for r in ok if not math.isnan(r.ttft_s)],
        "tpot_ms": [tpot * 1e3 for r in ok if not math.isnan(tpot := _tpot_s(r))],
        "itl_ms": [gap * 1e3 for r in ok for gap in r.itl_s],
        "e2e_ms": [r.e2e_s * 1e3 for r in ok],
    }
    good = [
        r
        for r in ok
        if r.ttft_s * 1e3 <= slo_ttft_ms and not _tpot_s(r) * 1e3 > slo_tpot_ms  # NaN: no TPOT to miss
    ]
    errors: dict[str, int] = {}
    for r in results:
        if r.status != 200:
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    summary: dict[str, Any] = {
        "requests": len(results),
        "completed": len(ok),
        "errors": errors,
        "duration_s": elapsed_s,
        "requests_per_s": len(ok) / elapsed_s,
        "output_tokens": sum(r.output_tokens for r in ok),
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / elapsed_s,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "goodput_requests_per_s": len(good) / elapsed_s,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
    }
    for name, values in series.items():
        summary[name] = _stats(values)
    return summary


def _tpot_s(result: RequestResult) -> float:
    """Seconds per output token after the first; NaN when there is no second token."""
    if result.output_tokens <= 1 or math.isnan(result.ttft_s):
        return math.nan
    return (result.e2e_s - result.ttft_s) / (result.output_tokens - 1)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    array = np.asarray(values)
    return {"mean": float(array.mean()), **{f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}}


def merge(batches: list[list[RequestResult]]) -> list[RequestResult]:
    return [result for results in batches for result in results]


def ratio_table(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Each figure's ratio B/A (throughputs: higher is better; latencies: lower is better)."""
    ratios = {}
    for name in RATIO_FIELDS:
        va, vb = _lookup(a, name), _lookup(b, name)
        ratios[name] = vb / va if va and not math.isnan(va) and not math.isnan(vb) else math.nan
    return ratios


def _lookup(summary: dict[str, Any], dotted: str) -> float:
    value: Any = summary
    for part in dotted.split("."):
        value = value[part]
    return float(value)


async def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole benchmark the CLI describes; the JSON report."""
    urls = [args.url] + ([args.compare] if args.compare else [])
    models = [args.model, args.compare_model or args.model]
    keys = [args.api_key, args.compare_api_key or args.api_key]
    # One label per endpoint, "URL model": A and B may be two models behind one gateway, one
    # model called with two keys, or one model sent two workloads of the same seed (shaped vs
    # unshaped: the same conversations).
    workloads = [args.workload, args.compare_workload or args.workload]
    labels = [f"{url} {model}" for url, model in zip(urls, models)]
    if len(labels) == 2 and workloads[0] != workloads[1]:
        labels = [f"{label} {workload}" for label, workload in zip(labels, workloads)]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"{labels[0]} [A]", f"{labels[1]} [B]"]
    specs = [
        make_workload(
            workload,
            max(requests_at(rate, args) for rate in args.rates),
            seed=args.seed,
            input_len=args.input_len,
            output_len=args.output_len,
            num_prefixes=args.num_prefixes,
            prefix_len=args.prefix_len,
        )
        for workload in workloads[: len(urls)]
    ]
    if args.warmup:
        for url, model, key, workload in zip(urls, models, keys, workloads):
            warm = make_workload(workload, args.warmup, seed=args.seed + 1, input_len=args.input_len, output_len=8)
            await run_load(
                url, model, warm, rate=math.inf, concurrency=min(args.concurrency, args.warmup), api_key=key
            )

    runs = []
    for rate in args.rates:
        per_endpoint: list[list[list[RequestResult]]] = [[] for _ in urls]
        elapsed = [0.0 for _ in urls]
        rounds = args.rounds if args.compare else 1
        chunk = math.ceil(requests_at(rate, args) / rounds)
        for round_index in range(rounds):
            order = list(range(len(urls)))
            if round_index % 2:
                order.reverse()  # A,B then B,A: neither endpoint always runs on a warmer machine
            for i in order:
                part = specs[i][round_index * chunk : (round_index + 1) * chunk]
                results, seconds = await run_load(
                    urls[i], models[i], part, rate=rate, concurrency=args.concurrency,
                    burstiness=args.burstiness, seed=args.seed + round_index, progress=args.progress,
                    api_key=keys[i],
                )
                per_endpoint[i].append(results)
                elapsed[i] += seconds
        summaries = [
            summarize(merge(per_endpoint[i]), elapsed[i], slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
            for i in range(len(urls))
        ]
        run: dict[str, Any] = {"rate": "inf" if math.isinf(rate) else rate, "endpoints": dict(zip(labels, summaries))}
        if args.compare:
            run["ratio_b_over_a"] = ratio_table(summaries[0], summaries[1])
        runs.append(run)
    report: dict[str, Any] = {"config": _jsonable(vars(args)), "machine": _machine(), "runs": runs}
    if len(runs) > 1:
        report["sustainable_rate"] = {
            label: sustainable_rate(runs, label, args.slo_ttft_ms) for label in labels
        }
    return report


def requests_at(rate: float, args: argparse.Namespace) -> int:
    """Requests sent to each endpoint at `rate`: --num-requests, or with --seconds-per-rate enough
    arrivals for that many seconds, so a sweep's high rates run long enough to reach steady state."""
    if args.seconds_per_rate is None or math.isinf(rate):
        return args.num_requests
    return max(args.num_requests, math.ceil(rate * args.seconds_per_rate))


def sustainable_rate(runs: list[dict[str, Any]], label: str, slo_ttft_ms: float) -> float:
    """The highest swept request rate at which endpoint `label` answered every request and kept
    its p95 TTFT within the SLO (0 if none did). A rate above a failing one does not count: past
    saturation a lucky round must not pass for capacity."""
    best = 0.0
    for run in sorted(runs, key=lambda run: math.inf if run["rate"] == "inf" else run["rate"]):
        summary = run["endpoints"][label]
        if run["rate"] == "inf" or summary["errors"] or not summary["ttft_ms"]["p95"] <= slo_ttft_ms:
            break
        best = float(run["rate"])
    return best


def _machine() -> dict[str, Any]:
    import os
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """The CLI arguments as JSON can hold them (paths as text, infinite rates as "inf")."""
    def clean(value: Any) -> Any:
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, float) and math.isinf(value):
            return "inf"
        return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)

    return {key: clean(value) for key, value in values.items()}


def plot(report: dict[str, Any], path: Path) -> None:
    """Latency percentiles and throughput against request rate, one line per endpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    rates = [0 if run["rate"] == "inf" else run["rate"] for run in runs]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for url in runs[0]["endpoints"]:
        for p in PERCENTILES:
            latency.plot(rates, [run["endpoints"][url]["ttft_ms"][f"p{p}"] for run in runs], marker="o", label=f"{url} TTFT p{p}")
        throughput.plot(rates, [run["endpoints"][url]["output_tokens_per_s"] for run in runs], marker="o", label=url)
    latency.set(xlabel="request rate (req/s; 0 = all at once)", ylabel="ms", title="Time to first token")
    throughput.set(xlabel="request rate (req/s; 0 = all at once)", ylabel="tokens/s", title="Output tokens/s")
    latency.legend(fontsize=7)
    throughput.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def print_report(report: dict[str, Any]) -> None:
    for run in report["runs"]:
        print(f"\nrate {run['rate']} req/s")
        for url, s in run["endpoints"].items():
            print(
                f"  {url}: {s['completed']}/{s['requests']} ok, errors {s['errors']}, "
                f"{s['output_tokens_per_s']:.0f} tok/s, {s['requests_per_s']:.2f} req/s, "
                f"TTFT p50/p95/p99 {s['ttft_ms']['p50']:.1f}/{s['ttft_ms']['p95']:.1f}/{s['ttft_ms']['p99']:.1f} ms, "
                f"TPOT p50 {s['tpot_ms']['p50']:.2f} ms, E2E p95 {s['e2e_ms']['p95']:.0f} ms"
            )
        for name, value in run.get("ratio_b_over_a", {}).items():
            print(f"    B/A {name}: {value:.3f}")
    if "sustainable_rate" in report:
        slo = report["config"]["slo_ttft_ms"]
        print(f"\nsustainable request rate (every request answered, TTFT p95 <= {slo:.0f} ms):")
        for label, rate in report["sustainable_rate"].items():
            print(f"  {label}: {rate:g} req/s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="endpoint A, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--compare", help="endpoint B: same workload, interleaved, ratios B/A")
    parser.add_argument("--compare-model", help="model id at endpoint B (default: --model)")
    parser.add_argument("--api-key", help="sent as `Authorization: Bearer KEY` to endpoint A")
    parser.add_argument("--compare-api-key", help="key for endpoint B (default: --api-key)")
    parser.add_argument("--workload", choices=WORKLOADS, default="random")
    parser.add_argument("--compare-workload", choices=WORKLOADS, help="workload of endpoint B (default: --workload)")
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=128, help="prompt length in words")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens (exact, ignore_eos)")
    parser.add_argument("--num-prefixes", type=int, default=4, help="faq: shared prefixes")
    parser.add_argument("--prefix-len", type=int, default=256, help="faq: prefix length in words")
    parser.add_argument("--rates", default="inf", help="comma-separated request rates (req/s); inf = closed loop")
    parser.add_argument(
        "--seconds-per-rate", type=float, help="open loop: at each rate, send rate x this many requests (at least --num-requests)"
    )
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    parser.add_argument("--concurrency", type=int, default=32, help="most requests in flight")
    parser.add_argument("--warmup", type=int, default=4, help="requests per endpoint before measuring")
    parser.add_argument("--rounds", type=int, default=4, help="with --compare: alternating rounds")
    parser.add_argument("--slo-ttft-ms", type=float, default=500.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON report path (a PNG plot is written beside it)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    args = parser.parse_args(argv)
    args.rates = [float(rate) for rate in args.rates.split(",")]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = asyncio.run(benchmark(args))
    print_report(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        plot(report, args.out.with_suffix(".png"))
        print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}", file=sys.stderr)
    return report


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="req", leave=False)


if __name__ == "__main__":
    main()
