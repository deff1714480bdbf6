"""Tracing's switch and plumbing without Ray: the standard environment, the no-op when off, and a
trace context carried from one span to a child made from it elsewhere (`apps.observability.tracing`)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from apps.errors import Overloaded
from apps.observability import tracing


@pytest.mark.parametrize(
    ("environ", "endpoint"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "http://collector:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/traces"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "http://collector:4317",
        ),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/traces"}, "http://c:4318/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
    ],
)
def test_the_standard_environment_switches_tracing_on_and_names_the_endpoint(environ, endpoint):
    assert tracing.traces_endpoint(environ) == endpoint


def test_the_protocol_defaults_to_http_and_the_traces_variable_wins():
    assert tracing.protocol({}) == "http/protobuf"
    assert tracing.protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    both = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    assert tracing.protocol(both) == "http/protobuf"


def test_off_every_call_is_a_no_op():
    assert tracing.child(None, "queue") is tracing.NO_SPAN
    with tracing.child(None, "queue") as span:
        span.set_attribute("gateway.priority", "high")
    assert tracing.carrier(tracing.NO_SPAN) is None
    assert tracing.trace_id(None) is None
    tracing.fail(None, "queue_full")


@pytest.fixture
def exported(monkeypatch) -> InMemorySpanExporter:
    """Tracing on, into memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", lambda: provider.get_tracer("test"))
    return exporter


def test_a_client_traceparent_is_continued_and_a_carrier_links_another_process(exported):
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    root = tracing.request_span("POST", "/v1/chat/completions", [(b"traceparent", traceparent.encode())])
    assert tracing.trace_id(root) == "4bf92f3577b34da6a3ce929d0e0e4736"
    with tracing.child(root, "model_call") as call:
        carried = tracing.carrier(call)
        assert set(carried) == {"traceparent"}
        tracing.child(carried, "model_server").end()  # as the replica does, from the carrier
    root.end()
    spans = {span.name: span for span in exported.get_finished_spans()}
    assert spans["POST /v1/chat/completions"].parent.span_id == 0x00F067AA0BA902B7
    assert spans["model_call"].parent.span_id == spans["POST /v1/chat/completions"].context.span_id
    assert spans["model_server"].parent.span_id == spans["model_call"].context.span_id


def test_a_gateway_error_leaving_a_span_sets_its_status_to_the_error_code(exported):
    root = tracing.request_span("POST", "/v1/completions", [])
    assert root.parent is None, "no traceparent: a new trace"
    with pytest.raises(Overloaded):
        with tracing.child(root, "queue"):
            raise Overloaded("full", reason="queue_full", retry_after_s=1)
    (span,) = exported.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "queue_full"
    assert span.attributes["error.type"] == "queue_full"
