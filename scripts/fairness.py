"""Fair share between API keys, measured: a light key's time to first token alone, then next to a
greedy key that keeps many streams open on the same model.

    python -m scripts.fairness --url http://127.0.0.1:8000 --model tiny-chat \\
        --greedy-key sk-greedy --light-key sk-light --greedy-streams 64

The light key sends one short streaming request at a time (`--light-requests` of them, a pause
between each); its TTFT is measured alone first, then while `--greedy-streams` clients of the
greedy key each send one long streaming request after another, of random lengths around
`--greedy-max-tokens` (half to one and a half times it: equal lengths would finish in waves, which
no real workload does). The report gives both TTFT
distributions of the light key, the greedy key's own TTFT meanwhile (what the light key would wait
in a first-come first-served queue), and the greedy key's output tokens/s alone and next to the
light key (a fair scheduler still gives it the rest of the capacity). The tests drive
`measure` (tests/test_admission.py); docs/BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass

import httpx

from scripts.sse import aiter_sse_lines

PROMPT = "Tell me about the weather in the mountains."


@dataclass(frozen=True)
class FairnessSettings:
    url: str
    model: str
    greedy_key: str
    light_key: str
    greedy_streams: int = 64
    greedy_max_tokens: int = 64
    light_requests: int = 40
    light_pause_s: float = 0.1
    warm_up_s: float = 3.0  # the greedy key's ramp, not measured
    greedy_alone_s: float = 6.0  # then its throughput alone, before the light key starts


@dataclass(frozen=True)
class GreedyRequest:
    started: float  # seconds since the drill started
    ended: float
    status: int
    ttft_s: float | None
    tokens: int


@dataclass(frozen=True)
class FairnessReport:
    light_alone_ttft_s: list[float]
    light_shared_ttft_s: list[float]
    greedy: list[GreedyRequest]
    greedy_alone_window: tuple[float, float]  # the greedy key alone (after its warm-up)
    shared_window: tuple[float, float]  # the light key measured next to it

    def greedy_tokens_per_s(self, window: tuple[float, float]) -> float:
        """The greedy key's output tokens/s in `window`, each request's tokens spread evenly over
        its duration (a stream's tokens arrive throughout it)."""
        start, end = window
        tokens = 0.0
        for request in self.greedy:
            overlap = min(end, request.ended) - max(start, request.started)
            if overlap > 0:
                tokens += request.tokens * overlap / (request.ended - request.started)
        return tokens / (end - start)

    def greedy_ttfts_s(self) -> list[float]:
        """TTFTs of the greedy key's requests that started while the light key was measured."""
        start, end = self.shared_window
        return [r.ttft_s for r in self.greedy if r.ttft_s is not None and start <= r.started <= end]

    def summary(self) -> str:
        def line(name: str, values: list[float]) -> str:
            return (
                f"{name}: TTFT p50 {statistics.median(values) * 1000:.0f} ms, "
                f"p95 {percentile(values, 0.95) * 1000:.0f} ms ({len(values)} requests)"
            )

        statuses = Counter(r.status for r in self.greedy)
        alone = self.greedy_tokens_per_s(self.greedy_alone_window)
        shared = self.greedy_tokens_per_s(self.shared_window)
        return "\n".join(
            [
                line("light key alone", self.light_alone_ttft_s),
                line("light key next to the greedy key", self.light_shared_ttft_s),
                line("greedy key meanwhile", self.greedy_ttfts_s()),
                f"greedy key: {alone:.0f} output tokens/s alone, {shared:.0f} next to the light key; "
                f"answers {dict(statuses)}",
            ]
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def chat_body(model: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_once(
    client: httpx.AsyncClient, url: str, key: str, body: dict
) -> tuple[int, float | None, int]:
    """(status, seconds to the first content token or None, completion tokens from usage)."""
    started = time.perf_counter()
    first = None
    tokens = 0
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, None, 0
        async for line in aiter_sse_lines(response):
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: ") :])
            if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return 200, first, tokens


async def light_ttfts(client: httpx.AsyncClient, settings: FairnessSettings) -> list[float]:
    ttfts = []
    body = chat_body(settings.model, 4)
    for _ in range(settings.light_requests):
        status, first, _ = await stream_once(client, settings.url, settings.light_key, body)
        assert status == 200 and first is not None, f"light key's request: {status}"
        ttfts.append(first)
        await asyncio.sleep(settings.light_pause_s)
    return ttfts


async def measure(settings: FairnessSettings) -> FairnessReport:
    limits = httpx.Limits(max_connections=settings.greedy_streams + 8)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        alone = await light_ttfts(client, settings)
        stop = asyncio.Event()
        greedy_requests: list[GreedyRequest] = []
        rng = random.Random(0)
        origin = time.perf_counter()

        async def greedy() -> None:
            mean = settings.greedy_max_tokens
            while not stop.is_set():
                body = chat_body(settings.model, rng.randint(mean // 2, mean + mean // 2))
                started = time.perf_counter() - origin
                status, ttft, tokens = await stream_once(client, settings.url, settings.greedy_key, body)
                ended = time.perf_counter() - origin
                greedy_requests.append(GreedyRequest(started, ended, status, ttft, tokens))
                if status != 200:
                    await asyncio.sleep(0.5)

        tasks = [asyncio.create_task(greedy()) for _ in range(settings.greedy_streams)]
        try:
            await asyncio.sleep(settings.warm_up_s)
            alone_started = time.perf_counter() - origin
            await asyncio.sleep(settings.greedy_alone_s)
            shared_started = time.perf_counter() - origin
            shared = await light_ttfts(client, settings)
            shared_ended = time.perf_counter() - origin
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
    return FairnessReport(
        alone, shared, greedy_requests, (alone_started, shared_started), (shared_started, shared_ended)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--greedy-key", required=True)
    parser.add_argument("--light-key", required=True)
    parser.add_argument("--greedy-streams", type=int, default=64)
    parser.add_argument("--greedy-max-tokens", type=int, default=64)
    parser.add_argument("--light-requests", type=int, default=40)
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args()
    settings = FairnessSettings(
        args.url,
        args.model,
        args.greedy_key,
        args.light_key,
        greedy_streams=args.greedy_streams,
        greedy_max_tokens=args.greedy_max_tokens,
        light_requests=args.light_requests,
    )
    report = asyncio.run(measure(settings))
    print(report.summary())
    if args.out:
        with open(args.out, "w") as out:
            json.dump(asdict(report), out, indent=2)


if __name__ == "__main__":
    main()
