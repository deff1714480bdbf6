"""Prefix hygiene: keep the starts of prompts byte-identical, so the engines' prefix cache reuses them.

vLLM reuses the KV cache of a prompt's prefix only when it matches token for token, in whole
blocks. A system prompt that begins with "Current time: 10:41:07" or a session UUID makes every
request's prefix unique, and each one pays its full prefill. Two tools:

- Named system prompts: a model's `system_prompts` in the config, which a chat request references
  as `"system_prompt": "NAME"` (with the OpenAI client: `extra_body={"system_prompt": "NAME"}`).
  The ingress puts the configured text first, identical byte for byte in every request, and the
  replicas warm it up before they take traffic.
- Volatile-content detection: the ingress looks for timestamps, dates and UUIDs at the start of
  each prompt (a chat's leading system messages; a completion prompt's first characters, where a
  template's header goes). Each hit is counted (`gateway_volatile_prefixes{model, kind}`), and at
  most once a minute per model a warning names the model, the kind and an example, so operators
  can fix their templates.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from apps.endpoints import ENDPOINTS, Endpoint, first_prompt, message_text
from apps.errors import InvalidRequest

logger = logging.getLogger("ray.serve")
SYSTEM_PROMPT_FIELD = "system_prompt"
SYSTEM_ROLES = ("system", "developer")
# How much of a prompt's start is scanned: the whole of a typical system prompt, and a
# completion template's header. Bounded, so the scan costs microseconds whatever the body size.
SYSTEM_SCAN_CHARS = 4096
COMPLETION_SCAN_CHARS = 256
WARNING_INTERVAL_S = 60.0
_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
# Checked in this order: the first kind that matches names the hit (a timestamp holds a date).
VOLATILE_PATTERNS: dict[str, re.Pattern[str]] = {
    "uuid": re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I),
    "timestamp": re.compile(
        r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}"  # ISO 8601 date and time
        r"|\b\d{1,2}:\d{2}:\d{2}\b"  # a clock time with seconds
        r"|\b1[5-9]\d{8}(?:\d{3})?\b"  # Unix time in seconds or milliseconds (2017-2033)
    ),
    "date": re.compile(
        r"\b\d{4}-\d{2}-\d{2}\b"  # 2026-11-24
        r"|\b\d{1,2}/\d{1,2}/\d{2,4}\b"  # 11/24/2026, 24/11/26
        rf"|\b{_MONTH} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}\b"  # November 24, 2026
        rf"|\b\d{{1,2}}(?:st|nd|rd|th)? {_MONTH},? \d{{4}}\b",  # 24 November 2026
        re.I,
    ),
}


def apply_system_prompt(
    body: dict[str, Any], endpoint: Endpoint, model_id: str, prompts: Mapping[str, str]
) -> dict[str, Any]:
    """`body` with its `system_prompt` reference replaced by the named prompt as the first
    message; `body` itself when it has none. 400 for an unknown name, a completion request, or
    a request that also has its own system message."""
    if SYSTEM_PROMPT_FIELD not in body:
        return body
    name = body[SYSTEM_PROMPT_FIELD]
    if endpoint != "chat":
        raise _invalid("`system_prompt` works with chat completions only.")
    if not isinstance(name, str) or name not in prompts:
        known = sorted(prompts) or "none"
        raise _invalid(
            f"Unknown system prompt {name!r} for model {model_id}. Named prompts: {known}",
            code="unknown_system_prompt",
        )
    messages = body.get("messages")
    if isinstance(messages, list) and messages and _role(messages[0]) in SYSTEM_ROLES:
        raise _invalid(
            "Send either `system_prompt` or a system message first in `messages`, not both."
        )
    rest = messages if isinstance(messages, list) else []
    shaped = {field: value for field, value in body.items() if field != SYSTEM_PROMPT_FIELD}
    shaped["messages"] = [{"role": "system", "content": prompts[name]}, *rest]
    return shaped


def prompt_start(body: Mapping[str, Any], endpoint: Endpoint) -> str:
    """The start of a request's prompt that should be the same across requests: a
    conversation's leading system messages, a completion prompt's first characters."""
    spec = ENDPOINTS[endpoint]
    messages = spec.conversation(body)
    if messages is None:
        return first_prompt(spec, body)[:COMPLETION_SCAN_CHARS]
    parts: list[str] = []
    for message in messages:
        if _role(message) not in SYSTEM_ROLES:
            break
        parts.append(message_text(message.get("content")))
    return "\n".join(parts)[:SYSTEM_SCAN_CHARS]


def volatile_content(text: str) -> tuple[str, str] | None:
    """The kind and text of the first per-request value in `text` (`uuid`, `timestamp` or
    `date`), or None."""
    for kind, pattern in VOLATILE_PATTERNS.items():
        found = pattern.search(text)
        if found:
            return kind, found.group()
    return None


class VolatilePrefixWatch:
    """Counts a model's requests whose prompt starts with volatile content, and warns about them
    at most once per `interval_s`."""

    def __init__(
        self,
        model_id: str,
        count: Callable[[str], None],
        *,
        interval_s: float = WARNING_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._model_id = model_id
        self._count = count  # called with the kind of each hit (a metric)
        self._interval_s = interval_s
        self._clock = clock
        self._last_warning: float | None = None
        self._since_warning = 0

    def check(self, body: Mapping[str, Any], endpoint: Endpoint) -> str | None:
        """The kind of volatile content at the start of `body`'s prompt, counted; None if none."""
        hit = volatile_content(prompt_start(body, endpoint))
        if hit is None:
            return None
        kind, example = hit
        self._count(kind)
        self._since_warning += 1
        now = self._clock()
        if self._last_warning is None or now - self._last_warning >= self._interval_s:
            logger.warning(
                "Model %s: %d request(s) since the last warning started their prompt with "
                "per-request content (latest: %s %r). Prefix caching reuses only byte-identical "
                "prefixes: move such values after the stable part of the prompt.",
                self._model_id,
                self._since_warning,
                kind,
                example,
            )
            self._last_warning, self._since_warning = now, 0
        return kind


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _invalid(message: str, code: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=SYSTEM_PROMPT_FIELD, code=code)
