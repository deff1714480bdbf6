"""The model server: one Ray Serve replica holding one vLLM `AsyncLLM` engine.

Chat and text completions go through vLLM's own OpenAI serving layer (chat templates, sampling
parameters, stop sequences, usage); this class only adapts it to the wire of `apps.edge.streaming`:
a `ResponseHead`, then raw SSE bytes. Serve calls `check_health` periodically; it fails once the
engine is dead, and Serve then replaces the replica.

A request the rate limiter reserved tokens for is settled here, with the engine's real count
(`apps.engine.usage`), however it ends: a finished request before its last bytes leave (so the refund is
visible by the time the client could send its next request), a failed or cancelled one at once.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import logging
import logging.handlers
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.responses import Response as StarletteResponse
from starlette.responses import StreamingResponse

from apps.admission.capacity import EngineCapacity, publish_capacity
from apps.admission.rate_limits import Settler
from apps.applications import GATEWAY_APP, LIMITER_DEPLOYMENT
from apps.config import LoraAdapter, ModelConfig
from apps.edge.streaming import (
    SSE_MEDIA_TYPE,
    Accepted,
    LastChunk,
    ResponseHead,
    TokenChunk,
    coalesce,
    error_head,
    events_per_message,
    first_event_error,
    translate_error_events,
)
from apps.endpoints import ENDPOINTS, Endpoint, EndpointSpec
from apps.engine.engine_args import engine_args
from apps.engine.placement import omp_threads_bind, placement_for
from apps.engine.usage import MeteredEngine, Usage, start_usage
from apps.engine.warmup import warm_up
from apps.errors import (
    JSON_MEDIA_TYPE,
    EngineUnavailable,
    ErrorStyle,
    GatewayError,
    InternalError,
    InvalidRequest,
    engine_error,
    error_event,
)
from apps.observability import tracing
from apps.observability.metrics import UNAUTHENTICATED, model_server_metrics
from apps.routing.failover import is_replica_lost
from apps.routing.kv_index import BLOCK_SIZE_STAT, KV_EVENTS_STAT, TOKENIZER_STAT, KVCacheMirror
from apps.routing.resume import Resume, ResumedEvents, resume_refusal, stream_identity
from apps.routing.router import RoutingKnobs

logger = logging.getLogger("ray.serve")
# OpenAI request fields vLLM does not know but that change nothing in the answer (bookkeeping for
# OpenAI's own platform): accepted and dropped. Any other unknown field is a 400, as at OpenAI,
# instead of vLLM's silent ignoring (a misspelt `temperatur` must not pass unnoticed).
IGNORED_OPENAI_FIELDS = frozenset(
    {"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"}
)
# Fields the ingress sets (a client's own are refused there): the engine scheduling priority
# (`apps.admission.gate`), dropped where vLLM's protocol has none (Messages, tokenize).
GATEWAY_FIELDS = frozenset({"priority"})
# The last event of every vLLM stream.
DONE_EVENT = b"data: [DONE]\n\n"
# The answer waits at most this long for its settle to reach the limiter.
SETTLE_WAIT_S = 2.0


class ModelServer:
    """Serves one model; Serve runs N replicas of it, each with its own engine and placement group."""

    async def __init__(self, model: ModelConfig) -> None:
        # vLLM configures logging as it is imported and starts; Serve's log file is put back after.
        started = time.monotonic()
        restore_serve_logging = _serve_logging_saved()
        # vLLM is imported here, in the replica, so building the app stays light.
        from ray.util.placement_group import get_current_placement_group
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import FrontendArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.executor.abstract import Executor
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self._model = model
        self._metrics = model_server_metrics()
        self._settler = Settler(_limiter())
        placement = placement_for(model.parallelism)
        if model.parallelism.accelerator == "cpu":
            # Read by vLLM when it starts the workers, so set before the engine exists.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind(
                model.parallelism.world_size,
                sorted(os.sched_getaffinity(0)),
                model.parallelism.cpu_threads_bind,
            )
        if tracing.traces_endpoint() is not None:
            # vLLM's own span exporter reads only this variable, and defaults to grpc.
            os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", tracing.protocol())
        replica_id = serve.get_replica_context().replica_id.unique_id
        # For the precise-prefix router (`apps.routing.kv_index`), in this replica's routing stats.
        self._routing_stats: dict[str, Any] = {}
        kv_events = None
        if model.engine.kv_cache_events:
            mirror = KVCacheMirror(replica_id)  # follows the engine's events from its start
            kv_events = mirror.engine_config()
            self._routing_stats = {
                KV_EVENTS_STAT: mirror.endpoint,
                TOKENIZER_STAT: os.path.abspath(model.path),
            }
        args = engine_args(model, placement, kv_events)
        vllm_config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        if placement.executor_backend == "ray":
            # The ray executor starts its GPU workers in this replica's placement group.
            vllm_config.parallel_config.placement_group = get_current_placement_group()
        self._engine = AsyncLLM(
            vllm_config=vllm_config,
            executor_class=Executor.get_class(vllm_config),
            log_requests=args.enable_log_requests,
            log_stats=not args.disable_log_stats,
            usage_context=UsageContext.OPENAI_API_SERVER,
            # The engine's own metrics (scheduler queue, KV cache, prefix cache, speculative
            # decoding) exported through Ray's metrics agent, like the gateway's (apps.observability.metrics).
            stat_loggers=[RayPrometheusStatLogger],
        )
        state = State()
        # Usage reports prefix-cache hits (`prompt_tokens_details.cached_tokens`), as OpenAI's does.
        frontend = argparse.Namespace(
            **(vars(FrontendArgs()) | vars(args) | {"enable_prompt_tokens_details": True})
        )
        await init_app_state(
            MeteredEngine(self._engine, model.id),
            state,
            frontend,
            supported_tasks=await self._engine.get_supported_tasks(),
        )
        # vLLM's serving object of each endpoint; None where this model's task has none.
        self._serving = {name: getattr(state, spec.serving, None) for name, spec in ENDPOINTS.items()}
        self._tasks = await self._engine.get_supported_tasks()
        self._serving_models = state.openai_serving_models
        self._adapter_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        restore_serve_logging()
        await self._publish_capacity(model)
        await warm_up(model, self._call_vllm, await self._preload_adapters(model))
        self._first_request_logged = False
        self._open_streams = 0
        if self._routing_stats:
            self._routing_stats[BLOCK_SIZE_STAT] = self._engine.vllm_config.cache_config.block_size
        self._accepted = Accepted(time.monotonic() - started, replica_id)
        logger.info("Model %s ready after %.0f s: %s", model.id, self._accepted.startup_s, placement)

    async def generate(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        reservation: str | None = None,
        key: str = UNAUTHENTICATED,
        resume: Resume | None = None,
        avoid_replicas: frozenset[str] = frozenset(),
        routing: RoutingKnobs | None = None,
        max_prompt_tokens: int | None = None,
        adapter: LoraAdapter | None = None,
        trace: Mapping[str, str] | None = None,
    ) -> AsyncIterator[Accepted | ResponseHead | bytes | TokenChunk | LastChunk]:
        """Run one OpenAI request; yields `Accepted`, a `ResponseHead`, then (streams only) SSE
        bytes, the last of them as a `LastChunk`; a resumable stream's messages are `TokenChunk`s
        (`apps.routing.resume`). `reservation`: the rate limiter's, settled here with the tokens really
        used (except when this engine is dead: the ingress then calls another replica with the
        same reservation). `key`: the caller's key name, for the token metrics. `resume`: continue
        a stream another replica started. `avoid_replicas`, `routing`: read by the request
        router (`apps.routing.router`), not here. `max_prompt_tokens`: the model's prompt cap (live).
        `adapter`: the LoRA adapter the body's `model` names (live), loaded here if it is not.
        `trace`: the call's trace context (`apps.observability.tracing`), continued here and by the engine."""
        yield self._accepted
        model_id = adapter.name if adapter else self._model.id
        span = tracing.child(trace, "model_server", self._span_attributes(endpoint, model_id, resume))
        resumable = resume is not None or resume_refusal(endpoint, body) is None
        usage = start_usage(
            track_ids=resumable,
            resume=resume.token_ids if resume else None,
            max_prompt_tokens=max_prompt_tokens,
            trace_headers=tracing.carrier(span),
        )
        settle = _Settlement(self._settler, reservation, usage)
        started = time.monotonic()
        try:
            async for item in self._respond(endpoint, body, settle, usage, resume, adapter):
                if isinstance(item, (ResponseHead, LastChunk)) and item.status != 200:
                    tracing.fail(span, item.code)
                if not self._first_request_logged:
                    # With warm-up this shows what a replica's first client really waited.
                    self._first_request_logged = True
                    logger.info(
                        "Model %s: first client request's first bytes after %.0f ms.",
                        self._model.id,
                        (time.monotonic() - started) * 1000,
                    )
                yield item
        finally:
            settle.now()  # failed or cancelled: no waiting on the limiter
            self._count_tokens(usage, key, model_id)
            _end_engine_span(span, usage, started)

    def _span_attributes(self, endpoint: Endpoint, model_id: str, resume: Resume | None) -> dict[str, Any]:
        return {
            tracing.MODEL: model_id,
            "gateway.endpoint": endpoint,
            "gateway.replica": self._accepted.replica_id,
            "gateway.resumed_tokens": len(resume.token_ids) if resume else 0,
        }

    def _count_tokens(self, usage: Usage, key: str, model_id: str) -> None:
        """The tokens this engine processed: a resumed stream's earlier tokens were prompt here."""
        tags = {"model": model_id, "key": key}
        prompt = usage.prompt_tokens + usage.resumed_tokens
        generated = usage.completion_tokens - usage.resumed_tokens
        if prompt:
            self._metrics.prompt_tokens.inc(prompt, tags=tags)
        if generated:
            self._metrics.generation_tokens.inc(generated, tags=tags)

    async def _respond(
        self,
        endpoint: Endpoint,
        body: dict[str, Any],
        settle: _Settlement,
        usage: Usage,
        resume: Resume | None,
        adapter: LoraAdapter | None,
    ) -> AsyncIterator[ResponseHead | bytes | TokenChunk | LastChunk]:
        spec = ENDPOINTS[endpoint]
        try:
            result = await self._start(endpoint, body, adapter)
        except GatewayError as error:
            if is_replica_lost(error):
                settle.abandon()  # the ingress tries another replica with this reservation
            else:
                await settle.wait()
            yield error_head(error, usage, spec.errors)
            return
        if isinstance(result, BaseModel):
            await settle.wait()
            answer = result.model_dump_json(**spec.json_options).encode()
            yield ResponseHead(200, JSON_MEDIA_TYPE, answer, usage)
            return
        if isinstance(result, StarletteResponse):  # vLLM's pooling answers come as responses
            answer = await _response_body(result)
            await settle.wait()
            yield ResponseHead(result.status_code, result.media_type or JSON_MEDIA_TYPE, answer, usage)
            return
        result = _server_sent_events(result)
        if resume is not None:
            # The engine call was made in _start: the usage holds the original prompt's length.
            rewriter = ResumedEvents(resume.identity, usage.prompt_tokens, len(resume.token_ids))
            result = rewriter.events(result)
        self._open_streams += 1
        stream = self._stream(result, settle, usage, resume, spec.errors)
        try:
            async for item in stream:
                yield item
        finally:
            self._open_streams -= 1
            await stream.aclose()  # however this call ends, the engine request ends with it

    async def _stream(
        self,
        events: AsyncIterator[str],
        settle: _Settlement,
        usage: Usage,
        resume: Resume | None,
        errors: ErrorStyle,
    ) -> AsyncIterator[ResponseHead | bytes | TokenChunk | LastChunk]:
        """A stream's head and messages, the last a `LastChunk` (with `[DONE]`, or, for the
        streams that have none, empty). With `usage.output_token_ids` kept (a resumable
        stream), each message carries the ids of its tokens."""
        ids = usage.output_token_ids
        chunks = coalesce(
            events, self._events_per_message, (lambda: len(ids)) if ids is not None else (lambda: 0)
        )
        try:
            try:
                first, sent = await anext(chunks)
            except Exception as exc:
                failure = self._engine_failure(exc)
                if is_replica_lost(failure):
                    settle.abandon()
                yield error_head(failure, usage, errors)
                return
            # vLLM reports failures inside the stream; before the first byte they get a status.
            error = first_event_error(first)
            if error is not None:
                await settle.wait()
                yield error_head(error, usage, errors)
                return
            if first.endswith(DONE_EVENT):  # the whole stream in one message
                await settle.wait()
                yield ResponseHead(200, SSE_MEDIA_TYPE, translate_error_events(first), usage)
                return
            if ids is None:
                yield ResponseHead(200, SSE_MEDIA_TYPE, translate_error_events(first))
            else:
                identity = resume.identity if resume is not None else stream_identity(first)
                start = len(resume.token_ids) if resume is not None else 0
                yield ResponseHead(
                    200,
                    SSE_MEDIA_TYPE,
                    translate_error_events(first),
                    identity=identity,
                    token_ids=tuple(ids[start:sent]),
                )
            try:
                async for chunk, progress in chunks:
                    if chunk.endswith(DONE_EVENT):
                        await settle.wait()
                        yield LastChunk(translate_error_events(chunk), usage)
                        return
                    elif ids is None:
                        yield translate_error_events(chunk)
                    else:
                        yield TokenChunk(translate_error_events(chunk), tuple(ids[sent:progress]))
                        sent = progress
            except Exception as exc:  # headers are out: end the stream with an error event
                failure = self._engine_failure(exc)
                if ids is not None and is_replica_lost(failure):
                    settle.abandon()  # the ingress resumes the stream elsewhere, or charges it
                yield LastChunk(error_event(failure, errors), usage, failure.status, failure.code)
                return
            # The Responses and Messages streams end without `[DONE]`.
            await settle.wait()
            yield LastChunk(b"", usage)
        finally:
            await chunks.aclose()

    def _events_per_message(self) -> int:
        return events_per_message(self._open_streams, self._model.replicas.stream_messages_per_step)

    async def _start(
        self, endpoint: Endpoint, body: dict[str, Any], adapter: LoraAdapter | None = None
    ) -> BaseModel | AsyncIterator[str]:
        """Validate with vLLM's protocol model and submit (through `adapter`, loaded first);
        the stream or the full response."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._engine.errored:  # before anything else: the ingress tries another replica
            raise self._engine_failure(self._engine.dead_error)
        if adapter is not None:
            await self._load_adapter(adapter)
        serving = self._serving[endpoint]
        if serving is None:
            raise InvalidRequest(
                f"Model {self._model.id} does not serve {ENDPOINTS[endpoint].path}: its tasks are "
                f"{', '.join(self._tasks)}.",
                param="model",
                code="unsupported_endpoint",
            )
        try:
            result = await self._call_vllm(endpoint, body)
        except ValidationError as exc:
            raise _invalid_request(exc) from None
        except EngineDeadError as exc:
            # Serve's health check replaces this replica shortly; the client may retry.
            raise self._engine_failure(exc) from None
        except GatewayError:
            raise
        except Exception as exc:
            # vLLM's own mapping: its validators raise VLLMValidationError (not a pydantic
            # error), unsupported features NotImplementedError, overload GracefulHTTPError.
            result = serving.create_error_response(exc)
        if isinstance(result, ErrorResponse):
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # vLLM turns a cancelled non-streaming request into an error; it is a cancel.
                raise asyncio.CancelledError
            info = result.error
            if info.code >= 500:
                logger.error("Model %s answered %s: %s", self._model.id, info.code, info.message)
            raise engine_error(info.code, info.message, info.param)
        return result

    async def _call_vllm(self, endpoint: Endpoint, body: dict[str, Any]) -> Any:
        """One request through vLLM's serving object of `endpoint` (`apps.endpoints`): its
        answer (a response model, a stream, or vLLM's ErrorResponse). Raises pydantic's
        ValidationError for a body vLLM's protocol model refuses."""
        spec = ENDPOINTS[endpoint]
        request_type = _request_type(spec, body)
        request = request_type.model_validate(_known_fields(body, request_type))
        # vLLM's methods take the HTTP request too, for its headers; there is none here.
        return await getattr(self._serving[endpoint], spec.method)(request, None)

    async def _preload_adapters(self, model: ModelConfig) -> list[LoraAdapter]:
        """Load the adapters configured when the model's application was built; those that
        fail are left to their first request (one may have been removed since, live, with its
        files: it must not keep the base model from starting)."""
        loaded = []
        for adapter in model.lora_adapters:
            try:
                await self._load_adapter(adapter)
            except GatewayError as error:
                logger.warning("Model %s: adapter %s not preloaded: %s", model.id, adapter.name, error.message)
            else:
                loaded.append(adapter)
        return loaded

    async def _load_adapter(self, adapter: LoraAdapter) -> None:
        """Load a LoRA adapter into this replica's engine unless it is there from the same path
        (vLLM then resolves the body's `model` to it). A new path for a known name replaces the
        adapter in place."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        models = self._serving_models
        # The ingress's settings hold the path as configured: relative to the working directory,
        # which Serve's processes share.
        path = str(Path(adapter.path).expanduser().resolve())
        async with self._adapter_locks[adapter.name]:  # its first requests load it once
            loaded = models.lora_requests.get(adapter.name)
            if loaded is not None and loaded.lora_path == path:
                return
            request = LoadLoRAAdapterRequest(
                lora_name=adapter.name, lora_path=path, load_inplace=loaded is not None
            )
            result = await models.load_lora_adapter(request, base_model_name=self._model.id)
        if isinstance(result, ErrorResponse):
            message = f"LoRA adapter {adapter.name} could not be loaded: {result.error.message}"
            logger.error("Model %s: %s", self._model.id, message)
            raise engine_error(result.error.code, message, "model")
        logger.info("Model %s: LoRA adapter %s loaded from %s.", self._model.id, adapter.name, path)

    def _engine_failure(self, exc: Exception) -> GatewayError:
        from vllm.exceptions import VLLMClientError, VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            return EngineUnavailable(f"The engine of model {self._model.id} has stopped.")
        if isinstance(exc, VLLMClientError):
            # Raised inside a stream by the request's own fault (the Responses API renders and
            # submits lazily, so a prompt over the cap surfaces here): the client's error.
            param = exc.parameter if isinstance(exc, VLLMValidationError) else None
            return InvalidRequest(exc.args[0] if exc.args else str(exc), param=param)
        logger.error("Request to model %s failed: %r", self._model.id, exc)
        return InternalError("The engine failed to process the request.")

    async def _publish_capacity(self, model: ModelConfig) -> None:
        """Log the KV capacity the engine sized itself to, and publish it for the ingress's
        admission bound (`apps.admission.capacity`); a failure to publish is logged, and the replica serves
        (the ingress keeps its last bound)."""
        cache = self._engine.vllm_config.cache_config
        if not cache.num_gpu_blocks:
            return
        capacity = EngineCapacity(cache.num_gpu_blocks * cache.block_size, model.engine.max_num_seqs)
        logger.info(
            "Model %s: KV cache of %d tokens (%d blocks of %d), max_num_seqs %d.",
            model.id,
            capacity.kv_cache_tokens,
            cache.num_gpu_blocks,
            cache.block_size,
            capacity.max_num_seqs,
        )
        try:
            await asyncio.to_thread(publish_capacity, model.id, capacity)
        except Exception:
            logger.exception("Model %s: publishing its KV capacity failed", model.id)

    async def load(self) -> int:
        """Requests this replica's engine holds (running or waiting)."""
        return self._engine.get_num_unfinished_requests()

    async def block_size(self) -> int:
        """The KV cache's block size: prefix-cache hits come in whole blocks of it."""
        return self._engine.vllm_config.cache_config.block_size

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's periodic report of this replica to the routers of its callers: where its KV-cache
        mirror publishes what its engine holds, when it does (`apps.routing.kv_index`)."""
        return self._routing_stats

    async def check_health(self) -> None:
        """Serve's periodic health check: raises when the engine has died."""
        await self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def _end_engine_span(span: tracing.Span | tracing.NoSpan, usage: Usage, started: float) -> None:
    """End the replica's span of a request with what its engine reported."""
    if span is tracing.NO_SPAN:
        return
    span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
    span.set_attribute("gen_ai.usage.cached_tokens", usage.cached_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens - usage.resumed_tokens)
    if usage.first_token_at is not None:
        span.set_attribute("gen_ai.time_to_first_token_s", usage.first_token_at - started)
    if usage.finish_reason is not None:
        span.set_attribute("gen_ai.response.finish_reasons", [usage.finish_reason])
    span.end()


async def _response_body(response: StarletteResponse) -> bytes:
    """A whole response's body: a JSON response's, or a (finite) streamed one's, joined."""
    if not isinstance(response, StreamingResponse):
        return bytes(response.body)
    parts = [part async for part in response.body_iterator]
    return b"".join(part if isinstance(part, bytes) else str(part).encode() for part in parts)


async def _server_sent_events(stream: AsyncIterator[Any]) -> AsyncIterator[str]:
    """vLLM's stream as SSE text: chat, completions and Messages yield it already; the
    Responses API yields event objects, written as vLLM's own router writes them."""
    async for event in stream:
        if isinstance(event, str):
            yield event
        else:
            data = event.model_dump_json(indent=None, by_alias=True)
            yield f"event: {getattr(event, 'type', 'unknown')}\ndata: {data}\n\n"


def _limiter() -> DeploymentHandle:
    """The gateway's rate limiter, which this replica settles reservations with (it lives in
    the gateway's application: `apps.applications`). A handle needs no replica yet."""
    return DeploymentHandle(LIMITER_DEPLOYMENT, GATEWAY_APP)


def _serve_logging_saved() -> Callable[[], None]:
    """Save this replica's Serve log handlers; the function returned puts them back.

    Importing and starting vLLM reconfigures logging: the `ray.serve` logger is left with a bare
    stderr handler, and a `dictConfig` closes every existing handler (closing Serve's MemoryHandler
    drops its target file). Every later line of this replica (warm-up, first request, errors)
    would then miss the replica's log file. The file reopens on the next record."""
    serve_logger = logging.getLogger("ray.serve")
    handlers = list(serve_logger.handlers)
    targets = {h: h.target for h in handlers if isinstance(h, logging.handlers.MemoryHandler)}

    def restore() -> None:
        serve_logger.handlers = handlers
        for handler, target in targets.items():
            handler.target = target

    return restore


class _Settlement:
    """Settles one reservation with the limiter, exactly once."""

    def __init__(self, settler: Settler, reservation: str | None, usage: Usage) -> None:
        self._settler = settler
        self._reservation = reservation
        self._usage = usage
        self._done = reservation is None

    async def wait(self) -> None:
        """Settle and wait for the limiter to have it (bounded: never holds up the answer long;
        the settle itself goes on regardless)."""
        task = self._send()
        if task is not None:
            await asyncio.wait({task}, timeout=SETTLE_WAIT_S)

    def now(self) -> None:
        """Settle without waiting."""
        self._send()

    def abandon(self) -> None:
        """Leave the reservation to the ingress (its request goes on elsewhere)."""
        self._done = True

    def _send(self) -> asyncio.Task[None] | None:
        if self._done:
            return None
        self._done = True
        return self._settler.settle(self._reservation, self._usage.settled_tokens())


def _known_fields(body: dict[str, Any], request_type: type[BaseModel]) -> dict[str, Any]:
    """`body` without the ignorable OpenAI fields and the gateway's own (unless vLLM's model has
    them: the Responses API's `store`); 400 for any other field vLLM does not know."""
    known = _field_names(request_type)
    unknown = sorted(body.keys() - known - IGNORED_OPENAI_FIELDS - GATEWAY_FIELDS)
    if unknown:
        raise InvalidRequest(
            f"Unrecognized request argument supplied: {unknown[0]}",
            param=unknown[0],
            code="unknown_parameter",
        )
    return {name: value for name, value in body.items() if name in known}


@functools.cache
def _protocol_model(path: str) -> type[BaseModel]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _request_type(spec: EndpointSpec, body: Mapping[str, Any]) -> type[BaseModel]:
    """The endpoint's vLLM protocol model for `body`: of several (a union in vLLM: tokenize's
    prompt or messages, score's pairs of fields), the first whose required fields the body has,
    so a wrong body's error names that model's fields; else the first."""
    models = [_protocol_model(path) for path in spec.request_types]
    for model in models:
        if _required_fields(model) <= body.keys():
            return model
    return models[0]


@functools.cache
def _required_fields(request_type: type[BaseModel]) -> frozenset[str]:
    return frozenset(
        field.alias or name for name, field in request_type.model_fields.items() if field.is_required()
    )


@functools.cache
def _field_names(request_type: type[BaseModel]) -> frozenset[str]:
    return frozenset(
        name
        for field_name, field in request_type.model_fields.items()
        for name in (field_name, field.alias)
        if name
    )


def _invalid_request(exc: ValidationError) -> InvalidRequest:
    """vLLM's protocol model refused the body: 400 naming the first bad field."""
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = f"{first['msg']} (parameter `{param}`)" if param else first["msg"]
    if first.get("input") is not None and first["type"] not in ("missing", "extra_forbidden"):
        message += f". Given: {str(first['input'])[:200]}"
    return InvalidRequest(message, param=param)
