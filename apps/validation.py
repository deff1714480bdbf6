"""Request shaping at the ingress: parse the body, find the model, apply its token limits.

This checks only what the gateway itself decides (which model, how many tokens). Everything else
(messages, roles, sampling parameters, stop sequences) is validated by vLLM's own protocol models
in the model server, and its 4xx answers are passed on unchanged in status and message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from apps.config import RequestLimits
from apps.errors import InvalidRequest, ModelNotFound

Endpoint = Literal["chat", "completion"]
# Chat accepts OpenAI's newer name too; both mean the same limit.
MAX_TOKENS_FIELDS: dict[Endpoint, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completion": ("max_tokens",),
}


@dataclass(frozen=True)
class ShapedRequest:
    """A request the gateway accepts: its model is served and its max_tokens is within limits."""

    model_id: str
    body: dict[str, Any]
    max_tokens: int


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body, or 400."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequest("The request body is nested too deeply.", code="invalid_json") from None
    except ValueError as exc:  # bad syntax, bad UTF-8, NaN/Infinity, an integer too long
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object. Given: {type(body).__name__}",
            code="invalid_json",
        )
    return body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def shape_request(
    body: dict[str, Any], endpoint: Endpoint, limits: Mapping[str, RequestLimits]
) -> ShapedRequest:
    """Check the fields the gateway decides on and fill in the model's default max_tokens."""
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise InvalidRequest("`model` is required and must be a non-empty string.", param="model")
    model_limits = limits.get(model_id)
    if model_limits is None:
        raise ModelNotFound(
            f"The model `{model_id}` does not exist. Served models: {sorted(limits)}",
            param="model",
        )

    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"`stream` must be a boolean. Given: {stream!r}", param="stream")

    max_tokens = _max_tokens(body, endpoint, model_id, model_limits)
    shaped = dict(body)
    for field in MAX_TOKENS_FIELDS[endpoint]:
        shaped.pop(field, None)
    shaped["max_tokens"] = max_tokens
    return ShapedRequest(model_id, shaped, max_tokens)


def _max_tokens(
    body: Mapping[str, Any], endpoint: Endpoint, model_id: str, limits: RequestLimits
) -> int:
    given = {f: body[f] for f in MAX_TOKENS_FIELDS[endpoint] if body.get(f) is not None}
    if len(set(map(repr, given.values()))) > 1:
        raise InvalidRequest(
            f"`max_completion_tokens` and `max_tokens` disagree ({given}): send one of them.",
            param="max_completion_tokens",
        )
    if not given:
        return limits.default_max_tokens
    field, value = next(iter(given.items()))
    # bool is an int in Python, but `true` is not a token count.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(
            f"`{field}` must be a positive integer. Given: {value!r}", param=field
        )
    if value > limits.max_tokens_cap:
        raise InvalidRequest(
            f"`{field}` must be <= {limits.max_tokens_cap} for model {model_id}. Given: {value}",
            param=field,
            code="max_tokens_too_large",
        )
    return value
