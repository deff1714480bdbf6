"""The ingress's request record and access line, pure logic: the middleware around a plain ASGI
app (no Ray). That the numbers reach Prometheus is tested against the real app in
tests/test_observability.py."""

from __future__ import annotations

import asyncio
import logging

import pytest

from apps.engine.usage import Usage
from apps.observability.telemetry import (
    IN_FLIGHT,
    RECORD_SCOPE_KEY,
    RequestRecord,
    RequestTelemetry,
    access_line,
)


def run(app, headers=()) -> tuple[RequestRecord, list[dict]]:
    """Send one HTTP request through `RequestTelemetry(app)`; the record and the messages sent."""
    sent: list[dict] = []
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": list(headers)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    async def main():
        try:
            await RequestTelemetry(app)(scope, receive, send)
        except Exception:
            pass
        return scope[RECORD_SCOPE_KEY]

    return asyncio.run(main()), sent


def streaming_app(*, chunks: int, fail: bool = False):
    async def app(scope, receive, send):
        record = scope[RECORD_SCOPE_KEY]
        record.model, record.key, record.stream = "m", "team-a", True
        record.admit(0.25)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(chunks):
            await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        if fail:
            raise RuntimeError("boom")
        record.usage = Usage(prompt_tokens=11, completion_tokens=chunks)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def test_a_completed_stream_has_its_times_tokens_and_id(caplog):
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        record, sent = run(streaming_app(chunks=3), headers=[(b"x-request-id", b"req-42")])
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 4
    assert record.request_id == "req-42"
    assert record.completed and record.final_status == 200
    assert IN_FLIGHT[("m", "team-a")] == 0, "admitted, then answered"
    assert record.arrived < record.first_byte < record.last_byte
    assert record.last_byte - record.first_byte >= 0.015, "two sleeps between first and last byte"
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("access ")]
    fields = dict(pair.split("=", 1) for pair in line.removeprefix("access ").split())
    assert fields | {"ttft_ms": "", "total_ms": ""} == {
        "request_id": "req-42",
        "endpoint": "chat",
        "model": "m",
        "key": "team-a",
        "status": "200",
        "reason": "-",
        "stream": "true",
        "prompt_tokens": "11",
        "completion_tokens": "3",
        "queue_ms": "250.0",
        "ttft_ms": "",
        "total_ms": "",
        "trace_id": "-",  # tracing is off
    }
    assert 0 < float(fields["ttft_ms"]) < float(fields["total_ms"])


def test_an_app_error_before_the_status_line_is_a_500():
    async def app(scope, receive, send):
        raise RuntimeError("boom")

    record, sent = run(app)
    assert sent == []
    assert (record.final_status, record.reason, record.completed) == (500, "internal_error", False)


def test_a_stream_that_fails_after_its_200_is_not_completed():
    record, _ = run(streaming_app(chunks=2, fail=True))
    assert record.status == 200
    assert not record.completed
    assert record.last_byte is None


@pytest.mark.parametrize(
    ("status", "end_status", "final"),
    [(200, None, 200), (200, 504, 504), (429, None, 429), (0, None, 499), (200, 499, 499)],
)
def test_the_final_status_is_how_the_answer_really_ended(status, end_status, final):
    record = RequestRecord(request_id="r", arrived=0.0, status=status, end_status=end_status)
    assert record.final_status == final


def test_the_access_line_marks_what_is_unknown():
    record = RequestRecord(request_id="", arrived=1.0, status=429, reason="rate_limit_exceeded")
    assert access_line(record) == (
        "access request_id=- endpoint=- model=- key=- status=429 reason=rate_limit_exceeded stream=false "
        "prompt_tokens=- completion_tokens=- queue_ms=- ttft_ms=- total_ms=- trace_id=-"
    )
