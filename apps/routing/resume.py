"""Resuming a stream on another replica when its replica dies: which streams can, and the
stitching that makes the client see one uninterrupted stream.

vLLM has no migration API, but it continues a text exactly from token ids: the prompt's ids plus
the ids generated so far, with the remaining `max_tokens`. So, for a resumable stream:

- the model server sends, with each message, the ids of the tokens in it (`TokenChunk`), and in
  the head the stream's `id` and `created` (`StreamIdentity`);
- when the replica is lost mid-stream, the ingress calls another replica with the same body and a
  `Resume` (the ids the client received, the identity);
- that replica renders the same prompt (same template, same ids), appends the received ids
  (`apps.engine.usage.MeteredEngine`), generates the rest, and `ResumedEvents` rewrites its events: no
  second role event, the original `id` and `created`, usage counted from the original prompt.

What cannot continue exactly is refused up front (`resume_refusal`) and ends, as before, with an
error event: several choices, a fixed `seed` (sampling is re-seeded), frequency or presence
penalties (they count output tokens only, and the resumed output starts empty), structured outputs
(the grammar's state restarts), `stop` strings (the engine holds back text that may start one, so
the cut may fall inside held-back text), echo and prompt log-probabilities (they depend on the
prompt, which grows).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from apps.endpoints import ENDPOINTS, Endpoint

# Resumes of one stream before the ingress gives up and ends it with an error event.
MAX_RESUMES = 2
DONE_EVENT = "data: [DONE]\n\n"
_STRUCTURED_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
_PENALTIES = ("frequency_penalty", "presence_penalty")


@dataclass(frozen=True)
class StreamIdentity:
    """What a client sees identify its stream in every chunk: `id` and `created`."""

    id: str
    created: int


@dataclass(frozen=True)
class Resume:
    """How a resumed call continues: the ids of the tokens the client received, and the
    original stream's identity."""

    token_ids: tuple[int, ...]
    identity: StreamIdentity


def resume_refusal(endpoint: Endpoint, body: Mapping[str, Any]) -> str | None:
    """Why this request's stream cannot be resumed exactly on another replica; None if it can."""
    if body.get("stream") is not True:
        return "not a stream"
    if not ENDPOINTS[endpoint].resumable:
        return f"a {endpoint} stream"
    if (body.get("n") or 1) != 1 or body.get("best_of") not in (None, 1):
        return "several choices"
    if len(ENDPOINTS[endpoint].prompts(body)) > 1:
        return "several prompts"
    if body.get("seed") is not None:
        return "a fixed seed"
    if any(body.get(name) for name in _PENALTIES):
        return "frequency or presence penalties"
    response_format = body.get("response_format")
    if any(body.get(name) is not None for name in _STRUCTURED_FIELDS) or (
        isinstance(response_format, dict) and response_format.get("type") not in (None, "text")
    ):
        return "structured outputs"
    if body.get("stop"):
        return "stop strings"
    if body.get("echo") or body.get("prompt_logprobs"):
        return "echo or prompt log-probabilities"
    return None


def stream_identity(first_message: bytes) -> StreamIdentity | None:
    """The `id` and `created` of a stream, from its first message (None: no chunk in it)."""
    for event in first_message.split(b"\n\n"):
        if event.startswith(b"data: {"):
            chunk = json.loads(event[len(b"data: ") :])
            if "id" in chunk and "created" in chunk:
                return StreamIdentity(str(chunk["id"]), int(chunk["created"]))
    return None


class ResumedEvents:
    """Rewrites the SSE events of a resumed call so that they continue the original stream.

    `prompt_tokens`: the original prompt's length; `resumed_tokens`: how many tokens the client
    had received. A resumed stream is rare and short-lived, so each of its events is parsed."""

    def __init__(self, identity: StreamIdentity, prompt_tokens: int, resumed_tokens: int) -> None:
        self._identity = identity
        self._prompt_tokens = prompt_tokens
        self._resumed_tokens = resumed_tokens

    def rewrite(self, event: str) -> str | None:
        """The event as the original stream would have sent it; None to drop it."""
        if not event.startswith("data: {"):
            return event
        chunk = json.loads(event[len("data: ") :])
        if "error" in chunk:
            return event
        if _is_role_only(chunk):
            return None  # the client had its role event from the original replica
        chunk["id"] = self._identity.id
        chunk["created"] = self._identity.created
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            completion = int(usage.get("completion_tokens") or 0) + self._resumed_tokens
            usage["prompt_tokens"] = self._prompt_tokens
            usage["completion_tokens"] = completion
            usage["total_tokens"] = self._prompt_tokens + completion
        return f"data: {json.dumps(chunk, separators=(',', ':'), ensure_ascii=False)}\n\n"

    async def events(self, source: AsyncIterator[str]) -> AsyncIterator[str]:
        async for event in source:
            rewritten = self.rewrite(event)
            if rewritten is not None:
                yield rewritten


def _is_role_only(chunk: Mapping[str, Any]) -> bool:
    choices = chunk.get("choices")
    if not choices:
        return False
    for choice in choices:
        delta = choice.get("delta")
        if not isinstance(delta, dict) or "role" not in delta:
            return False
        if delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"):
            return False
    return True
