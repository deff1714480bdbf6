"""An operations drill: keep N streaming clients running against a gateway while you change or
break it, and account for every request.

    python -m scripts.drill --url http://127.0.0.1:8000 --model tiny-chat --streams 8 --seconds 120
    # meanwhile, in another shell: serve deploy an edited config, kill a replica, scale down...

Each client sends one streaming chat request after another, asking for exactly `--max-tokens`
tokens (`ignore_eos`) with log-probabilities, so the client counts the tokens it really received
(one log-probability entry per token), whatever the grouping of events. Every request ends as
exactly one outcome:

    complete            200, `[DONE]`, exactly max_tokens tokens received, usage agrees, one id
    short               200 and `[DONE]`, but another token count (a token lost or repeated),
                        or chunks with different ids
    error-event:CODE    200, then an error event (the stream was ended by the gateway)
    cut                 200, then the connection closed without `[DONE]`
    status:S:CODE       an error answer (S: HTTP status, CODE: OpenAI error code)
    transport:KIND      no HTTP answer at all (refused, reset, timed out)

The report lists the count of each outcome, every non-complete request with its time, and a
timeline of outcomes per `--bucket-s` seconds (by the time the request ended), so a dip lines up
with what the operator did. `--out` writes it as JSON too. The tests drive the same `Drill`
(`tests/test_operations.py`); it exits non-zero when any request was not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from scripts.sse import aiter_sse_lines

COMPLETE = "complete"
PROMPT = "Tell me about the weather in the mountains."
DONE_LINE = "data: [DONE]"


@dataclass(frozen=True)
class DrillSettings:
    url: str
    model: str
    streams: int = 8
    max_tokens: int = 64
    api_key: str | None = None
    request_timeout_s: float = 180.0
    temperature: float | None = None  # 0: greedy, so every complete answer is the same text


@dataclass(frozen=True)
class Outcome:
    """How one request ended; times in seconds since the drill started."""

    kind: str
    started_s: float
    ended_s: float
    tokens: int = 0
    detail: str = ""
    text: str = ""  # the content received


@dataclass
class DrillReport:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def counts(self) -> Counter[str]:
        return Counter(outcome.kind for outcome in self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.kind != COMPLETE]

    def timeline(self, bucket_s: float) -> list[tuple[float, dict[str, int]]]:
        """Outcomes per `bucket_s` window, by the time each request ended."""
        buckets: dict[int, Counter[str]] = {}
        for outcome in self.outcomes:
            buckets.setdefault(int(outcome.ended_s // bucket_s), Counter())[outcome.kind] += 1
        return [(index * bucket_s, dict(buckets[index])) for index in sorted(buckets)]

    def summary(self, bucket_s: float = 5.0) -> str:
        counts = "  ".join(f"{kind}={count}" for kind, count in sorted(self.counts.items()))
        lines = [f"requests: {len(self.outcomes)}  {counts}"]
        for outcome in self.failures:
            lines.append(
                f"  {outcome.ended_s:7.1f}s {outcome.kind} after {outcome.tokens} tokens "
                f"(started {outcome.started_s:.1f}s) {outcome.detail}"
            )
        lines.append("timeline (end time, outcomes):")
        for start, counts in self.timeline(bucket_s):
            lines.append(f"  {start:6.0f}s  " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        return "\n".join(lines)


def request_body(settings: DrillSettings) -> dict[str, Any]:
    body = {
        "model": settings.model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": settings.max_tokens,
        "ignore_eos": True,
        "stream": True,
        "logprobs": True,
        "stream_options": {"include_usage": True},
    }
    if settings.temperature is not None:
        body["temperature"] = settings.temperature
    return body


@dataclass(frozen=True)
class StreamReading:
    """What a 200 stream delivered: its outcome kind, tokens, a detail, and its text."""

    kind: str
    tokens: int
    detail: str
    text: str


def classify_stream(lines: list[str], expected_tokens: int) -> StreamReading:
    """The outcome of a 200 stream from its `data:` lines, in order. Complete: every token asked
    for, one id, usage that agrees, and `finish_reason` `length` (the drill asks `ignore_eos`)."""
    tokens, usage_tokens, ids, text, finish_reasons = 0, None, set(), [], []

    def reading(kind: str, detail: str) -> StreamReading:
        return StreamReading(kind, tokens, detail, "".join(text))

    for line in lines:
        if line == DONE_LINE:
            if len(ids) > 1:
                return reading("short", f"chunks carry several ids: {sorted(ids)}")
            if usage_tokens is None:
                return reading("short", "no usage")
            if usage_tokens != tokens:
                return reading("short", f"usage says {usage_tokens}")
            if tokens != expected_tokens:
                return reading("short", f"expected {expected_tokens}")
            if finish_reasons != ["length"]:
                return reading("short", f"finish reasons {finish_reasons}")
            return reading(COMPLETE, "")
        event = json.loads(line[len("data: ") :])
        if "error" in event:
            error = event["error"]
            return reading(f"error-event:{error.get('code')}", str(error.get("message"))[:200])
        ids.add(event.get("id"))
        for choice in event.get("choices") or []:
            tokens += len((choice.get("logprobs") or {}).get("content") or [])
            text.append((choice.get("delta") or {}).get("content") or "")
            if choice.get("finish_reason") is not None:
                finish_reasons.append(choice["finish_reason"])
        if event.get("usage"):
            usage_tokens = event["usage"].get("completion_tokens")
    return reading("cut", "no [DONE]")


class Drill:
    """`streams` closed-loop streaming clients; `run` until `stop` is set, recording outcomes."""

    def __init__(self, settings: DrillSettings) -> None:
        self.settings = settings
        self.report = DrillReport()
        self._started = time.monotonic()

    def _now(self) -> float:
        return time.monotonic() - self._started

    async def run(self, stop: asyncio.Event) -> DrillReport:
        self._started = time.monotonic()
        headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        limits = httpx.Limits(max_connections=self.settings.streams * 2)
        async with httpx.AsyncClient(
            base_url=self.settings.url,
            headers=headers,
            timeout=self.settings.request_timeout_s,
            limits=limits,
        ) as client:
            await asyncio.gather(*(self._client(client, stop) for _ in range(self.settings.streams)))
        return self.report

    async def _client(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        body = request_body(self.settings)
        while not stop.is_set():
            self.report.outcomes.append(await self.one(client, body))

    async def one(self, client: httpx.AsyncClient, body: dict[str, Any]) -> Outcome:
        started = self._now()
        lines: list[str] = []
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    kind = f"status:{response.status_code}:{_error_code(text)}"
                    return Outcome(kind, started, self._now(), 0, text[:200])
                async for line in aiter_sse_lines(response):
                    if line.startswith("data: "):
                        lines.append(line)
        except httpx.HTTPError as exc:
            if lines:  # headers were out: the stream was cut
                reading = classify_stream(lines, self.settings.max_tokens)
                return Outcome("cut", started, self._now(), reading.tokens, type(exc).__name__, reading.text)
            return Outcome(f"transport:{type(exc).__name__}", started, self._now(), 0, str(exc)[:200])
        reading = classify_stream(lines, self.settings.max_tokens)
        return Outcome(reading.kind, started, self._now(), reading.tokens, reading.detail, reading.text)


def _error_code(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "-"


class DrillThread:
    """A `Drill` on its own thread and event loop, for synchronous callers (the tests):
    `start()`, do the operation, `stop()` returns the report once every client's request ended."""

    def __init__(self, settings: DrillSettings) -> None:
        self.drill = Drill(settings)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            self._loop.run_until_complete(self.drill.run(self._stop))
        except BaseException as exc:  # re-raised in stop()
            self._error = exc

    def start(self) -> DrillThread:
        self._thread.start()
        self._ready.wait()
        return self

    def elapsed_s(self) -> float:
        return self.drill._now()

    def completed(self) -> int:
        return sum(outcome.kind == COMPLETE for outcome in list(self.drill.report.outcomes))

    def stop(self, timeout_s: float = 300.0) -> DrillReport:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"drill clients still running {timeout_s:.0f}s after stop")
        if self._error is not None:
            raise self._error
        return self.drill.report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="tiny-chat")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long clients keep starting requests")
    parser.add_argument("--api-key")
    parser.add_argument("--temperature", type=float, help="0: greedy (every answer the same text)")
    parser.add_argument("--bucket-s", type=float, default=5.0, help="timeline resolution")
    parser.add_argument("--out", help="write the outcomes as JSON here")
    args = parser.parse_args(argv)
    settings = DrillSettings(
        args.url, args.model, args.streams, args.max_tokens, args.api_key, temperature=args.temperature
    )

    async def timed() -> DrillReport:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(args.seconds, stop.set)
        return await Drill(settings).run(stop)

    report = asyncio.run(timed())
    print(report.summary(args.bucket_s))
    if args.out:
        with open(args.out, "w") as out:
            outcomes = [asdict(outcome) for outcome in report.outcomes]
            json.dump({"settings": asdict(settings), "outcomes": outcomes}, out, indent=1)
    return 0 if report.outcomes and not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
