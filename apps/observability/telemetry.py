"""Each request's record at the ingress: its outcome and timings as the client saw them, turned into
metrics and one access-log line when the answer's last byte has left.

`RequestTelemetry` is an ASGI middleware around the ingress app, so it sees every answer,
errors and unknown routes included: the status line, the first body bytes (time to first token
of a stream) and the last (time to last token). The handler fills in what only it knows (model,
key, queue wait, tokens, how a stream ended) through the `RequestRecord` it finds in the request's
scope (`request_record`).

Request ids: Serve's proxy takes the client's `x-request-id` or makes one, and returns it on every
response; the access line carries the same id, so a client's complaint leads to its line.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from apps.applications import deployment_name
from apps.endpoints import endpoint_of
from apps.engine.usage import Usage
from apps.errors import CLIENT_CLOSED_REQUEST
from apps.observability import tracing
from apps.observability.metrics import NO_MODEL, UNAUTHENTICATED, ingress_metrics

if TYPE_CHECKING:
    from apps.admission.gate import ModelRoute

logger = logging.getLogger("ray.serve")
RECORD_SCOPE_KEY = "gateway.request_record"
NO_ENDPOINT = "-"  # /health, /v1/models, unknown paths
REQUEST_ID_HEADER = b"x-request-id"
MAX_LOGGED_ID_CHARS = 128
# Ray drops a gauge's series some seconds after its last `set`, so gauges are set again
# periodically, not only when they change.
GAUGE_REFRESH_S = 1.0
# This replica's admitted, unanswered requests per (model, key): the in-flight gauge.
IN_FLIGHT: Counter[tuple[str, str]] = Counter()


@dataclass
class RequestRecord:
    """What is known of one request; times are event-loop times."""

    request_id: str
    arrived: float
    endpoint: str = NO_ENDPOINT  # a row of `apps.endpoints` (a bounded metric label)
    model: str = NO_MODEL
    key: str = UNAUTHENTICATED
    stream: bool = False
    status: int = 0  # the status line sent (0: none sent)
    end_status: int | None = None  # how a 200 stream really ended, when not completed
    reason: str | None = None  # the OpenAI error code of an error answer
    queue_wait_s: float | None = None
    admitted: bool = False
    reached_model: bool = False  # a model replica accepted one of its calls
    usage: Usage | None = None
    first_byte: float | None = None
    last_byte: float | None = None
    span: Any = None  # the request's trace span (`apps.observability.tracing`); None when tracing is off
    relay: tracing.Span | tracing.NoSpan = tracing.NO_SPAN  # from the answer's head to its last byte

    def admit(self, queue_wait_s: float) -> None:
        """The request got a slot of its model after `queue_wait_s`."""
        self.queue_wait_s = queue_wait_s
        self.admitted = True
        IN_FLIGHT[(self.model, self.key)] += 1

    @property
    def final_status(self) -> int:
        return self.end_status or self.status or CLIENT_CLOSED_REQUEST

    @property
    def completed(self) -> bool:
        return self.final_status == 200 and self.last_byte is not None


def request_record(request: Request) -> RequestRecord:
    """The record `RequestTelemetry` keeps for `request` (a detached one outside the middleware)."""
    record = request.scope.get(RECORD_SCOPE_KEY)
    if record is None:
        record = RequestRecord(request_id="", arrived=asyncio.get_running_loop().time())
        request.scope[RECORD_SCOPE_KEY] = record
    return record


class RequestTelemetry:
    """ASGI middleware: times each HTTP answer, then records its metrics and access-log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Starlette builds the middleware on the app's first request: inside the replica.
        self.metrics = ingress_metrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        record = RequestRecord(request_id=_request_id(scope), arrived=loop.time())
        spec = endpoint_of(scope)
        if spec is not None:
            record.endpoint = spec.name
        # Named by the endpoint's path: a client's arbitrary path must not make span names.
        route = spec.path if spec is not None else "-"
        record.span = tracing.request_span(scope["method"], route, scope.get("headers", ()))
        trace_header = _trace_header(record.span)
        scope[RECORD_SCOPE_KEY] = record

        async def timed_send(message: Message) -> None:
            if trace_header is not None and message["type"] == "http.response.start":
                message = message | {"headers": [*message.get("headers", ()), trace_header]}
            await send(message)
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body":
                now = loop.time()
                if record.first_byte is None and message.get("body"):
                    record.first_byte = now
                if not message.get("more_body", False):
                    record.last_byte = now

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            if not record.status:  # Starlette's outermost handler answers it with a 500
                record.end_status, record.reason = 500, record.reason or "internal_error"
            raise
        finally:
            self._finish(record)

    def _finish(self, record: RequestRecord) -> None:
        if record.admitted:
            IN_FLIGHT[(record.model, record.key)] -= 1
        try:
            self._record_metrics(record)
        except Exception:  # metrics must never turn an answered request into an error
            logger.exception("Recording the metrics of request %s failed", record.request_id)
        if record.span is not None:
            try:
                _end_spans(record)
            except Exception:
                logger.exception("Ending the spans of request %s failed", record.request_id)
        logger.info(access_line(record))

    def _record_metrics(self, record: RequestRecord) -> None:
        metrics, tags = self.metrics, _tags(record)
        metrics.requests.inc(tags=tags | {"status": str(record.final_status), "endpoint": record.endpoint})
        if record.reason is not None:
            metrics.rejections.inc(tags=tags | {"reason": record.reason})
        if record.queue_wait_s is not None:
            metrics.queue_wait.observe(record.queue_wait_s, tags=tags)
        if not record.completed:
            return
        assert record.last_byte is not None  # for the type checker: completed says so
        metrics.time_to_last_token.observe(record.last_byte - record.arrived, tags=tags)
        if record.stream and record.first_byte is not None:
            metrics.time_to_first_token.observe(record.first_byte - record.arrived, tags=tags)
            tokens = record.usage.completion_tokens if record.usage else 0
            if tokens > 1:
                itl = (record.last_byte - record.first_byte) / (tokens - 1)
                metrics.inter_token_latency.observe(itl, tags=tags)


async def export_gauges(routes: Callable[[], Mapping[str, ModelRoute]]) -> None:
    """Forever, every `GAUGE_REFRESH_S`: set each model's (`routes()`) queue depth, admission
    bound and most replicas, and the in-flight gauge of every (model, key) seen."""
    metrics = ingress_metrics()
    while True:
        try:
            for model, route in routes().items():
                metrics.queue_depth.set(route.gate.depth, tags={"model": model})
                metrics.max_in_flight.set(route.gate.max_in_flight, tags={"model": model})
                most = route.config.replicas.max_replicas
                metrics.replicas_max.set(most, tags={"model": model, "deployment": deployment_name(model)})
            for (model, key), count in list(IN_FLIGHT.items()):
                metrics.in_flight.set(count, tags={"model": model, "key": key})
        except Exception:  # a failed export must not end the exports
            logger.exception("Exporting the ingress gauges failed")
        await asyncio.sleep(GAUGE_REFRESH_S)


def access_line(record: RequestRecord) -> str:
    """One line per request, `name=value` pairs; `-` for what is not known."""
    usage = record.usage

    def ms(moment: float | None) -> str:
        return "-" if moment is None else f"{(moment - record.arrived) * 1000:.1f}"

    fields = {
        "request_id": record.request_id[:MAX_LOGGED_ID_CHARS] or "-",
        "endpoint": record.endpoint,
        "model": record.model,
        "key": record.key,
        "status": record.final_status,
        "reason": record.reason or "-",
        "stream": str(record.stream).lower(),
        "prompt_tokens": usage.prompt_tokens if usage else "-",
        "completion_tokens": usage.completion_tokens if usage else "-",
        "queue_ms": "-" if record.queue_wait_s is None else f"{record.queue_wait_s * 1000:.1f}",
        "ttft_ms": ms(record.first_byte),
        "total_ms": ms(record.last_byte),
        "trace_id": tracing.trace_id(record.span) or "-",  # `apps.observability.tracing`: - when off
    }
    return "access " + " ".join(f"{name}={value}" for name, value in fields.items())


def _end_spans(record: RequestRecord) -> None:
    """End the request's relay and its own span, with what the client saw."""
    span, usage = record.span, record.usage
    record.relay.set_attribute("http.response.status_code", record.final_status)
    if record.final_status != 200:
        tracing.fail(record.relay, record.reason)
    record.relay.end()
    attributes = {
        "http.response.status_code": record.final_status,
        "gateway.endpoint": record.endpoint,
        tracing.MODEL: record.model,
        "gateway.key": record.key,  # the key's configured name, never the key
        "gateway.request_id": record.request_id[:MAX_LOGGED_ID_CHARS],
        "gateway.stream": record.stream,
    }
    if record.queue_wait_s is not None:
        attributes["gateway.queue_wait_s"] = record.queue_wait_s
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
    if record.first_byte is not None:
        attributes["gateway.time_to_first_byte_s"] = record.first_byte - record.arrived
    span.set_attributes(attributes)
    if record.final_status >= 400:
        tracing.fail(span, record.reason or str(record.final_status))
    span.end()


def _trace_header(span: Any) -> tuple[bytes, bytes] | None:
    """The `x-trace-id` header of an answer whose request is traced."""
    trace_id = tracing.trace_id(span)
    return None if trace_id is None else (tracing.TRACE_ID_HEADER.encode(), trace_id.encode())


def _tags(record: RequestRecord) -> dict[str, str]:
    return {"model": record.model, "key": record.key}


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER:
            return value.decode("latin-1")
    return ""
