"""Every error the gateway answers with, and the one function that turns an error into a response.

    GatewayError                  status, OpenAI `type`, stable `code`, optional `param`
    +-- ClientError               4xx: the request is wrong; retrying it unchanged will not help
    |   +-- InvalidRequest        400 a parameter is missing, of the wrong type or out of range
    |   +-- Unauthorized          401 no API key, or an unknown one
    |   +-- Forbidden             403 the key may not use this model
    |   +-- ModelNotFound         404 the `model` is not served here
    |   +-- RouteNotFound         404/405 no such endpoint or method
    |   +-- PayloadTooLarge       413 the body is larger than the ingress accepts
    |   +-- EngineRejected        4xx the engine (vLLM's OpenAI layer) refused the request
    |   +-- RateLimited           429 the key is over a limit; `Retry-After` says when it is not
    +-- ServerError               5xx: our fault, overload or a dead engine; may be retried
        +-- EngineUnavailable     503 the model has no live engine, or is overloaded
        +-- Overloaded            503 the model's queue is full or shed this request (`Retry-After`)
        +-- DeadlineExceeded      504 the request ran past its time-to-first-token or total timeout
        +-- InternalError         500 anything else, with a sanitised message

The `code` string is stable: clients can switch on it, and metrics use it as the rejection label.
Errors that tell the client when to come back carry response headers (`Retry-After`).
"""

from __future__ import annotations

import json
import logging
import math
from http import HTTPStatus
from typing import Any, Literal

from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)

JSON_MEDIA_TYPE = "application/json"
# Error objects are OpenAI's, except on Anthropic's Messages endpoint (`apps.endpoints`); the
# Responses API has a stream error event of its own.
ErrorStyle = Literal["openai", "anthropic", "responses"]
# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}
# The final status of a request whose client left before its answer was complete (nginx's).
CLIENT_CLOSED_REQUEST = 499
logger = logging.getLogger("ray.serve")


class GatewayError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    status: int = HTTPStatus.INTERNAL_SERVER_ERROR
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = {}


class ClientError(GatewayError):
    """The request is wrong (4xx)."""

    status = HTTPStatus.BAD_REQUEST
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidRequest(ClientError):
    """A parameter is missing, of the wrong type or out of range (400)."""


class Unauthorized(ClientError):
    """No API key, or an unknown one (401)."""

    status = HTTPStatus.UNAUTHORIZED
    code = "invalid_api_key"


class Forbidden(ClientError):
    """The API key may not use this model (403)."""

    status = HTTPStatus.FORBIDDEN
    code = "model_not_allowed"


class PayloadTooLarge(ClientError):
    """The request body is larger than the ingress accepts (413)."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "request_too_large"


class BodyTimeout(ClientError):
    """The request body did not arrive in time (408); the connection is closed."""

    status = HTTPStatus.REQUEST_TIMEOUT
    code = "request_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers["connection"] = "close"  # what is left of the body is never read


class ClientClosed(ClientError):
    """The client left before its request was read (499: nobody receives this answer)."""

    status = CLIENT_CLOSED_REQUEST
    code = "client_closed"


class ModelNotFound(ClientError):
    """The requested model is not served here (404)."""

    status = HTTPStatus.NOT_FOUND
    code = "model_not_found"


class RouteNotFound(ClientError):
    """No such endpoint (404), or the endpoint does not take this method (405)."""

    code = "not_found"

    def __init__(self, message: str, *, status: int = HTTPStatus.NOT_FOUND) -> None:
        super().__init__(
            message, code="method_not_allowed" if status == HTTPStatus.METHOD_NOT_ALLOWED else None
        )
        self.status = status


class EngineRejected(ClientError):
    """The engine's OpenAI layer refused the request with a 4xx (bad sampling parameter, prompt too long)."""

    def __init__(self, message: str, *, status: int, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status = status


class RateLimited(ClientError):
    """The key is over its requests, tokens or concurrency limit (429). `kind` is OpenAI's error
    type: `requests` or `tokens`."""

    status = HTTPStatus.TOO_MANY_REQUESTS
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.type = kind
        self.headers.update(retry_after_headers(retry_after_s))


class ServerError(GatewayError):
    """Our fault, overload or a dead engine (5xx)."""


class EngineUnavailable(ServerError):
    """The model has no live engine to answer (503)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "engine_unavailable"


class Overloaded(ServerError):
    """The model's ingress queue is full, shed this request for a higher class, or the wait ran
    past its deadline (503). `code` says which; so does the `x-reject-reason` header."""

    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str, *, reason: str, retry_after_s: float) -> None:
        super().__init__(message, code=reason)
        self.headers.update(retry_after_headers(retry_after_s))
        self.headers["x-reject-reason"] = reason


class DeadlineExceeded(ServerError):
    """The request ran past its time-to-first-token or total timeout; the engine request is
    aborted (504)."""

    status = HTTPStatus.GATEWAY_TIMEOUT
    code = "timeout"


class InternalError(ServerError):
    """Anything unexpected; callers send a generic message and log the details (500)."""


def retry_after_headers(seconds: float) -> dict[str, str]:
    """`Retry-After` in whole seconds (HTTP's unit, rounded up) and `retry-after-ms`, which the
    official OpenAI clients read first."""
    seconds = max(seconds, 0.001)
    return {"retry-after": str(math.ceil(seconds)), "retry-after-ms": str(math.ceil(seconds * 1000))}


def error_body(error: GatewayError, style: ErrorStyle = "openai") -> dict[str, Any]:
    """The error object for `error`: OpenAI's, or Anthropic's on its Messages endpoint."""
    if style == "anthropic":
        return {"type": "error", "error": {"type": anthropic_type(error.status), "message": error.message}}
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


def anthropic_type(status: int) -> str:
    """Anthropic's error `type` for an HTTP status (its API's table)."""
    if status in ANTHROPIC_ERROR_TYPES:
        return ANTHROPIC_ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "api_error"


def error_json(error: GatewayError, style: ErrorStyle = "openai") -> bytes:
    return json.dumps(error_body(error, style)).encode()


def error_event(error: GatewayError, style: ErrorStyle = "openai") -> bytes:
    """The error as the last events of a stream whose 200 headers are already sent: vLLM's way
    (an error object, then `[DONE]`), Anthropic's `error` event, or the Responses API's."""
    if style == "anthropic":
        return b"event: error\ndata: " + error_json(error, style) + b"\n\n"
    if style == "responses":
        event = {"type": "error", "code": error.code, "message": error.message, "param": error.param}
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
    return b"data: " + error_json(error) + b"\n\ndata: [DONE]\n\n"


def engine_error(status: int, message: str, param: str | None) -> GatewayError:
    """Translate an error that vLLM's OpenAI layer returned into ours, keeping its status."""
    if 400 <= status < 500:
        return EngineRejected(message, status=status, param=param)
    if status == HTTPStatus.NOT_IMPLEMENTED:
        # vLLM answers 501 for a feature this model or build lacks: the request asked for it.
        return EngineRejected(message, status=HTTPStatus.BAD_REQUEST, param=param)
    # Server-side details stay in the log (the caller logs them), not in the client's answer.
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        return EngineUnavailable("The engine is unavailable; retry later.")
    return InternalError("The engine failed to process the request.")


def model_call_error(model_id: str, exc: Exception) -> GatewayError:
    """Translate a failure of the Ray call to a model deployment (not an answer of the engine)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, BackPressureError):
        return EngineUnavailable(f"Model {model_id} is overloaded; retry later.", code="overloaded")
    if isinstance(exc, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)):
        return EngineUnavailable(f"Model {model_id} has no live replica for this request; retry later.")
    logger.error("Call to model %s failed: %r", model_id, exc)
    return InternalError("Internal server error.")


def never_reached_model(exc: BaseException) -> bool:
    """Whether a failed model call surely never ran on a replica (so used no tokens)."""
    return isinstance(exc, (BackPressureError, DeploymentUnavailableError))
