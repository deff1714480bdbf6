"""Request shaping at the ingress: read and parse the body, apply the model's limits, estimate
the request's token cost. Every check the gateway itself decides on is here:

    body size (413), JSON (400), `model` (400), `stream`, the output cap's default and cap (400,
    or clamped), `n` cap, number of stop sequences, and each endpoint's own rule (chat roles,
    `best_of`, stored responses: `apps.endpoints`)

Everything else (messages, sampling parameters) is validated by vLLM's own protocol models
in the model server, and its 4xx answers are passed on unchanged in status and message; the exact
prompt-length cap is checked there too, on the real token count (`apps.engine.model_server`).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

from apps.config import RequestLimits
from apps.endpoints import ENDPOINTS, Endpoint, EndpointSpec, message_text
from apps.errors import BodyTimeout, ClientClosed, InvalidRequest, PayloadTooLarge

# A cheap prompt-token estimate for the rate-limit reservation; the engine's real count settles it.
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4  # role markers and separators of a chat template


@dataclass(frozen=True)
class ShapedRequest:
    """A request within its model's limits, and what it may cost in tokens at most."""

    model_id: str
    body: dict[str, Any]
    max_tokens: int
    clamped: bool  # max_tokens was lowered to the cap (`over_cap: clamp`)
    reserved_tokens: int  # prompt estimate + choices x max_tokens


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, or 413 as soon as it passes `max_bytes` (never buffered whole first),
    or 408 when it has not all arrived within `timeout_s` (a slow or stalled sender holds an
    ingress slot meanwhile), or 499 when the client leaves first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise _too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(
            f"The request body did not arrive within {timeout_s:g}s ({size} bytes received)."
        ) from None
    except ClientDisconnect:
        raise ClientClosed("The client closed the connection while sending its request.") from None
    return b"".join(chunks)


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than {max_bytes} bytes.")


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


def requested_model(body: Mapping[str, Any]) -> str:
    """The `model` field, or 400. Whether it is served (and to whom) is the caller's check."""
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise InvalidRequest("`model` is required and must be a non-empty string.", param="model")
    return model_id


def shape_request(
    body: dict[str, Any], endpoint: Endpoint, model_id: str, limits: RequestLimits
) -> ShapedRequest:
    """Check the fields the gateway decides on (with the endpoint's own rule, `apps.endpoints`)
    and fill in the model's default output cap."""
    spec = ENDPOINTS[endpoint]
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest(f"`stream` must be a boolean. Given: {stream!r}", param="stream")
    body = spec.rule(body)
    if body.get("use_beam_search"):
        # vLLM's beam search runs one engine request per step: neither the token accounting nor
        # the prompt cap can follow it.
        raise InvalidRequest(
            "Beam search is not supported here.", param="use_beam_search", code="unsupported_parameter"
        )
    if "priority" in body:
        # vLLM's scheduling priority is the gateway's to set (`apps.admission.gate`), from the key.
        raise InvalidRequest(
            "`priority` is set by the gateway from the API key's priority class and its share "
            "of the model; a key of a higher class gets higher priority.",
            param="priority",
            code="unsupported_parameter",
        )
    if spec.stop_field is not None:
        _check_stop(body.get(spec.stop_field), limits.max_stop_sequences, spec.stop_field)
    if spec.output_field is None:  # generates nothing: no output cap
        if spec.pooling:
            _check_inputs(spec.prompts(body), limits.max_inputs)
        # A pooling request costs its inputs' tokens; tokenize costs no engine work.
        reserved = prompt_estimate(body, endpoint) if spec.pooling else 0
        return ShapedRequest(model_id, body, 0, False, reserved)
    choices = _choices(body, limits.max_n) if spec.choices else 1
    max_tokens, clamped = _max_tokens(body, spec, model_id, limits)
    shaped = {name: value for name, value in body.items() if name not in spec.max_tokens_fields}
    shaped[spec.output_field] = max_tokens
    prompts = 1 if spec.conversation(body) is not None else len(spec.prompts(body))
    reserved = prompt_estimate(body, endpoint) + prompts * choices * max_tokens
    return ShapedRequest(model_id, shaped, max_tokens, clamped, reserved)


def _check_inputs(inputs: list[Any], cap: int) -> None:
    if len(inputs) > cap:
        raise InvalidRequest(
            f"At most {cap} inputs per request. Given: {len(inputs)}", code="too_many_inputs"
        )


def prompt_estimate(body: Mapping[str, Any], endpoint: Endpoint) -> int:
    """Prompt tokens, estimated from characters (token ids count as they are). Only for the
    rate-limit reservation: a wrong estimate is corrected when the request is settled."""
    spec = ENDPOINTS[endpoint]
    messages = spec.conversation(body)
    if messages is not None:
        chars = sum(len(message_text(m.get("content"))) for m in messages if isinstance(m, dict))
        return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages)
    total = 0
    for item in spec.prompts(body):
        if isinstance(item, str):
            total += math.ceil(len(item) / CHARS_PER_TOKEN)
        elif isinstance(item, list):  # token ids
            total += len(item)
    return total


def _choices(body: Mapping[str, Any], cap: int) -> int:
    """`n`: absent is 1, else a positive integer up to the cap."""
    value = body.get("n")
    if value is None:
        return 1
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"`n` must be a positive integer. Given: {value!r}", param="n")
    if value > cap:
        raise InvalidRequest(f"`n` must be <= {cap}. Given: {value}", param="n", code="n_too_large")
    return value


def _check_stop(stop: Any, cap: int, name: str) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest(
            f"`{name}` must be a string or a list of strings.", param=name, code="invalid_stop"
        )
    if len(stop) > cap:
        raise InvalidRequest(
            f"`{name}` may hold at most {cap} sequences. Given: {len(stop)}",
            param=name,
            code="too_many_stop_sequences",
        )


def _max_tokens(
    body: Mapping[str, Any], spec: EndpointSpec, model_id: str, limits: RequestLimits
) -> tuple[int, bool]:
    """The request's output cap and whether it was clamped to the model's cap."""
    given = {f: body[f] for f in spec.max_tokens_fields if body.get(f) is not None}
    if len(set(map(repr, given.values()))) > 1:
        first, second = given
        raise InvalidRequest(
            f"`{first}` and `{second}` disagree ({given}): send one of them.", param=first
        )
    if not given:
        return limits.default_max_tokens, False
    field, value = next(iter(given.items()))
    # bool is an int in Python, but `true` is not a token count.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(
            f"`{field}` must be a positive integer. Given: {value!r}", param=field
        )
    if value > limits.max_tokens_cap:
        if limits.over_cap == "clamp":
            return limits.max_tokens_cap, True
        raise InvalidRequest(
            f"`{field}` must be <= {limits.max_tokens_cap} for model {model_id}. Given: {value}",
            param=field,
            code="max_tokens_too_large",
        )
    return value, False
