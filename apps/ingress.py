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
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.schema import ReplicaState
from starlette.exceptions import HTTPException as StarletteHTTPException

from apps.config import AppConfig
from apps.errors import (
    JSON_MEDIA_TYPE,
    EngineUnavailable,
    GatewayError,
    InternalError,
    RouteNotFound,
    error_body,
    model_call_error,
)
from apps.streaming import SSE_MEDIA_TYPE, RelayResponse, ResponseHead
from apps.validation import Endpoint, parse_body, shape_request

logger = logging.getLogger("ray.serve")

app = FastAPI(title="LLM gateway", description="OpenAI-compatible API over vLLM engines.")


@app.exception_handler(GatewayError)
async def _gateway_error(_: Request, error: GatewayError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Routing answers: 404 for an unknown path, 405 (with its Allow header) for a wrong method.
    error = RouteNotFound(str(exc.detail), status=exc.status_code)
    return JSONResponse(error_body(error), status_code=error.status, headers=exc.headers)


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
        """Serve's own view (controller state), so probes neither queue behind generation nor
        wake a model scaled to zero."""
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), self._health_timeout_s)
        except Exception as exc:
            logger.warning("Health check could not read Serve's status: %r", exc)
            error = EngineUnavailable("Serve's status is unavailable.")
            return JSONResponse(error_body(error), status_code=error.status)
        not_ready = []
        for model_id, handle in self._models.items():
            application = status.applications.get(handle.app_name)
            deployment = application.deployments.get(handle.deployment_name) if application else None
            if deployment is None or not deployment.replica_states.get(ReplicaState.RUNNING, 0):
                not_ready.append(model_id)
        if not_ready:
            error = EngineUnavailable(f"Models without a ready replica: {not_ready}")
            return JSONResponse(error_body(error), status_code=error.status)
        return JSONResponse({"status": "ok", "models": list(self._models)})

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
        return RelayResponse(head.body, stream, shaped.model_id)
