"""Build the Serve application from a config: `import_path: apps.builder:build_app`.

Validate once, then one ModelServer deployment per model (its options all derived here from the
schema) and the ingress bound with `{model_id: handle}`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from apps.admission import replica_max_ongoing
from apps.config import DEFAULT_MAX_SURGE_PERCENT, AppConfig, ModelConfig, load_config
from apps.engine_args import engine_env_vars
from apps.ingress import Ingress
from apps.model_server import ModelServer
from apps.placement import placement_for, unplaceable_reason
from apps.rate_limits import RateLimiter

logger = logging.getLogger("ray.serve")
# Autoscaling aims below the batch capacity, so a new replica starts before the batch is full.
TARGET_ONGOING_SHARE = 0.75
# Health checks start once the constructor (engine start) has returned. A check is cheap
# (is the engine process alive?); the timeout covers an event loop busy with a large batch.
# Serve stops a replica after 3 failed checks in a row: a replica whose engine died leaves the
# rotation after about 3 periods (its requests meanwhile go to other replicas: apps.failover).
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# Requests an ingress replica queues per model while all replicas are full or being replaced.
QUEUED_PER_ONGOING = 2
# A reservation nobody settled (its model replica died mid-request) is charged in full this long
# after the longest a request may take; requests without a timeout get an hour.
LEASE_MARGIN_S = 60.0
UNTIMED_REQUEST_S = 3600.0
# The limiter answers every rate-limited request; its calls are tiny and never block.
LIMITER_MAX_ONGOING_REQUESTS = 10_000
# A stopping replica (rolling update, scale-down, shutdown) takes no new requests and is given
# this long beyond the longest request it may hold to finish them, before it is killed.
DRAIN_MARGIN_S = 10.0


def drain_timeout_s(models: list[ModelConfig]) -> float:
    """How long a stopping replica serving `models` waits for its requests: the longest request
    timeout among them plus a margin (an hour for a model without one)."""
    longest = max(model.admission.request_timeout_s or UNTIMED_REQUEST_S for model in models)
    return longest + DRAIN_MARGIN_S


def deployment_name(model_id: str) -> str:
    """Serve deployment name for a model id (ids may hold '/' or ':', names should not)."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)


def model_deployment_options(model: ModelConfig) -> dict[str, Any]:
    """Serve options of one model's deployment: placement, replicas, concurrency, health."""
    placement = placement_for(model.parallelism)
    capacity = model.engine.max_num_seqs
    max_ongoing = replica_max_ongoing(model)
    options: dict[str, Any] = {
        "name": deployment_name(model.id),
        "placement_group_bundles": placement.bundles,
        "placement_group_strategy": placement.strategy,
        "ray_actor_options": {
            "num_cpus": placement.replica_num_cpus,
            "num_gpus": placement.replica_num_gpus,
            "runtime_env": {"env_vars": engine_env_vars(model)},
        },
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": model.replicas.max_queued_requests
        or max_ongoing * QUEUED_PER_ONGOING,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        # Rolling updates start the replacement first, and a stopping replica finishes its streams.
        "max_surge_percent": model.replicas.max_surge_percent,
        "graceful_shutdown_timeout_s": drain_timeout_s([model]),
    }
    routing = model.replicas.routing
    options["request_router_config"] = {
        "request_router_class": "apps.routing:PrefixAffinityRouter",
        "request_router_kwargs": {
            "prefix_chars": routing.prefix_chars,
            "max_imbalance": routing.max_imbalance,
            "prefix_affinity": routing.policy == "prefix_affinity",
        },
    }
    autoscaling = model.replicas.autoscaling
    if autoscaling is None:
        options["num_replicas"] = model.replicas.num_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": autoscaling.min_replicas,
            "max_replicas": autoscaling.max_replicas,
            "target_ongoing_requests": autoscaling.target_ongoing_requests
            or max(1.0, capacity * TARGET_ONGOING_SHARE),
            "upscale_delay_s": autoscaling.upscale_delay_s,
            "downscale_delay_s": autoscaling.downscale_delay_s,
            "look_back_period_s": autoscaling.look_back_period_s,
        }
    return options


def build_from_config(config: AppConfig) -> Application:
    """The Serve application for a validated config."""
    _warn_unplaceable(config)
    limiter = _limiter(config)
    models = {
        model.id: serve.deployment(ModelServer)
        .options(**model_deployment_options(model))
        .bind(model, limiter)
        for model in config.models
    }
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
        # The ingress relays every model's streams: it drains as long as the slowest model.
        max_surge_percent=DEFAULT_MAX_SURGE_PERCENT,
        graceful_shutdown_timeout_s=drain_timeout_s(config.models),
    )
    return ingress.bind(config, models, limiter)


def _limiter(config: AppConfig) -> Application | None:
    """The one rate-limiter replica, when any key has a limit (none: no per-request call)."""
    keys = [key for key in config.auth.keys if key.rate_limited] if config.auth.enabled else []
    if not keys:
        return None
    return (
        serve.deployment(RateLimiter)
        .options(
            name="rate-limiter",
            num_replicas=1,
            max_ongoing_requests=LIMITER_MAX_ONGOING_REQUESTS,
            ray_actor_options={"num_cpus": 0},
        )
        .bind(keys, reservation_lease_s(config))
    )


def reservation_lease_s(config: AppConfig) -> float:
    """How long an unsettled reservation is held before it is charged in full."""
    longest = max(
        model.admission.queue_timeout_s + (model.admission.request_timeout_s or UNTIMED_REQUEST_S)
        for model in config.models
    )
    return longest + LEASE_MARGIN_S


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: validates `args` (raising one readable error) and builds."""
    return build_from_config(load_config(args))


def unplaceable_models(config: AppConfig) -> dict[str, str]:
    """Models whose replica fits on no alive node of the connected Ray cluster, with the reason."""
    if not ray.is_initialized():
        return {}
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    reasons = {
        model.id: unplaceable_reason(placement_for(model.parallelism), nodes) for model in config.models
    }
    return {model_id: reason for model_id, reason in reasons.items() if reason is not None}


def _warn_unplaceable(config: AppConfig) -> None:
    """Say now, not after a silent wait, when a model's replica fits on no node of the cluster,
    or when the cluster has no room for a rolling update's extra replica. Serve itself repeats it
    in the deployment's status message once scheduling is slow."""
    for model_id, reason in unplaceable_models(config).items():
        logger.error("Model %s cannot be placed on the current cluster: %s", model_id, reason)
    if not ray.is_initialized():
        return
    totals: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for resource, amount in node["Resources"].items():
                totals[resource] = totals.get(resource, 0.0) + amount
    for model_id in models_without_surge_room(config, totals):
        logger.warning(
            "Model %s: the cluster has no room for a rolling update's extra replica next to the "
            "running ones. An update of this model waits (the old replicas keep serving) until a "
            "node with room joins; set replicas.max_surge_percent: 0 to stop first instead.",
            model_id,
        )


def replica_demand(model: ModelConfig) -> dict[str, float]:
    """Logical resources one replica of `model` holds (its placement group's bundles)."""
    demand: dict[str, float] = {}
    for bundle in placement_for(model.parallelism).bundles:
        for resource, amount in bundle.items():
            demand[resource] = demand.get(resource, 0.0) + amount
    return demand


def models_without_surge_room(config: AppConfig, totals: dict[str, float]) -> list[str]:
    """Models whose surge replicas do not fit in `totals` (the cluster's resources) next to the
    steady-state replicas of the whole app: their rolling updates would wait for room.
    Counts the fewest replicas each model runs (autoscaling: `min_replicas`)."""
    steady: dict[str, float] = {"CPU": config.ingress.num_cpus * config.ingress.num_replicas}
    for model in config.models:
        autoscaling = model.replicas.autoscaling
        count = autoscaling.min_replicas if autoscaling else model.replicas.num_replicas
        for resource, amount in replica_demand(model).items():
            steady[resource] = steady.get(resource, 0.0) + amount * count
    short = []
    for model in config.models:
        if model.replicas.max_surge_percent == 0:
            continue
        autoscaling = model.replicas.autoscaling
        count = max(1, autoscaling.min_replicas if autoscaling else model.replicas.num_replicas)
        surge = -(-model.replicas.max_surge_percent * count // 100)
        demand = replica_demand(model)
        if any(
            steady.get(resource, 0.0) + amount * surge > totals.get(resource, 0.0) + 1e-9
            for resource, amount in demand.items()
        ):
            short.append(model.id)
    return short
