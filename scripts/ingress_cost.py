"""CPU cost of the gateway's own per-request code, in microseconds per request.

Times what the ingress does to every request before handing it to a model (parse the body,
shape it: max_tokens default and cap, the estimate; check the API key; take and free a slot of
the model's gate; the rate limiter's bookkeeping, here in-process; the volatile-prefix scan; the
telemetry middleware: timings, metrics and the access line; the trace's spans, with tracing off
and on) and the error path of a rejected request, with `time.process_time` (CPU, not wall time)
over many repetitions, best of several rounds. The limiter's Ray round trip is not in here: docs/BENCHMARKS.md measures it end
to end. Future changes add their stages here so their cost stays visible.

    python -m scripts.ingress_cost            # prints a table and the JSON
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Callable

from apps.admission.gate import ModelGate, shed_depths
from apps.admission.rate_limits import KeyLimits
from apps.config import ApiKey, AuthSettings, RequestLimits
from apps.edge.auth import KeyTable, key_hash
from apps.errors import GatewayError, error_json
from apps.observability import tracing
from apps.observability.telemetry import RECORD_SCOPE_KEY, RequestTelemetry
from apps.shaping.prefixes import VolatilePrefixWatch
from apps.shaping.validation import parse_body, shape_request
from scripts.workloads import make_workload

REPETITIONS = 20_000
ROUNDS = 5
LIMITS = RequestLimits()
# A reservation's lease with the default admission (queue 10 s, request 600 s) and its margin.
LEASE_S = 670.0
KEY = "sk-benchmark"
API_KEY = ApiKey(
    name="bench", sha256=key_hash(KEY), requests_per_minute=10**9, tokens_per_minute=10**12
)


def cpu_us_per_call(function: Callable[[], object], repetitions: int = REPETITIONS) -> float:
    """Best-of-rounds CPU microseconds per call (the minimum is the least disturbed round)."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.process_time()
        for _ in range(repetitions):
            function()
        best = min(best, (time.process_time() - start) / repetitions)
    return best * 1e6


def measure(repetitions: int = REPETITIONS) -> dict[str, float]:
    chat = make_workload("chat", 1, seed=0)[0].body("tiny-chat")
    raw = json.dumps(chat).encode()
    too_many = json.dumps(chat | {"max_tokens": 10_000}).encode()

    keys = KeyTable(AuthSettings(enabled=True, keys=[API_KEY]))
    limits = KeyLimits([API_KEY], lease_s=3600)
    gate = ModelGate(
        "tiny-chat", max_in_flight=1, max_queued=1, queue_timeout_s=1, shed_depth=shed_depths(1, 0.5, 0.8)
    )
    loop = asyncio.new_event_loop()

    def accepted() -> object:
        return shape_request(parse_body(raw), "chat", "tiny-chat", LIMITS)

    def rejected() -> object:
        try:
            shape_request(parse_body(too_many), "chat", "tiny-chat", LIMITS)
        except GatewayError as error:
            return error_json(error)
        raise AssertionError("expected a rejection")

    def reserve_and_settle() -> None:
        decision = limits.reserve("bench", 300, limits=API_KEY, lease_s=LEASE_S)  # as the limiter gets it
        limits.settle(decision.reservation, 200)

    async def gate_round_trips(count: int) -> None:
        for _ in range(count):
            gate.release(await gate.acquire("normal"))

    def async_us(rounds: Callable[[int], object]) -> float:
        best = float("inf")
        for _ in range(ROUNDS):
            start = time.process_time()
            loop.run_until_complete(rounds(repetitions))
            best = min(best, (time.process_time() - start) / repetitions)
        return best * 1e6

    watch = VolatilePrefixWatch("tiny-chat", lambda kind: None)
    body = parse_body(raw)

    # One answered request through an ASGI app, bare and inside the telemetry middleware (which
    # records the metrics and formats the access line; the log goes to memory, as to a file).
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}

    async def answer(scope, receive, send) -> None:
        record = scope.get(RECORD_SCOPE_KEY)
        if record is not None:
            record.model, record.key = "tiny-chat", "bench"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    async def receive() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message) -> None:
        pass

    def asgi_rounds(app):
        async def rounds(count: int) -> None:
            for _ in range(count):
                await app(dict(scope), receive, send)

        return rounds

    log = logging.getLogger("ray.serve")
    log.handlers, log.propagate, log.level = [logging.StreamHandler(io.StringIO())], False, logging.INFO
    telemetry_us = async_us(asgi_rounds(RequestTelemetry(answer))) - async_us(asgi_rounds(answer))

    results = {
        "request_bytes": len(raw),
        "parse_body_us": cpu_us_per_call(lambda: parse_body(raw), repetitions),
        "parse_and_shape_us": cpu_us_per_call(accepted, repetitions),
        "rejected_with_error_body_us": cpu_us_per_call(rejected, repetitions),
        "authenticate_us": cpu_us_per_call(lambda: keys.authenticate(f"Bearer {KEY}"), repetitions),
        "gate_acquire_release_us": async_us(gate_round_trips),
        "limiter_reserve_settle_us": cpu_us_per_call(reserve_and_settle, repetitions),
        "volatile_prefix_scan_us": cpu_us_per_call(lambda: watch.check(body, "chat"), repetitions),
        "telemetry_middleware_us": telemetry_us,
    }
    results |= tracing_costs(repetitions)
    loop.close()
    return results


def one_requests_spans() -> None:
    """Every span one request makes, in every process (`apps.observability.tracing`), as the code
    makes them."""
    headers = [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    root = tracing.request_span("POST", "/v1/chat/completions", headers)
    for name in ("authenticate", "read", "shape", "rate_limit", "queue"):
        with tracing.child(root, name) as span:
            span.set_attribute("gateway.priority", "normal")
    with tracing.child(root, "model_call", {"gateway.attempt": 1}) as call:
        carried = tracing.carrier(call)  # to the router and the model server
        tracing.child(carried, "route", {"gateway.route.reason": "prefix_affinity"}).end()
        engine = tracing.child(carried, "model_server", {"gateway.replica": "r"})
        tracing.carrier(engine)  # to vLLM
        engine.set_attribute("gen_ai.usage.output_tokens", 64)
        engine.end()
    relay = tracing.child(root, "relay")
    relay.end()
    if root is not None:
        tracing.trace_id(root)  # the header and the access line
        root.set_attributes({"http.response.status_code": 200, "gen_ai.request.model": "tiny-chat"})
        root.end()


def tracing_costs(repetitions: int) -> dict[str, float]:
    """One request's spans with tracing off (the shipped default) and on. On: each span
    encoded to OTLP protobuf by the batch processor's thread (counted: process time is every
    thread's), not sent."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class EncodingExporter(SpanExporter):
        def export(self, spans) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    processor = BatchSpanProcessor(EncodingExporter(), max_queue_size=100_000)
    provider.add_span_processor(processor)
    traced = provider.get_tracer("ingress-cost")
    made_by = tracing.tracer
    try:
        tracing.tracer = lambda: None
        off = cpu_us_per_call(one_requests_spans, repetitions)

        tracing.tracer = lambda: traced
        rounds = max(1, repetitions // 10)  # spans pile up in memory until exported

        def traced_round() -> None:
            for _ in range(rounds):
                one_requests_spans()
            processor.force_flush()

        on = cpu_us_per_call(traced_round, 1) / rounds
    finally:
        tracing.tracer = made_by
        provider.shutdown()
    return {"tracing_off_spans_us": off, "tracing_on_spans_us": on}


if __name__ == "__main__":
    results = measure()
    for name, value in results.items():
        print(f"{name:30s} {value:10.2f}")
    print(json.dumps(results))
