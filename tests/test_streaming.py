"""Coalescing contract: the first event leaves at once, events that are ready together travel
together, nothing is lost or reordered, errors surface, and a consumer that leaves closes the
source (which is how an engine request gets aborted)."""

from __future__ import annotations

import asyncio

import pytest

from apps.errors import EngineRejected
from apps.streaming import coalesce, first_event_error, translate_error_events


async def collect(source):
    return [chunk async for chunk in coalesce(source)]


def test_events_ready_together_travel_as_one_message():
    async def burst():
        for i in range(5):
            yield f"data: {i}\n\n"  # no await between: all ready at once

    chunks = asyncio.run(collect(burst()))
    assert b"".join(chunks) == b"".join(f"data: {i}\n\n".encode() for i in range(5))
    assert len(chunks) < 5, f"expected coalescing, got {len(chunks)} messages"


def test_slow_events_are_sent_one_by_one():
    async def trickle():
        for i in range(3):
            await asyncio.sleep(0.01)
            yield f"e{i}"

    assert asyncio.run(collect(trickle())) == [b"e0", b"e1", b"e2"]


def test_source_error_is_raised_after_events_before_it():
    async def failing():
        yield "ok"
        raise RuntimeError("engine died")

    async def run():
        received = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for chunk in coalesce(failing()):
                received.append(chunk)
        return received

    assert asyncio.run(run()) == [b"ok"]


def test_consumer_leaving_closes_the_source():
    closed = asyncio.Event()

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.001)
                yield "x"
        finally:
            closed.set()

    async def run():
        chunks = coalesce(endless())
        await anext(chunks)
        await chunks.aclose()
        return closed.is_set()

    assert asyncio.run(run()), "the source generator was not closed"


def test_consumer_task_cancelled_while_waiting_cancels_the_source():
    """Serve's default path: the replica's task is cancelled while the stream waits for events."""
    source_cancelled = asyncio.Event()

    async def stalled():
        yield "first"
        try:
            await asyncio.sleep(3600)  # an engine still computing the next token
            yield "never"
        except asyncio.CancelledError:
            source_cancelled.set()
            raise

    async def consume():
        async for _ in coalesce(stalled()):
            pass

    async def run():
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return source_cancelled.is_set()

    assert asyncio.run(run()), "cancelling the consumer did not cancel the engine's generator"


VLLM_ERROR = b'data: {"error": {"message": "bad top_p", "type": "BadRequestError", "param": "top_p", "code": 400}}'


def test_stream_opening_with_an_error_gets_its_status():
    error = first_event_error(VLLM_ERROR + b"\n\ndata: [DONE]\n\n")
    assert isinstance(error, EngineRejected)
    assert (error.status, error.param, error.message) == (400, "top_p", "bad top_p")
    assert first_event_error(b'data: {"id": "x"}\n\n') is None


def test_error_events_inside_a_stream_use_openai_error_format():
    chunk = b'data: {"id": "x"}\n\n' + VLLM_ERROR + b"\n\ndata: [DONE]\n\n"
    events = translate_error_events(chunk).split(b"\n\n")
    assert events[0] == b'data: {"id": "x"}' and events[2] == b"data: [DONE]"
    assert events[1] == (
        b'data: {"error": {"message": "bad top_p", "type": "invalid_request_error", '
        b'"param": "top_p", "code": "invalid_request"}}'
    )
    plain = b'data: {"content": "\\"error\\""}\n\n'
    assert translate_error_events(plain) is plain
