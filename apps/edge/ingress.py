"""The OpenAI-compatible HTTP ingress: shape each request, route it by model, relay the answer.

    POST /v1/chat/completions, /v1/completions,       streaming (SSE) or not
         /v1/responses, /v1/messages (Anthropic's)
    POST /v1/embeddings, /v1/score, /v1/rerank        an embedding model's
    POST /tokenize, /detokenize                       a model's tokenizer
    GET  /v1/models                                   the served model ids
    GET  /health                                      200 only when every model has a live replica
                                                      (models that may scale to zero excepted)

Every POST endpoint is a row of `apps.endpoints.ENDPOINTS` and takes the same way, `_forward`:

    authenticate (401) -> read, parse (413, 400) -> may this key use the model (404, 403)
    -> does the model's task serve this endpoint (400), named system prompt, volatile-prefix
       check, shape (400)
    -> reserve the key's request and tokens in the shared limiter (429)
    -> wait for a slot of the model (503 when full, shed or out of time)
    -> call the model server: a replica accepts within the queue timeout (else 503
       engine_unavailable), its head comes within the time-to-first-token timeout (504); a call
       whose replica is lost before its head is sent again to another (`apps.routing.failover`)
    -> relay the body until the total timeout; a resumable stream whose replica is lost
       continues on another replica (`apps.routing.resume`)

The status is known before the first byte (the model server's `ResponseHead`); after it, body
bytes are relayed as they come, never parsed. Every error is OpenAI's error object (Anthropic's
on /v1/messages), and every
answer to a rate-limited key from the reservation on (admitted, or refused with 429) carries
its `x-ratelimit-*` headers. Every request leaves its metrics and an access-log line
(`apps.observability.telemetry`), whatever its outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.schema import ReplicaState, ServeStatus
from starlette.exceptions import HTTPException as StarletteHTTPException

from apps.admission.capacity import EngineCapacity, read_capacity
from apps.admission.gate import ModelRoute, Slot, replica_concurrency, until
from apps.admission.rate_limits import Settler, rate_limit_error, ratelimit_headers
from apps.applications import deployment_name
from apps.config import AppConfig, LoraAdapter, ModelConfig
from apps.edge.auth import Caller
from apps.edge.streaming import SSE_MEDIA_TYPE, Accepted, RelayResponse, ResponseHead, StreamEnd
from apps.endpoints import ENDPOINTS_BY_PATH, EndpointSpec, endpoint_of, error_style
from apps.errors import (
    DeadlineExceeded,
    EngineUnavailable,
    GatewayError,
    InternalError,
    InvalidRequest,
    Overloaded,
    RouteNotFound,
    engine_error,
    error_body,
    model_call_error,
    never_reached_model,
    retry_after_headers,
)
from apps.live import SettingsWatch, live_settings, starting_settings
from apps.observability import tracing
from apps.observability.metrics import ingress_metrics
from apps.observability.telemetry import RequestRecord, RequestTelemetry, export_gauges, request_record
from apps.routing.failover import (
    MAX_ATTEMPTS,
    RETRY_ACCEPT_GRACE_S,
    is_lost_replica_code,
    is_replica_lost,
)
from apps.routing.resume import Resume, StreamIdentity
from apps.shaping.prefixes import apply_system_prompt
from apps.shaping.validation import (
    ShapedRequest,
    parse_body,
    read_body,
    requested_model,
    shape_request,
)

logger = logging.getLogger("ray.serve")
# After a model call ends abnormally at the ingress, the model server's own settle (with the real
# token count) normally lands within milliseconds; this fallback only matters if it never does.
BACKSTOP_SETTLE_DELAY_S = 5.0
# A reservation call that takes longer means the limiter is down or restarting: 503, not a hang.
LIMITER_TIMEOUT_S = 5.0
LATE_UNDO_DELAY_S = 1.0
# How often the ingress reads the KV capacity the model replicas published (`apps.admission.capacity`).
CAPACITY_POLL_S = 5.0


@dataclass(frozen=True)
class ModelCall:
    """One admitted request on its way to its model: what its first call, the calls sent again
    and its resumes all need."""

    route: ModelRoute
    endpoint: EndpointSpec
    shaped: ShapedRequest
    caller: Caller
    reservation: str | None  # the rate limiter's, if the key is limited
    record: RequestRecord
    adapter: LoraAdapter | None = None  # the LoRA adapter asked for, served by `route`'s model


@dataclass(frozen=True)
class LostCall:
    """A model call whose replica was lost before its head: why, and the replicas the next call
    of the request must avoid."""

    failure: Exception
    avoid: frozenset[str]


app = FastAPI(title="LLM gateway", description="OpenAI-compatible API over vLLM engines.")
app.add_middleware(RequestTelemetry)


# The helpers the Ingress class calls are defined above it: `serve.ingress` copies the class, its
# methods seeing the module's globals as they are at that moment (a function defined below the
# class would be a NameError in the replica).
def _log_capacity(model: ModelConfig, capacity: EngineCapacity) -> None:
    typical = model.admission.typical_request_tokens or 0
    logger.info(
        "Model %s: its engine's KV cache holds %d tokens, %d requests of %d tokens (max_num_seqs %d): "
        "%d per replica at once.",
        model.id,
        capacity.kv_cache_tokens,
        capacity.sequences(typical),
        typical,
        capacity.max_num_seqs,
        replica_concurrency(model, capacity),
    )


def _check_task(endpoint: EndpointSpec, model: ModelConfig) -> None:
    """400 when the model's task does not serve the endpoint (chat from an embedding model)."""
    if model.task not in endpoint.tasks:
        served = [spec.path for spec in ENDPOINTS_BY_PATH.values() if model.task in spec.tasks]
        raise InvalidRequest(
            f"Model {model.id} has task `{model.task}`: it does not serve {endpoint.path}. "
            f"Its endpoints: {', '.join(served)}",
            param="model",
            code="unsupported_endpoint",
        )


def _head_error(head: ResponseHead) -> GatewayError:
    """The error a model server's error head reports (its OpenAI body), as ours."""
    try:
        info = json.loads(head.body)["error"]
        return engine_error(head.status, str(info.get("message")), info.get("param"))
    except (ValueError, KeyError, TypeError):
        return engine_error(head.status, "The model failed to continue the stream.", None)


@app.exception_handler(GatewayError)
async def _gateway_error(request: Request, error: GatewayError) -> JSONResponse:
    request_record(request).reason = error.code
    body = error_body(error, error_style(request.scope))
    return JSONResponse(body, status_code=error.status, headers=error.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Routing answers: 404 for an unknown path, 405 (with its Allow header) for a wrong method.
    error = RouteNotFound(str(exc.detail), status=exc.status_code)
    request_record(request).reason = error.code
    body = error_body(error, error_style(request.scope))
    return JSONResponse(body, status_code=error.status, headers=exc.headers)


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("Unexpected error in the ingress")
    return await _gateway_error(request, InternalError("Internal server error."))


@serve.ingress(app)
class Ingress:
    """Routes each request by its `model` field to that model's deployment, after admission."""

    async def __init__(self, config: AppConfig, limiter: DeploymentHandle) -> None:
        config = await starting_settings(config)  # `config` is as of the gateway's last build
        self._limiter = limiter
        self._settler = Settler(limiter)
        self._metrics = ingress_metrics()
        self._capacities: dict[str, EngineCapacity] = {}  # what each model's engines hold
        self._live = live_settings(config, None, self._count_volatile_prefix)
        # Serve runs the constructor on the replica's event loop, which serves the requests too.
        loop = asyncio.get_running_loop()
        self._gauges = loop.create_task(export_gauges(lambda: self._live.routes))
        self._settings_watch = loop.create_task(SettingsWatch(config, self._swap).run())
        self._capacity_watch = loop.create_task(self._watch_capacities())

    def _swap(self, config: AppConfig) -> None:
        """New live settings (`apps.live`): requests already admitted keep the ones they began with."""
        self._live = live_settings(
            config, self._live, self._count_volatile_prefix, capacities=self._capacities
        )

    async def _watch_capacities(self) -> None:
        """Forever: read the KV capacity the engines of each model sized by it published
        (`apps.admission.capacity`), and size its gate anew when it changed."""
        while True:
            try:
                models = [m for m in self._live.config.models if m.admission.typical_request_tokens]
                published = {m.id: await asyncio.to_thread(read_capacity, m.id) for m in models}
                updates = {
                    model_id: capacity
                    for model_id, capacity in published.items()
                    if capacity is not None and capacity != self._capacities.get(model_id)
                }
                if updates:
                    kept = self._capacities
                    self._capacities = kept | updates
                    try:
                        self._swap(self._live.config)
                    except Exception:
                        self._capacities = kept  # so the next pass tries again
                        raise
                    for model in models:
                        if model.id in updates:
                            _log_capacity(model, updates[model.id])
            except Exception:  # Ray's store unreachable for a moment: keep the last sizes
                logger.exception("Sizing the gates by the engines' KV capacity failed")
            await asyncio.sleep(CAPACITY_POLL_S)

    def _count_volatile_prefix(self, model_id: str, kind: str) -> None:
        self._metrics.volatile_prefixes.inc(tags={"model": model_id, "kind": kind})

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        live = self._live
        caller = live.keys.authenticate(
            request.headers.get("authorization"), request.headers.get("x-api-key")
        )
        visible = [model for model in live.model_list if caller.may_use(model["id"])]
        return JSONResponse({"object": "list", "data": visible})

    async def serve_endpoint(self, request: Request) -> Response:
        """Every POST endpoint of `apps.endpoints`, by its path."""
        endpoint = endpoint_of(request.scope)
        assert endpoint is not None  # this handler serves the table's paths only
        return await self._forward(request, endpoint)

    for _path in ENDPOINTS_BY_PATH:
        serve_endpoint = app.post(_path)(serve_endpoint)
    del _path

    @app.get("/health")
    async def health(self) -> Response:
        """Serve's own view (controller state), so probes neither queue behind generation nor
        wake a model scaled to zero."""
        status = await self._serve_status()
        if status is None:
            error = EngineUnavailable("Serve's status is unavailable.")
            return JSONResponse(error_body(error), status_code=error.status)
        routes = self._live.routes
        not_ready = [
            model_id
            for model_id, route in routes.items()
            # A model scaled to zero on purpose: the next request starts a replica.
            if not route.scales_to_zero and not self._running(status, model_id)
        ]
        if not_ready:
            error = EngineUnavailable(f"Models without a ready replica: {not_ready}")
            return JSONResponse(error_body(error), status_code=error.status)
        return JSONResponse({"status": "ok", "models": list(routes)})

    async def _serve_status(self) -> ServeStatus | None:
        """Serve's status from its controller; None when it does not answer in time."""
        try:
            timeout = self._live.config.ingress.health_timeout_s
            return await asyncio.wait_for(asyncio.to_thread(serve.status), timeout)
        except Exception as exc:
            logger.warning("Could not read Serve's status: %r", exc)
            return None

    def _running(self, status: ServeStatus, model_id: str) -> int:
        """RUNNING replicas of a model in `status`."""
        name = deployment_name(model_id)  # the model's application and deployment
        application = status.applications.get(name)
        deployment = application.deployments.get(name) if application else None
        return deployment.replica_states.get(ReplicaState.RUNNING, 0) if deployment else 0

    async def _forward(self, request: Request, endpoint: EndpointSpec) -> Response:
        record = request_record(request)
        live = self._live  # one snapshot of the settings for the whole request
        with tracing.child(record.span, "authenticate") as span:
            caller = live.keys.authenticate(
                request.headers.get("authorization"), request.headers.get("x-api-key")
            )
            span.set_attribute("gateway.key", caller.name)
        record.key = caller.name
        ingress = live.config.ingress
        with tracing.child(record.span, "read"):
            body = parse_body(await read_body(request, ingress.max_body_bytes, ingress.body_timeout_s))
        with tracing.child(record.span, "shape") as span:
            model_id = requested_model(body)
            record.stream = body.get("stream") is True
            live.keys.authorize(caller, model_id, live.served)
            record.model = model_id  # a served model or adapter: metric labels stay bounded
            # An adapter is served by its base model's replicas, with the base's settings.
            base_id, adapter = live.adapters.get(model_id, (model_id, None))
            route = live.routes[base_id]
            _check_task(endpoint, route.config)
            body = apply_system_prompt(body, endpoint.name, model_id, route.config.system_prompts)
            live.prefix_watches[base_id].check(body, endpoint.name)
            shaped = shape_request(body, endpoint.name, model_id, route.config.limits)
            span.set_attribute(tracing.MODEL, model_id)
            span.set_attribute("gen_ai.request.max_tokens", shaped.max_tokens)
            span.set_attribute("gateway.max_tokens_clamped", shaped.clamped)
        headers = {"x-max-tokens-clamped": str(shaped.max_tokens)} if shaped.clamped else {}
        reservation = None
        if caller.rate_limited:
            attributes = {"gateway.reserved_tokens": shaped.reserved_tokens}
            with tracing.child(record.span, "rate_limit", attributes):
                reservation = await self._reserve(caller, route, shaped, headers)
        call = ModelCall(route, endpoint, shaped, caller, reservation, record, adapter)
        try:
            return await self._admit_and_call(call, headers)
        except GatewayError as error:
            error.headers = headers | error.headers
            raise

    async def _reserve(
        self, caller: Caller, route: ModelRoute, shaped: ShapedRequest, headers: dict[str, str]
    ) -> str:
        """The caller's reservation in the shared limiter, with the key's current limits; adds
        its `x-ratelimit-*` headers."""
        reservation = uuid.uuid4().hex
        call = self._limiter.reserve.remote(
            caller.name, shaped.reserved_tokens, reservation, caller.key, route.lease_s
        )
        try:
            decision = await asyncio.wait_for(call, LIMITER_TIMEOUT_S)
        except BaseException as exc:
            # The limiter may have made the reservation without our hearing of it: undo it,
            # a little later so the undo cannot overtake the reservation.
            self._settler.settle(reservation, 0, delay_s=LATE_UNDO_DELAY_S)
            if not isinstance(exc, Exception):
                raise
            logger.error("Rate limiter call failed: %r", exc)
            raise EngineUnavailable(
                "The rate limiter is unavailable; retry later.", code="limiter_unavailable"
            ) from None
        headers.update(ratelimit_headers(decision))
        if not decision.admitted:
            error = rate_limit_error(decision)
            error.headers = headers | error.headers
            raise error
        return decision.reservation

    async def _admit_and_call(self, call: ModelCall, headers: dict[str, str]) -> Response:
        route, record = call.route, call.record
        head_due, total_due = route.deadlines(record.arrived, record.stream)
        loop = asyncio.get_running_loop()
        queued = loop.time()
        caller = call.caller
        attributes = {"gateway.priority": caller.priority, "gateway.queue_depth": route.gate.depth}
        share = {
            "key": caller.name,
            "weight": caller.key.fair_share_weight if caller.key is not None else 1.0,
            "cost": call.shaped.reserved_tokens,
        }
        try:
            with tracing.child(record.span, "queue", attributes):
                slot = await route.gate.acquire(caller.priority, head_due, **share)
        except BaseException:
            record.queue_wait_s = loop.time() - queued
            self._settle(call.reservation, used_tokens=0)  # never reached an engine
            raise
        record.admit(loop.time() - queued)
        if slot.overtook:
            self._metrics.fair_share_overtakes.inc(tags={"model": route.config.id, "key": caller.name})
        # The engine orders its own short queue by this (`apps.admission.gate`); a client's own
        # `priority` field was refused when the request was shaped.
        body = call.shaped.body | {"priority": slot.engine_priority}
        call = dataclasses.replace(call, shaped=dataclasses.replace(call.shaped, body=body))
        try:
            stream, head, replica = await self._call_model(call)
        except BaseException:
            # A request no replica took cost its key nothing; one that ran, what it reserved.
            route.gate.release(slot, None if record.reached_model else 0)
            raise
        record.usage, record.reason = head.usage, head.code
        record.relay = tracing.child(record.span, "relay", {"gateway.replica": replica})
        if head.media_type != SSE_MEDIA_TYPE:
            route.gate.release(slot, record.usage.settled_tokens() if record.usage else None)
            return Response(
                head.body, status_code=head.status, media_type=head.media_type, headers=headers
            )
        resume = None
        if head.identity is not None:
            resume = functools.partial(self._resume, call, head.identity, {replica}, total_due)
        return RelayResponse(
            head.body,
            stream,
            call.shaped.model_id,
            headers=headers,
            deadline=total_due,
            on_close=lambda end: self._stream_closed(route, slot, call.reservation, record, end),
            token_ids=head.token_ids,
            resume=resume,
            errors=call.endpoint.errors,
        )

    async def _resume(
        self,
        call: ModelCall,
        identity: StreamIdentity,
        lost: set[str],
        due: float | None,
        token_ids: tuple[int, ...],
    ) -> tuple[DeploymentResponseGenerator, ResponseHead]:
        """Continue a stream whose replica was lost after `token_ids` (`apps.routing.resume`), on a
        replica not in `lost` (the replicas this stream has lost so far, updated here)."""
        model_id = call.shaped.model_id
        call.route.replicas.lost()
        self._metrics.failovers.inc(tags={"model": model_id, "kind": "resume"})
        logger.warning(
            "Model %s: stream %s lost its replica after %d tokens; resuming on another.",
            model_id,
            call.record.request_id,
            len(token_ids),
        )
        stream, head, replica = await self._call_model(
            call, Resume(token_ids, identity), due, frozenset(lost)
        )
        lost.add(replica)  # should this one be lost too, the next resume avoids it
        return stream, head

    async def _call_model(
        self,
        call: ModelCall,
        resume: Resume | None = None,
        resume_due: float | None = None,
        avoid: frozenset[str] = frozenset(),
    ) -> tuple[DeploymentResponseGenerator, ResponseHead, str]:
        """Call the model until a replica answers with a head (`apps.routing.failover`): a replica that is
        lost before its head is replaced by another call, at most MAX_ATTEMPTS in all, which the
        router sends to another replica (`avoid`: replicas already lost for this request); the
        wait for a replica to accept is bounded by the queue deadline. Returns the call's stream,
        its head and the replica's id; raises the answer's error.

        `resume`: continue a stream whose replica was lost (`apps.routing.resume`), due by `resume_due`;
        a replica must accept it at once (the client is mid-stream), and its error answer is
        raised. The reservation is then left to the stream's end."""
        route, shaped, record, reservation = call.route, call.shaped, call.record, call.reservation
        loop = asyncio.get_running_loop()
        head_due, _ = route.deadlines(record.arrived, record.stream)
        queue_due = record.arrived + route.config.admission.queue_timeout_s
        if route.scales_to_zero:
            # Waking a replica is expected to take an engine start: the head deadline bounds it.
            queue_due = head_due if head_due is not None else math.inf
        if resume is not None:
            head_due, queue_due = resume_due, loop.time() + RETRY_ACCEPT_GRACE_S
        failure: Exception | None = None
        for attempt in range(MAX_ATTEMPTS):
            # A call sent again gets a moment even past the queue deadline: a live replica
            # accepts within milliseconds.
            accept_due = queue_due if attempt == 0 else max(queue_due, loop.time() + RETRY_ACCEPT_GRACE_S)
            if head_due is not None:
                accept_due = min(accept_due, head_due)
            with tracing.child(record.span, "model_call", {"gateway.attempt": attempt + 1}) as span:
                span.set_attribute("gateway.resumed_tokens", len(resume.token_ids) if resume else None)
                outcome = await self._call_once(call, span, resume, accept_due, head_due, avoid)
            if not isinstance(outcome, LostCall):
                return outcome
            failure, avoid = outcome.failure, outcome.avoid
        # Every attempt met a lost replica: the model server settled none of them.
        if resume is None:
            self._settle(reservation, used_tokens=0)
        logger.warning(
            "Model %s: %d calls of request %s lost their replica: %r",
            shaped.model_id,
            MAX_ATTEMPTS,
            record.request_id,
            failure,
        )
        error = EngineUnavailable(
            f"Model {shaped.model_id} has no live replica for this request; retry later."
        )
        error.headers.update(retry_after_headers(route.replicas.retry_after_s()))
        raise error

    async def _call_once(
        self,
        call: ModelCall,
        span: tracing.Span | tracing.NoSpan,
        resume: Resume | None,
        accept_due: float,
        head_due: float | None,
        avoid: frozenset[str],
    ) -> tuple[DeploymentResponseGenerator, ResponseHead, str] | LostCall:
        """One call of `_call_model`: the call's stream, head and replica, or the `LostCall` when
        its replica was lost before the head. Raises the answer's error."""
        route, shaped, reservation = call.route, call.shaped, call.reservation
        stream = route.stream.generate.remote(
            call.endpoint.name,
            shaped.body,
            reservation,
            call.caller.name,
            resume,
            avoid_replicas=avoid,
            routing=route.routing,
            max_prompt_tokens=route.config.limits.max_prompt_tokens,
            adapter=call.adapter,
            trace=tracing.carrier(span),
        )
        accepted: Accepted | None = None
        try:
            accepted = await until(anext(stream), None if accept_due == math.inf else accept_due)
            call.record.reached_model = True
            route.replicas.accepted(accepted.startup_s)
            span.set_attribute("gateway.replica", accepted.replica_id)
            head: ResponseHead = await until(anext(stream), head_due)
        except BaseException as exc:
            stream.cancel()
            if isinstance(exc, Exception) and is_replica_lost(exc):
                tracing.fail(span, "replica_lost")
                return LostCall(exc, self._lost(call, avoid, accepted, type(exc).__name__))
            if resume is None:  # a resumed stream is settled when it ends (_stream_closed)
                if accepted is None:
                    self._settle(reservation, used_tokens=0)  # no replica ran it
                else:
                    self._settle_unless_model_did(reservation, exc)
            if isinstance(exc, TimeoutError):
                if accepted is None:
                    raise await self._no_replica_accepted(route, shaped.model_id) from None
                raise DeadlineExceeded(
                    f"Model {shaped.model_id} did not answer in time; the request was aborted."
                ) from None
            if isinstance(exc, Exception):
                raise model_call_error(shaped.model_id, exc) from exc
            raise
        span.set_attribute("http.response.status_code", head.status)
        if is_lost_replica_code(head.code):  # its engine is dead; it settled nothing
            stream.cancel()
            tracing.fail(span, head.code)
            lost = f"{head.status} {head.code}"
            return LostCall(RuntimeError(lost), self._lost(call, avoid, accepted, lost))
        if resume is not None and head.status != 200:
            stream.cancel()
            raise model_call_error(shaped.model_id, _head_error(head))
        if head.status != 200:
            tracing.fail(span, head.code)
        return stream, head, accepted.replica_id

    def _lost(
        self, call: ModelCall, avoid: frozenset[str], accepted: Accepted | None, failure: str
    ) -> frozenset[str]:
        """A call lost its replica before its head: note the outage, count and log the call sent
        again, and return the replicas the next call must avoid."""
        call.route.replicas.lost()
        self._metrics.failovers.inc(tags={"model": call.shaped.model_id, "kind": "retry"})
        logger.warning(
            "Model %s: request %s lost its replica before its first token (%s); sending it again.",
            call.shaped.model_id,
            call.record.request_id,
            failure,
        )
        return avoid | {accepted.replica_id} if accepted is not None else avoid

    async def _no_replica_accepted(self, route: ModelRoute, model_id: str) -> GatewayError:
        """The answer to a call no replica accepted by the queue deadline: 503 engine_unavailable
        when the model has lost its replicas (Retry-After: when a replacement is expected), else
        503 queue_timeout (every replica is full). Serve notices a dead replica seconds after the
        calls to it fail, so a loss seen here counts first."""
        status = None if route.replicas.in_outage else await self._serve_status()
        if status is None or self._running(status, model_id) == 0:
            route.replicas.lost()
            error: GatewayError = EngineUnavailable(
                f"Model {model_id} has no running replica; a replacement is starting. Retry later."
            )
            error.headers.update(retry_after_headers(route.replicas.retry_after_s()))
            return error
        return Overloaded(
            f"Model {model_id}: no replica had room within the queue timeout. Retry later.",
            reason="queue_timeout",
            retry_after_s=route.gate.retry_after_s(),
        )

    def _stream_closed(
        self,
        route: ModelRoute,
        slot: Slot,
        reservation: str | None,
        record: RequestRecord,
        end: StreamEnd,
    ) -> None:
        record.usage = end.usage or record.usage
        route.gate.release(slot, record.usage.settled_tokens() if record.usage else None)
        if not end.completed:
            record.end_status, record.reason = end.status, end.code
        if not end.completed and reservation is not None:
            # Cut short: the model server settles with the real count, unless its replica died.
            self._settler.settle(reservation, None, delay_s=BACKSTOP_SETTLE_DELAY_S)

    def _settle(self, reservation: str | None, used_tokens: int | None) -> None:
        if reservation is not None:
            self._settler.settle(reservation, used_tokens)

    def _settle_unless_model_did(self, reservation: str | None, exc: BaseException) -> None:
        """A model call that ended at the ingress (cancelled, timed out, failed): the model server
        settles with the real count if it ran the request. A call that never reached it is
        refunded now; otherwise, in case its replica died, it is charged in full a little later,
        which does nothing if the model server's settle came first."""
        if reservation is None:
            return
        if never_reached_model(exc):
            self._settler.settle(reservation, 0)
        else:
            self._settler.settle(reservation, None, delay_s=BACKSTOP_SETTLE_DELAY_S)
