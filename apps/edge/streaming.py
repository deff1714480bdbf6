"""The wire between a model server and the ingress: accepted, one head, then raw bytes.

A model server's `generate` yields `Accepted` as soon as a replica runs the call (so the ingress
can tell waiting for a replica from waiting for the engine: `apps.routing.failover`), then a
`ResponseHead` (status, media type and the first bytes of the body), then `bytes` for the rest of
a stream, the last of them as a `LastChunk`. The
ingress thus knows the status before it sends a byte, moves bytes without parsing or
re-serialising JSON, and learns the request's token usage from the head (a whole answer) or the
last chunk (a stream) without an extra message.

Every message costs CPU on every hop (model server, ingress, HTTP), CPU the engine then lacks.
`coalesce` sends the first event at once and joins whatever events are ready together. Under load
it also bounds the replica's message rate: with S streams open and a budget of M messages per
engine step, each stream's later messages carry at least ceil(S / M) events (one per engine step),
so the hops' work stays a bounded share of the engine's. There is no timer: at S <= M every token
is its own message (lowest inter-token latency); above, tokens arrive in small groups.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from ray.serve.handle import DeploymentResponseGenerator
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from apps.engine.usage import Usage
from apps.errors import (
    CLIENT_CLOSED_REQUEST,
    JSON_MEDIA_TYPE,
    DeadlineExceeded,
    EngineUnavailable,
    ErrorStyle,
    GatewayError,
    engine_error,
    error_event,
    error_json,
    model_call_error,
)
from apps.routing.failover import is_lost_replica_code, is_replica_lost
from apps.routing.resume import MAX_RESUMES, StreamIdentity

SSE_MEDIA_TYPE = "text/event-stream"
# Proxies must not buffer or transform an event stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# An error event of vLLM's stream generators. Inside generated text a quote is escaped, so
# this prefix only ever starts an event.
VLLM_ERROR_EVENT = b'data: {"error"'


@dataclass(frozen=True)
class Accepted:
    """The first message of every model call: a replica runs it. `startup_s`: how long that
    replica took to start, the ingress's estimate of how long a replacement takes; `replica_id`:
    which replica, so that a call sent again can avoid it."""

    startup_s: float
    replica_id: str


@dataclass(frozen=True)
class ResponseHead:
    """The first message of every response: status, media type and the first body bytes."""

    status: int
    media_type: str
    body: bytes
    usage: Usage | None = None  # when the head is the whole answer
    code: str | None = None  # an error answer's OpenAI error code
    # A stream that may be resumed elsewhere (`apps.routing.resume`): its identity and the ids of the
    # tokens in `body`.
    identity: StreamIdentity | None = None
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class TokenChunk:
    """A message of a resumable stream: its bytes and the ids of the tokens in them."""

    body: bytes
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class LastChunk:
    """A stream's last message: its final bytes, and the tokens the request used."""

    body: bytes
    usage: Usage
    status: int = 200  # not 200: the stream ended with this error's event
    code: str | None = None


@dataclass(frozen=True)
class StreamEnd:
    """How a relayed stream ended: 200 (completed), 499 (the client left), or an error's status."""

    status: int
    code: str | None = None
    usage: Usage | None = None

    @property
    def completed(self) -> bool:
        return self.status == 200


def error_head(
    error: GatewayError, usage: Usage | None = None, style: ErrorStyle = "openai"
) -> ResponseHead:
    """A whole error response: the status and the error body (OpenAI's, or Anthropic's)."""
    return ResponseHead(error.status, JSON_MEDIA_TYPE, error_json(error, style), usage, error.code)


def first_event_error(chunk: bytes) -> GatewayError | None:
    """The error a stream opens with (vLLM's in-stream report), translated; None if it has none."""
    if not chunk.startswith(VLLM_ERROR_EVENT):
        return None
    return _vllm_event_error(chunk.split(b"\n\n", 1)[0])


def translate_error_events(chunk: bytes) -> bytes:
    """Rewrite vLLM's in-stream error events into OpenAI's error object; other bytes pass as they are."""
    if VLLM_ERROR_EVENT not in chunk:
        return chunk
    events = chunk.split(b"\n\n")
    for i, event in enumerate(events):
        if event.startswith(VLLM_ERROR_EVENT):
            events[i] = b"data: " + error_json(_vllm_event_error(event))
    return b"\n\n".join(events)


def _vllm_event_error(event: bytes) -> GatewayError:
    info = json.loads(event[len(b"data: ") :])["error"]
    return engine_error(int(info.get("code") or 500), str(info.get("message")), info.get("param"))


class _EndOfStream:
    pass


_END = _EndOfStream()


def events_per_message(open_streams: int, messages_per_step: int | None) -> int:
    """Fewest events a stream's next message waits for: 1, or ceil(streams / budget) above it."""
    if messages_per_step is None or open_streams <= messages_per_step:
        return 1
    return -(-open_streams // messages_per_step)


async def coalesce(
    events: AsyncIterator[str],
    group_size: Callable[[], int] = lambda: 1,
    progress: Callable[[], int] = lambda: 0,
) -> AsyncIterator[tuple[bytes, int]]:
    """Yield the events of `events` as bytes, joining those that are ready at the same time,
    each message with `progress()` as it was when its last event arrived (the model server's
    count of generated tokens: the tokens whose events the message holds).

    A background task drains `events` into a queue, so the engine's generator keeps running while
    the consumer is busy sending; each `yield` takes everything queued so far. After the first
    message, each waits until it holds `group_size()` events or the stream has ended. When the
    consumer stops early (closed, or its task cancelled because the client left), the drain task
    is cancelled: the CancelledError raised inside vLLM's generator makes vLLM abort the request.
    """
    queue: deque[tuple[str, int] | BaseException | _EndOfStream] = deque()
    # Set when the consumer has a message to send: enough events, or the stream's end. The
    # consumer is woken once a message, not once an event.
    ready = asyncio.Event()
    wanted = 1  # the first message goes as soon as anything is ready

    def put(item: tuple[str, int] | BaseException | _EndOfStream) -> None:
        queue.append(item)
        if not isinstance(item, tuple) or len(queue) >= wanted:
            ready.set()

    async def drain() -> None:
        try:
            async for event in events:
                put((event, progress()))
        except Exception as exc:  # handed to the consumer, which re-raises it
            put(exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # cancelled by the consumer below: it is leaving
            # The source itself was cancelled: the client must not see a silently cut stream.
            put(RuntimeError("the engine stream was cancelled"))
        finally:
            put(_END)

    task = asyncio.create_task(drain())
    try:
        while True:
            await ready.wait()
            # Clear, take everything queued so far, then set the next size, all before the
            # yield: whatever arrives while the message is sent is judged by the new size.
            ready.clear()
            items = list(queue)
            queue.clear()
            wanted = group_size()
            ready_events = [item for item in items if isinstance(item, tuple)]
            if ready_events:
                yield "".join(event for event, _ in ready_events).encode(), ready_events[-1][1]
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


class RelayResponse(StreamingResponse):
    """The ingress side of a stream: the model server's SSE bytes, relayed as they arrive.

    However the response ends (client gone, Starlette cancelling the sending task before the
    body iterator ever ran, an error, the deadline), the model call is cancelled unless it
    finished, which aborts the engine request, and `on_close(StreamEnd)` runs once. A failure
    or the deadline after the headers went out ends the stream with an error event. The deadline
    is one timer, not a check per chunk.

    A resumable stream (`resume` given, `apps.routing.resume`) keeps the ids of the tokens relayed so
    far; when its replica is lost, `resume(ids)` continues it on another replica (at most
    MAX_RESUMES times) and the relay goes on with that call's bytes.
    """

    def __init__(
        self,
        first: bytes,
        stream: DeploymentResponseGenerator,
        model_id: str,
        *,
        headers: Mapping[str, str],
        deadline: float | None,
        on_close: Callable[[StreamEnd], None],
        token_ids: tuple[int, ...] = (),
        resume: Callable[[tuple[int, ...]], Awaitable[tuple[DeploymentResponseGenerator, ResponseHead]]]
        | None = None,
        errors: ErrorStyle = "openai",
    ) -> None:
        super().__init__(
            self._relay(first), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS | dict(headers)
        )
        self._stream = stream
        self._model_id = model_id
        self._deadline = deadline
        self._on_close = on_close
        self._token_ids = list(token_ids)
        self._resume = resume
        self._errors = errors  # how a failure's event is written (`apps.errors.error_event`)
        self._finished = False  # the model's stream ended (cleanly or not): nothing to cancel
        self._timed_out = False
        self._end: StreamEnd | None = None  # how the model's stream ended, once it has

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timer = None
        if self._deadline is not None:
            timer = asyncio.get_running_loop().call_at(self._deadline, self._expire)
        try:
            await super().__call__(scope, receive, send)
        finally:
            if timer is not None:
                timer.cancel()
            if not self._finished:
                self._stream.cancel()
            self._on_close(self._end or StreamEnd(CLIENT_CLOSED_REQUEST))  # not an error answer

    def _expire(self) -> None:
        if not self._finished:
            self._timed_out = True
            self._stream.cancel()

    async def _relay(self, first: bytes) -> AsyncIterator[bytes]:
        yield first
        end = StreamEnd(200)
        resumes = 0
        while True:
            try:
                async for chunk in self._stream:
                    if isinstance(chunk, TokenChunk):
                        self._token_ids.extend(chunk.token_ids)
                        chunk = chunk.body
                    elif isinstance(chunk, LastChunk):
                        if self._resume is not None and is_lost_replica_code(chunk.code):
                            # Its engine died mid-stream: resumable like a replica that died.
                            raise EngineUnavailable(f"The engine of model {self._model_id} stopped.")
                        end = StreamEnd(chunk.status, chunk.code, chunk.usage)
                        chunk = chunk.body
                    yield chunk
                break
            except Exception as exc:
                failure: Exception = exc
                if self._may_resume(exc, resumes):
                    resumes += 1
                    try:
                        self._stream, head = await self._resume(tuple(self._token_ids))
                    except Exception as resume_failure:
                        failure = resume_failure
                    else:
                        self._token_ids.extend(head.token_ids)
                        if head.usage is not None:  # the rest came whole
                            end = StreamEnd(200, usage=head.usage)
                        yield head.body
                        continue
                error: GatewayError
                if self._timed_out:
                    error = DeadlineExceeded(f"The request to model {self._model_id} ran past its timeout.")
                else:
                    error = model_call_error(self._model_id, failure)
                end = StreamEnd(error.status, error.code)
                yield error_event(error, self._errors)
                break
        self._finished = True
        self._end = end

    def _may_resume(self, failure: Exception, resumes: int) -> bool:
        return (
            self._resume is not None
            and not self._timed_out
            and resumes < MAX_RESUMES
            and is_replica_lost(failure)
        )
