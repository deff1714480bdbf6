"""Coalescing contract: the first event leaves at once, events that are ready together travel
together, nothing is lost or reordered, errors surface, and a consumer that leaves closes the
source (which is how an engine request gets aborted)."""

from __future__ import annotations

import asyncio

import pytest

from apps.streaming import coalesce


async def collect(source):
    return [chunk async for chunk in coalesce(source)]


def test_events_ready_together_travel_as_one_message():
    async def burst():
        for i in range(5):
            yield f"data: {i}\n\n"  # no await between: all ready at once

    chunks = asyncio.run(collect(burst()))
    assert b"".join(chunks) == b"".join(f"data: {i}\n\n".encode() for i in range(5))
    assert len(chunks) < 5, f"expected coalescing, got {len(chunks)} messages"


def test_slow_events_are_sent_one_by_one_without_delay():
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
