"""The wire between a model server and the ingress: one head, then raw bytes.

A model server's `generate` yields a `ResponseHead` first (status, media type and the first bytes
of the body), then `bytes` for the rest of a stream. The ingress thus knows the status before it
sends a byte, and moves bytes without parsing or re-serialising JSON.

Every Ray message costs CPU on both sides, so `coalesce` sends each SSE event as soon as it is
ready, and whatever events pile up while a message is in flight travel together as the next one.
There is no timer: at low load every token is its own message (lowest TTFT and inter-token
latency), under load the message count drops by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.serve.handle import DeploymentResponseGenerator

from apps.errors import error_event, model_call_error

SSE_MEDIA_TYPE = "text/event-stream"


@dataclass(frozen=True)
class ResponseHead:
    """The first message of every response: status, media type and the first body bytes."""

    status: int
    media_type: str
    body: bytes


class _EndOfStream:
    pass


_END = _EndOfStream()


async def coalesce(events: AsyncIterator[str]) -> AsyncIterator[bytes]:
    """Yield the events of `events` as bytes, joining those that are ready at the same time.

    A background task drains `events` into a queue, so the engine's generator keeps running while
    the consumer is busy sending; each `yield` takes everything queued so far. When the consumer
    stops early (client gone), the drain task is cancelled, which closes `events`: vLLM then
    aborts the request in the engine.
    """
    queue: asyncio.Queue[str | BaseException | _EndOfStream] = asyncio.Queue()

    async def drain() -> None:
        try:
            async for event in events:
                queue.put_nowait(event)
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(drain())
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            ready = [item for item in items if isinstance(item, str)]
            if ready:
                yield "".join(ready).encode()
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                if item is _END:
                    return
    finally:
        if not task.done():
            task.cancel()
            # Wait, so the engine request is aborted before this generator is reported closed.
            await asyncio.gather(task, return_exceptions=True)


async def relay(first: bytes, stream: DeploymentResponseGenerator, model_id: str) -> AsyncIterator[bytes]:
    """The ingress side: a stream's bytes as they arrive from the model server.

    If the client leaves, Starlette cancels this generator and the `finally` cancels the model
    call, which aborts the engine request. A failure after the headers went out ends the stream
    with an error event.
    """
    finished = False
    try:
        yield first
        async for chunk in stream:
            yield chunk
        finished = True
    except Exception as exc:
        finished = True
        yield error_event(model_call_error(model_id, exc))
    finally:
        if not finished:
            stream.cancel()
