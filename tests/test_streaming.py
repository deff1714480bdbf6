"""Coalescing contract: the first event leaves at once, events that are ready together travel
together, nothing is lost or reordered, errors surface, and a consumer that leaves closes the
source (which is how an engine request gets aborted). And how the ingress's relay reports a
stream's end (status, error code, usage) for the metrics and the access log."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from apps.edge.streaming import (
    LastChunk,
    RelayResponse,
    StreamEnd,
    coalesce,
    events_per_message,
    first_event_error,
    translate_error_events,
)
from apps.engine.usage import Usage
from apps.errors import EngineRejected


async def collect(source):
    return [chunk async for chunk, _ in coalesce(source)]


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


def test_under_load_later_messages_wait_for_a_group_of_events():
    async def engine_steps():
        for i in range(7):
            await asyncio.sleep(0.005)  # one event per engine step
            yield f"e{i}"

    async def run():
        return [chunk async for chunk, _ in coalesce(engine_steps(), group_size=lambda: 3)]

    # The first event alone (time to first token), then groups of 3; the end flushes the rest.
    assert asyncio.run(run()) == [b"e0", b"e1e2e3", b"e4e5e6"]


def test_a_group_is_cut_short_by_the_end_of_the_stream_or_an_error():
    async def short(fail: bool):
        for i in range(3):
            await asyncio.sleep(0.005)
            yield f"e{i}"
        if fail:
            raise RuntimeError("engine died")

    async def run(fail: bool):
        received = []
        with contextlib.suppress(RuntimeError):
            async for chunk, _ in coalesce(short(fail), group_size=lambda: 8):
                received.append(chunk)
        return received

    assert asyncio.run(run(fail=False)) == [b"e0", b"e1e2"]
    assert asyncio.run(run(fail=True)) == [b"e0", b"e1e2"]


def test_events_that_arrive_while_a_message_is_being_sent_make_the_next_message():
    """The consumer may be busy sending while the engine goes on: what arrived meanwhile is the
    next message as soon as it is a group (of the group size read after the last message), even
    if the engine then stalls."""
    feed: asyncio.Queue[str | None] = asyncio.Queue()

    async def engine():
        while (event := await feed.get()) is not None:
            yield event

    async def settle():
        for _ in range(5):
            await asyncio.sleep(0)

    async def run():
        chunks = coalesce(engine(), group_size=iter([3, 1, 1, 1]).__next__)
        try:
            feed.put_nowait("a")
            first = await asyncio.wait_for(anext(chunks), 1)
            for event in "bcd":  # while "a" is being sent; the next message wants 3
                feed.put_nowait(event)
            await settle()
            second = await asyncio.wait_for(anext(chunks), 1)
            feed.put_nowait("e")  # while "bcd" is being sent; the next message wants 1
            await settle()
            third = await asyncio.wait_for(anext(chunks), 1)  # the engine is stalled now
            feed.put_nowait(None)
            await settle()
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(anext(chunks), 1)
            return [first[0], second[0], third[0]]
        finally:
            await chunks.aclose()

    assert asyncio.run(run()) == [b"a", b"bcd", b"e"]


@pytest.mark.parametrize(
    ("open_streams", "budget", "expected"),
    [(1, 8, 1), (8, 8, 1), (9, 8, 2), (32, 8, 4), (33, 8, 5), (64, None, 1), (1, 1, 1), (3, 1, 3)],
)
def test_events_per_message_grows_with_the_streams_above_the_budget(open_streams, budget, expected):
    assert events_per_message(open_streams, budget) == expected


def test_source_error_is_raised_after_events_before_it():
    async def failing():
        yield "ok"
        raise RuntimeError("engine died")

    async def run():
        received = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for chunk, _ in coalesce(failing()):
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


# --- how a relayed stream's end is reported (RelayResponse) -----------------------------------


class FakeModelStream:
    """Stands in for the model call's response generator: chunks, then an optional failure."""

    def __init__(self, chunks, fail: Exception | None = None) -> None:
        self._chunks = list(chunks)
        self._fail = fail
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._chunks:
            await asyncio.sleep(0)
            return self._chunks.pop(0)
        if self._fail is not None:
            raise self._fail
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


def relay(stream: FakeModelStream, *, client_leaves: bool = False) -> tuple[list, bytes]:
    """Run a RelayResponse over `stream`; the StreamEnd(s) reported and the bytes sent."""
    ends: list = []
    sent: list[bytes] = []
    response = RelayResponse(b"data: first\n\n", stream, "m", headers={}, deadline=None, on_close=ends.append)

    async def receive():
        await asyncio.sleep(3600)  # the client stays (Starlette listens for a disconnect)
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))
            if client_leaves and len(sent) == 2:
                raise OSError("client gone")

    async def main():
        try:
            await response({"type": "http", "method": "POST", "path": "/"}, receive, send)
        except OSError:
            pass

    asyncio.run(main())
    return ends, b"".join(sent)


def test_a_completed_stream_reports_200_and_the_usage_of_its_last_chunk():
    usage = Usage(prompt_tokens=5, completion_tokens=3)
    stream = FakeModelStream([b"data: x\n\n", LastChunk(b"data: [DONE]\n\n", usage)])
    ends, body = relay(stream)
    assert ends == [StreamEnd(200, None, usage)]
    assert body == b"data: first\n\ndata: x\n\ndata: [DONE]\n\n"
    assert not stream.cancelled


def test_a_stream_that_fails_reports_the_errors_status_and_code():
    stream = FakeModelStream([b"data: x\n\n"], fail=RuntimeError("replica died"))
    ends, body = relay(stream)
    assert [(end.status, end.code) for end in ends] == [(500, "internal_error")]
    assert body.endswith(b"data: [DONE]\n\n") and b'"error"' in body


def test_a_client_that_leaves_is_a_499_without_an_error_code_and_cancels_the_model_call():
    stream = FakeModelStream([b"data: x\n\n", b"data: y\n\n", LastChunk(b"data: [DONE]\n\n", Usage())])
    ends, _ = relay(stream, client_leaves=True)
    assert ends == [StreamEnd(499)]
    assert stream.cancelled


def test_each_message_carries_the_progress_of_its_last_event():
    """The model server's token count as each event was drained: a message's token ids are
    exactly those whose events it holds (apps.routing.resume)."""
    count = 0

    async def counted():
        nonlocal count
        for event in ("a", "b", "c"):
            count += 1  # the engine output is counted before its event is formatted
            yield event
            await asyncio.sleep(0)

    async def run():
        return [message async for message in coalesce(counted(), progress=lambda: count)]

    messages = asyncio.run(run())
    assert "".join(body.decode() for body, _ in messages) == "abc"
    assert messages[-1][1] == 3
    assert [progress for _, progress in messages] == sorted(progress for _, progress in messages)
    assert all(progress == len(b"".join(body for body, _ in messages[: i + 1])) for i, (_, progress) in enumerate(messages))
