"""The OpenAI-compatible HTTP ingress: shape each request, route it by model, relay the answer.

    POST /v1/chat/completions, POST /v1/completions   streaming (SSE) or not
    GET  /v1/models                                   the served model ids
    GET  /health                                      200 only when every model has a live replica

The status is known before the first byte (the model server's `ResponseHead`); after it, body
bytes are relayed as they come, never parsed. Every error is OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException as StarletteHTTPException

from apps.config import AppConfig
from apps.errors import (
    JSON_MEDIA_TYPE,
    EngineUnavailable,
    GatewayError,
    InternalError,
    InvalidRequest,
    RouteNotFound,
    error_body,
    model_call_error,
)
from apps.streaming import SSE_MEDIA_TYPE, ResponseHead, relay
from apps.validation import Endpoint, parse_body, shape_request

logger = logging.getLogger("ray.serve")
# Proxies must not buffer or transform an event stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

app = FastAPI(title="LLM gateway", description="OpenAI-compatible API over vLLM engines.")


@app.exception_handler(GatewayError)
async def _gateway_error(_: Request, error: GatewayError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return await _gateway_error(_, RouteNotFound(str(exc.detail), status=exc.status_code))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return await _gateway_error(_, InvalidRequest(str(exc.errors()[0].get("msg", exc))))


@app.exception_handler(Exception)
async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("Unexpected error in the ingress")
    return await _gateway_error(_, InternalError("Internal server error."))


@serve.ingress(app)
class Ingress:
    """Routes each request by its `model` field to that model's deployment."""

    def __init__(self, config: AppConfig, models: Mapping[str, DeploymentHandle]) -> None:
        self._limits = {model.id: model.limits for model in config.models}
        self._models = dict(models)
        self._streams = {model_id: handle.options(stream=True) for model_id, handle in models.items()}
        self._health_timeout_s = config.ingress.health_timeout_s
        created = int(time.time())
        self._model_list = json.dumps(
            {
                "object": "list",
                "data": [
                    {"id": model.id, "object": "model", "created": created, "owned_by": "gateway"}
                    for model in config.models
                ],
            }
        ).encode()

    @app.get("/v1/models")
    async def list_models(self) -> Response:
        return Response(self._model_list, media_type=JSON_MEDIA_TYPE)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._forward(request, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward(request, "completion")

    @app.get("/health")
    async def health(self) -> Response:
        ready = await asyncio.gather(*(self._is_ready(handle) for handle in self._models.values()))
        not_ready = [model_id for model_id, ok in zip(self._models, ready) if not ok]
        if not_ready:
            error = EngineUnavailable(f"Models without a ready replica: {not_ready}")
            return JSONResponse(error_body(error), status_code=error.status)
        return JSONResponse({"status": "ok", "models": list(self._models)})

    async def _is_ready(self, handle: DeploymentHandle) -> bool:
        try:
            return await asyncio.wait_for(handle.is_ready.remote(), self._health_timeout_s)
        except Exception:  # timeout, no replica, dead replica: all mean "not ready"
            return False

    async def _forward(self, request: Request, endpoint: Endpoint) -> Response:
        shaped = shape_request(parse_body(await request.body()), endpoint, self._limits)
        stream: DeploymentResponseGenerator = self._streams[shaped.model_id].generate.remote(
            endpoint, shaped.body
        )
        try:
            head: ResponseHead = await anext(stream)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as exc:
            stream.cancel()
            raise model_call_error(shaped.model_id, exc) from exc
        if head.media_type != SSE_MEDIA_TYPE:
            return Response(head.body, status_code=head.status, media_type=head.media_type)
        return StreamingResponse(
            relay(head.body, stream, shaped.model_id),
            status_code=head.status,
            media_type=SSE_MEDIA_TYPE,
            headers=SSE_HEADERS,
        )
