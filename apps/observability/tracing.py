"""OpenTelemetry traces: one trace per request, across the ingress, its router, the model server
and vLLM's engine.

Switched on by OpenTelemetry's standard environment, read by every process of the app (Ray's
workers inherit the environment of `ray start` or `serve run`, or take a Serve application's
`runtime_env.env_vars`):

    OTEL_EXPORTER_OTLP_ENDPOINT            the collector (http://host:4318), or
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT     its traces URL (http://host:4318/v1/traces)
    OTEL_EXPORTER_OTLP_PROTOCOL            http/protobuf (default) or grpc (then host:4317)
    OTEL_SERVICE_NAME                      default llm-gateway
    OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*, OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER=none

With neither endpoint set, tracing is off: `request_span` returns None, `child` a shared no-op,
and nothing is imported from OpenTelemetry.

The spans of a request (names as exported):

    POST /v1/chat/completions      the ingress (SERVER): status, model, key name, tokens, error code
      authenticate, read, shape, rate_limit, queue (its priority class)
      model_call                   one per call of the model (a call sent again, a resume: another)
        route                      the request router's choice: the preferred replica and why
        model_server               the replica's engine request: prompt, cached and generated
                                   tokens, time to first token, finish reason
          llm_request              vLLM's own span (`otlp_traces_endpoint`), same trace
      relay                        from the answer's head to its last byte

A call carries its trace context to the other processes as a W3C `traceparent` carrier (a dict):
the router and the model server continue the trace from it, and the model server hands it to
vLLM as the request's `trace_headers`.

The gateway's spans go through a tracer provider of its own, not OpenTelemetry's global one:
vLLM's engine sets the global provider in the model server's process, with its own resource.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("ray.serve")
DEFAULT_SERVICE_NAME = "llm-gateway"
HTTP_PROTOCOL, GRPC_PROTOCOL = "http/protobuf", "grpc"
TRACE_ID_HEADER = "x-trace-id"  # every answer's, while tracing is on
# Attribute names: OpenTelemetry's semantic conventions where they have one (HTTP, GenAI).
MODEL = "gen_ai.request.model"
ERROR_TYPE = "error.type"


def traces_endpoint(environ: Mapping[str, str] = os.environ) -> str | None:
    """Where this process exports spans, from the standard environment; None when tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return None
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if endpoint:
        return endpoint
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not base:
        return None
    # The generic endpoint is the collector's base: HTTP exporters add the signal's path.
    return base if protocol(environ) == GRPC_PROTOCOL else f"{base.rstrip('/')}/v1/traces"


def protocol(environ: Mapping[str, str] = os.environ) -> str:
    """The OTLP protocol asked for: http/protobuf (the specification's default) or grpc."""
    chosen = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    return GRPC_PROTOCOL if chosen == GRPC_PROTOCOL else HTTP_PROTOCOL


@functools.cache
def tracer() -> Any:
    """This process's tracer, made on first use; None when tracing is off, or could not be set up
    (logged once: a broken exporter must not fail the requests)."""
    endpoint = traces_endpoint()
    if endpoint is None:
        return None
    try:
        return _new_tracer(endpoint)
    except Exception:
        logger.exception("Tracing could not be set up (%s): no spans from this process.", endpoint)
        return None


def _new_tracer(endpoint: str) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if protocol() == GRPC_PROTOCOL:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Resource.create adds OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, but the attributes it is
    # given win over both: the default name only where neither names the service.
    attributes: dict[str, Any] = {"process.pid": os.getpid()}
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    if not named:
        attributes[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    resource = Resource.create(attributes)
    provider = TracerProvider(resource=resource)  # its sampler from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    logger.info("Tracing on: spans exported to %s (%s).", endpoint, protocol())
    return provider.get_tracer("llm-gateway")


def request_span(method: str, path: str, headers: Any) -> Any:
    """The ingress's span of one HTTP request, continuing the client's `traceparent` if it sent
    one; None when tracing is off. `headers`: the ASGI scope's (bytes pairs)."""
    active = tracer()
    if active is None:
        return None
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
    attributes = {"http.request.method": method, "url.path": path}
    return active.start_span(
        f"{method} {path}", context=extract(carrier), kind=SpanKind.SERVER, attributes=attributes
    )


def child(parent: Any, name: str, attributes: Mapping[str, Any] | None = None) -> Span | NoSpan:
    """A span under `parent` (a span, or a carrier from `carrier`), to use as a context
    manager; the shared no-op when tracing is off (`parent` None)."""
    if parent is None:
        return NO_SPAN
    active = tracer()
    if active is None:
        return NO_SPAN
    from opentelemetry.propagate import extract
    from opentelemetry.trace import set_span_in_context

    context = extract(parent) if isinstance(parent, Mapping) else set_span_in_context(_otel(parent))
    return Span(active.start_span(name, context=context, attributes=attributes))


def carrier(span: Any) -> dict[str, str] | None:
    """`span`'s context as W3C trace-context headers, for another process; None when off."""
    otel_span = _otel(span)
    if otel_span is None:
        return None
    from opentelemetry.propagate import inject
    from opentelemetry.trace import set_span_in_context

    headers: dict[str, str] = {}
    inject(headers, context=set_span_in_context(otel_span))
    return headers


def trace_id(span: Any) -> str | None:
    """`span`'s trace id as 32 hex digits (what the access log and `x-trace-id` carry)."""
    if span is None:
        return None
    return format(span.get_span_context().trace_id, "032x")


def fail(span: Any, code: str | None, message: str | None = None) -> None:
    """Mark `span` failed with the OpenAI error `code` of the answer."""
    if span is None or span is NO_SPAN:
        return
    from opentelemetry.trace import Status, StatusCode

    otel_span = _otel(span)
    otel_span.set_attribute(ERROR_TYPE, code or "error")
    otel_span.set_status(Status(StatusCode.ERROR, code or message))


def _otel(span: Any) -> Any:
    """The OpenTelemetry span behind `span` (a `Span`, `NO_SPAN`'s None, or an OpenTelemetry span)."""
    return span.span if isinstance(span, (Span, NoSpan)) else span


class Span:
    """A gateway span as a context manager: ended on exit; a `GatewayError` leaving it sets its
    status to that error's code (any other exception, to its type)."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def __enter__(self) -> Span:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        if exc is not None:
            fail(self, getattr(exc, "code", None) or exc_type.__name__, str(exc))
        self.span.end()

    def set_attribute(self, name: str, value: Any) -> None:
        if value is not None:
            self.span.set_attribute(name, value)

    def end(self) -> None:
        self.span.end()


class NoSpan:
    """What `child` returns while tracing is off: every method does nothing."""

    __slots__ = ()
    span = None

    def __enter__(self) -> NoSpan:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def set_attribute(self, name: str, value: Any) -> None:
        return None

    def end(self) -> None:
        return None


NO_SPAN = NoSpan()
