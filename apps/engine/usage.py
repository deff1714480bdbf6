"""Each request's real token counts, read at the engine, and the exact prompt-length cap.

vLLM's OpenAI layer reports usage only in its answer, which a client who disconnects never gets
and a stream carries only when asked. The rate limiter needs the truth in every case, so the
model server hands vLLM's serving layer a `MeteredEngine`: the same engine, whose `generate` also
counts the prompt and every generated token (`encode`, a pooling request's: its prompt) into the
`Usage` of the request being served (a
context variable: each request runs in its own task). A streamed request's count grows as its
tokens come out, so it is exact however the request ends. A non-streaming request's tokens come
out only at its end (vLLM's FINAL_ONLY output): cut short, its count is unknown, and it is
settled as using all it reserved.

The prompt cap is checked there as well: on the real token count, after the chat template, before
the engine sees the request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass
class Usage:
    """Tokens one request has used so far: every prompt it sent to the engine, every choice's output."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Engine calls whose outputs arrive only when they finish, and have not: tokens unknown.
    unfinished_final_only: int = 0
    # The generated token ids, in order, when the request may be resumed elsewhere (`apps.routing.resume`).
    output_token_ids: list[int] | None = None
    # Of completion_tokens, those another replica generated before this one resumed the stream:
    # the client is charged for them once (here); this engine prefilled them as prompt.
    resumed_tokens: int = 0
    # What the engine reported besides counts, for the request's trace (`apps.observability.tracing`): prompt
    # tokens served from the prefix cache, when the first token came (time.monotonic()), and why
    # the first choice finished.
    cached_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Sent to the ingress with the answer, which needs the counts only: the ids stay here.
        return self.__dict__ | {"output_token_ids": None}

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def settled_tokens(self) -> int | None:
        """What to settle the request's reservation with: its tokens, or None (all it reserved)
        when some of them are unknown."""
        return None if self.unfinished_final_only else self.total_tokens


_current_usage: ContextVar[Usage | None] = ContextVar("current_usage", default=None)
_current_resume: ContextVar[tuple[int, ...] | None] = ContextVar("current_resume", default=None)
_current_prompt_cap: ContextVar[int | None] = ContextVar("current_prompt_cap", default=None)
_current_trace: ContextVar[Mapping[str, str] | None] = ContextVar("current_trace", default=None)


def start_usage(
    *,
    track_ids: bool = False,
    resume: tuple[int, ...] | None = None,
    max_prompt_tokens: int | None = None,
    trace_headers: Mapping[str, str] | None = None,
) -> Usage:
    """A fresh `Usage` that engine calls made from this task (and tasks it starts) count into.
    `track_ids`: keep the generated ids. `resume`: ids generated elsewhere that the engine call
    continues from (appended to its prompt; they count as this request's output).
    `max_prompt_tokens`: the model's prompt cap (a live setting, so it comes with the request).
    `trace_headers`: the request's trace context, handed to the engine (`apps.observability.tracing`)."""
    usage = Usage(output_token_ids=[] if track_ids or resume is not None else None)
    _current_usage.set(usage)
    _current_resume.set(resume)
    _current_prompt_cap.set(max_prompt_tokens)
    _current_trace.set(trace_headers)
    return usage


class MeteredEngine:
    """Wraps vLLM's `AsyncLLM` for its OpenAI serving layer; everything but `generate` passes through."""

    def __init__(self, engine: Any, model_id: str) -> None:
        self._engine = engine
        self._model_id = model_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any):
        from vllm.sampling_params import RequestOutputKind

        prompt_tokens = self._within_cap(prompt)
        usage = _current_usage.get()
        resumed = _current_resume.get()
        if resumed is not None and usage is not None:
            prompt, sampling_params = _continued(prompt, sampling_params, resumed)
            usage.completion_tokens += len(resumed)
            usage.resumed_tokens += len(resumed)
            usage.output_token_ids.extend(resumed)
        outputs = self._engine.generate(prompt, sampling_params, request_id, *args, **_traced(kwargs))
        if usage is None:
            return outputs
        usage.prompt_tokens += prompt_tokens
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        if not delta:
            usage.unfinished_final_only += 1
        return _counted(outputs, usage, delta)

    def encode(self, prompt: Any, pooling_params: Any, request_id: str, *args: Any, **kwargs: Any):
        """A pooling request (embeddings, scores): its prompt is all it costs, counted as it is
        submitted."""
        prompt_tokens = self._within_cap(prompt)
        usage = _current_usage.get()
        if usage is not None:
            usage.prompt_tokens += prompt_tokens
        return self._engine.encode(prompt, pooling_params, request_id, *args, **_traced(kwargs))

    def _within_cap(self, prompt: Any) -> int:
        """The prompt's tokens; raised before anything is submitted when over the model's cap
        (vLLM's layer answers it with a 400)."""
        from vllm.exceptions import VLLMValidationError

        prompt_tokens = _prompt_length(prompt)
        cap = _current_prompt_cap.get()
        if cap is not None and prompt_tokens > cap:
            raise VLLMValidationError(
                f"The prompt is {prompt_tokens} tokens long; model {self._model_id} accepts at "
                f"most {cap}. Shorten the prompt.",
                parameter="messages",
                value=prompt_tokens,
            )
        return prompt_tokens


def _traced(kwargs: dict[str, Any]) -> dict[str, Any]:
    """An engine call's keyword arguments with the request's trace context (vLLM's serving layer
    passes none: it takes them from HTTP headers, and there are none here)."""
    trace_headers = _current_trace.get()
    if trace_headers is None or kwargs.get("trace_headers") is not None:
        return kwargs
    return kwargs | {"trace_headers": trace_headers}


async def _counted(outputs: AsyncIterator[Any], usage: Usage, delta: bool) -> AsyncIterator[Any]:
    """Pass `outputs` through, adding each choice's new tokens to `usage` as they come."""
    seen: dict[int, int] = {}
    async for output in outputs:
        # A non-streaming request's only output is its last: no first token to time.
        if delta and usage.first_token_at is None and any(choice.token_ids for choice in output.outputs):
            usage.first_token_at = time.monotonic()
            usage.cached_tokens += output.num_cached_tokens or 0
        if output.finished and output.outputs:
            usage.finish_reason = output.outputs[0].finish_reason
        for choice in output.outputs:
            before = seen.get(choice.index, 0)
            now = before + len(choice.token_ids) if delta else len(choice.token_ids)
            seen[choice.index] = now
            usage.completion_tokens += now - before
            if usage.output_token_ids is not None and choice.index == 0:
                usage.output_token_ids.extend(choice.token_ids[len(choice.token_ids) - (now - before) :])
        if output.finished and not delta:
            usage.unfinished_final_only -= 1
        yield output


def _continued(prompt: Any, sampling_params: Any, resumed: tuple[int, ...]) -> tuple[Any, Any]:
    """The engine input and sampling parameters that continue a request after `resumed`: the
    ids appended to the prompt's, `max_tokens` and `min_tokens` lowered by as many."""
    continued = dict(prompt) | {"prompt_token_ids": list(prompt["prompt_token_ids"]) + list(resumed)}
    continued.pop("prompt", None)  # the rendered text no longer matches the ids
    params = sampling_params.clone()
    params.max_tokens = sampling_params.max_tokens - len(resumed)
    params.min_tokens = max(0, sampling_params.min_tokens - len(resumed))
    return continued, params


def _prompt_length(prompt: Any) -> int:
    """Tokens of an engine input (the rendered prompt); 0 for inputs given as embeddings."""
    if isinstance(prompt, dict):
        token_ids = prompt.get("prompt_token_ids")
        if token_ids is not None:
            return len(token_ids)
    return 0
