"""Each request's real token counts, read at the engine, and the exact prompt-length cap.

vLLM's OpenAI layer reports usage only in its answer, which a client who disconnects never gets
and a stream carries only when asked. The rate limiter needs the truth in every case, so the
model server hands vLLM's serving layer a `MeteredEngine`: the same engine, whose `generate` also
counts the prompt and every generated token into the `Usage` of the request being served (a
context variable: each request runs in its own task). A streamed request's count grows as its
tokens come out, so it is exact however the request ends. A non-streaming request's tokens come
out only at its end (vLLM's FINAL_ONLY output): cut short, its count is unknown, and it is
settled as using all it reserved.

The prompt cap is checked there as well: on the real token count, after the chat template, before
the engine sees the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
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

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def settled_tokens(self) -> int | None:
        """What to settle the request's reservation with: its tokens, or None (all it reserved)
        when some of them are unknown."""
        return None if self.unfinished_final_only else self.total_tokens


_current_usage: ContextVar[Usage | None] = ContextVar("current_usage", default=None)


def start_usage() -> Usage:
    """A fresh `Usage` that engine calls made from this task (and tasks it starts) count into."""
    usage = Usage()
    _current_usage.set(usage)
    return usage


class MeteredEngine:
    """Wraps vLLM's `AsyncLLM` for its OpenAI serving layer; everything but `generate` passes through."""

    def __init__(self, engine: Any, model_id: str, max_prompt_tokens: int | None) -> None:
        self._engine = engine
        self._model_id = model_id
        self._max_prompt_tokens = max_prompt_tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any):
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        prompt_tokens = _prompt_length(prompt)
        cap = self._max_prompt_tokens
        if cap is not None and prompt_tokens > cap:
            # Raised before anything is submitted; vLLM's layer answers it with a 400.
            raise VLLMValidationError(
                f"The prompt is {prompt_tokens} tokens long; model {self._model_id} accepts at "
                f"most {cap}. Shorten the prompt.",
                parameter="messages",
                value=prompt_tokens,
            )
        outputs = self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs)
        usage = _current_usage.get()
        if usage is None:
            return outputs
        usage.prompt_tokens += prompt_tokens
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        if not delta:
            usage.unfinished_final_only += 1
        return _counted(outputs, usage, delta)


async def _counted(outputs: AsyncIterator[Any], usage: Usage, delta: bool) -> AsyncIterator[Any]:
    """Pass `outputs` through, adding each choice's new tokens to `usage` as they come."""
    seen: dict[int, int] = {}
    async for output in outputs:
        for choice in output.outputs:
            before = seen.get(choice.index, 0)
            now = before + len(choice.token_ids) if delta else len(choice.token_ids)
            seen[choice.index] = now
            usage.completion_tokens += now - before
        if output.finished and not delta:
            usage.unfinished_final_only -= 1
        yield output


def _prompt_length(prompt: Any) -> int:
    """Tokens of an engine input (the rendered prompt); 0 for inputs given as embeddings."""
    if isinstance(prompt, dict):
        token_ids = prompt.get("prompt_token_ids")
        if token_ids is not None:
            return len(token_ids)
    return 0
