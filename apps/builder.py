"""Build the gateway's Serve applications (`apps.applications` says which holds what).

    import_path: apps.builder:build_gateway    the ingress and the rate limiter
    import_path: apps.builder:build_settings   the live settings
    import_path: apps.builder:build_model      one model's engine replicas

Each builder validates the whole config its application makes with the others, then derives its
deployments' options from the schema.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from apps.admission.gate import replica_max_ongoing
from apps.admission.rate_limits import RateLimiter
from apps.applications import (
    GATEWAY_IMPORT_PATH,
    LIMITER_DEPLOYMENT,
    MODEL_IMPORT_PATH,
    SETTINGS_IMPORT_PATH,
    PartError,
    compose_args,
    deployed_args,
    deployment_name,
    replica_count,
)
from apps.config import (
    DEFAULT_MAX_SURGE_PERCENT,
    AppConfig,
    AutoscalingSettings,
    ConfigError,
    ModelConfig,
    load_config,
)
from apps.edge.ingress import Ingress
from apps.engine.engine_args import engine_env_vars
from apps.engine.model_server import ModelServer
from apps.engine.placement import placement_for, unplaceable_reason
from apps.engine.replica_policy import REPLICA_CEILING, publish_sizing

__all__ = ["build_gateway", "build_model", "build_settings", "deployment_name"]

logger = logging.getLogger("ray.serve")
# Autoscaling aims below the batch capacity, so a new replica starts before the batch is full.
TARGET_ONGOING_SHARE = 0.75
# Health checks start once the constructor (engine start) has returned. A check is cheap
# (is the engine process alive?); the timeout covers an event loop busy with a large batch.
# Serve stops a replica after 3 failed checks in a row: a replica whose engine died leaves the
# rotation after about 3 periods (its requests meanwhile go to other replicas: apps.routing.failover).
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# How often Serve asks each model replica for its routing stats (`ModelServer.record_routing_stats`).
ROUTING_STATS_PERIOD_S = 5.0
# Requests an ingress replica queues per model while all replicas are full or being replaced.
QUEUED_PER_ONGOING = 2
# The limiter answers every rate-limited request; its calls are tiny and never block.
LIMITER_MAX_ONGOING_REQUESTS = 10_000


def model_deployment_options(model: ModelConfig) -> dict[str, Any]:
    """Serve options of one model's deployment: placement, replicas, concurrency, health."""
    placement = placement_for(model.parallelism)
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
        "graceful_shutdown_timeout_s": model.replicas.drain_timeout_s,
    }
    # The router's knobs are live settings: each request carries them (`apps.routing.router`).
    # Routing stats carry where a replica's engine publishes its KV-cache events (`apps.routing.kv_index`):
    # a new replica is routed precisely within one period.
    options["request_router_config"] = {
        "request_router_class": "apps.routing.router:PrefixAffinityRouter",
        "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
    }
    # Every model autoscales under the live sizing policy, inside bounds Serve never reaches;
    # Serve's delays are 0 because the policy counts them (`apps.engine.replica_policy`). Serve starts
    # a deployment at `initial_replicas`, and resets it to that count on every roll: the count it
    # has now (within the bounds; the minimum for a new one). Without it a new deployment would
    # start at 0, and report RUNNING before the policy's first tick.
    sizing = replica_sizing(model)
    autoscaling = model.replicas.autoscaling
    low, high = int(sizing["min_replicas"]), int(sizing["max_replicas"])
    current = replica_count(model.id)
    options["autoscaling_config"] = {
        "min_replicas": 0,
        "max_replicas": REPLICA_CEILING,
        "initial_replicas": low if current is None else min(max(current, low), high),
        "target_ongoing_requests": sizing["target_ongoing_requests"],
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
        "look_back_period_s": (autoscaling or AutoscalingSettings()).look_back_period_s,
        "policy": {
            "policy_function": "apps.engine.replica_policy:LiveSizingPolicy",
            "policy_kwargs": {"model_id": model.id, "sizing": sizing, "built_at": time.time()},
        },
    }
    return options


def replica_sizing(model: ModelConfig) -> dict[str, float]:
    """`model`'s replica count or autoscaling bounds, as `apps.engine.replica_policy` reads them (a fixed
    count is min = max)."""
    autoscaling = model.replicas.autoscaling
    target = max(1.0, model.engine.max_num_seqs * TARGET_ONGOING_SHARE)
    # The policy scales a derived target by what the engines' KV cache holds (`apps.admission.capacity`).
    typical = model.admission.typical_request_tokens
    derived = {}
    if typical and not model.replicas.max_ongoing_requests:
        derived = {"typical_request_tokens": float(typical)}
    if autoscaling is None:
        count = model.replicas.num_replicas
        return {
            "min_replicas": count,
            "max_replicas": count,
            "target_ongoing_requests": target,
            "upscale_delay_s": 0.0,
            "downscale_delay_s": 0.0,
        } | derived
    return {
        "min_replicas": autoscaling.min_replicas,
        "max_replicas": autoscaling.max_replicas,
        "target_ongoing_requests": autoscaling.target_ongoing_requests or target,
        "upscale_delay_s": autoscaling.upscale_delay_s,
        "downscale_delay_s": autoscaling.downscale_delay_s,
    } | (derived if autoscaling.target_ongoing_requests is None else {})


class Settings:
    """The live settings' application's one small replica. It serves nothing: the application
    exists so that Serve builds (validates) an edit of the settings and shows its status; the
    ingress reads the settings from Serve's controller (`apps.live`)."""


def gateway_application(config: AppConfig) -> Application:
    """The ingress and the rate limiter (it holds every limited key's state; the ingress sends
    each key's limits with its reservation, so a settings change never restarts it)."""
    limiter = (
        serve.deployment(RateLimiter)
        .options(
            name=LIMITER_DEPLOYMENT,
            num_replicas=1,
            max_ongoing_requests=LIMITER_MAX_ONGOING_REQUESTS,
            ray_actor_options={"num_cpus": 0},
        )
        .bind()
    )
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
        max_surge_percent=DEFAULT_MAX_SURGE_PERCENT,
        graceful_shutdown_timeout_s=config.ingress.drain_timeout_s,
    )
    return ingress.bind(config, limiter)


def settings_application() -> Application:
    return (
        serve.deployment(Settings)
        .options(name="settings", num_replicas=1, ray_actor_options={"num_cpus": 0})
        .bind()
    )


class ModelEntrypoint:
    """A model application's ingress, which takes no traffic. Serve makes one deployment of each
    application its ingress, and behind HAProxy an ingress may not have a custom request router;
    the model's deployment has one (`apps.routing.router`), and the gateway calls it by handle."""

    def __init__(self, model: DeploymentHandle) -> None:
        del model  # bound only to make the model's deployment part of this application


def model_application(config: AppConfig, model_id: str) -> Application:
    (model,) = [model for model in config.models if model.id == model_id]
    _warn_unplaceable(config, model)
    server = serve.deployment(ModelServer).options(**model_deployment_options(model)).bind(model)
    return (
        serve.deployment(ModelEntrypoint)
        .options(name="entrypoint", num_replicas=1, ray_actor_options={"num_cpus": 0})
        .bind(server)
    )


def build_gateway(args: dict[str, Any]) -> Application:
    """Serve's builder of the gateway application."""
    return gateway_application(_whole_config(GATEWAY_IMPORT_PATH, args))


def build_settings(args: dict[str, Any]) -> Application:
    """Serve's builder of the live settings' application."""
    config = _whole_config(SETTINGS_IMPORT_PATH, args)  # refuses an invalid edit before anything changes
    if ray.is_initialized():
        publish_sizing({model.id: replica_sizing(model) for model in config.models})
    return settings_application()


def build_model(args: dict[str, Any]) -> Application:
    """Serve's builder of one model's application."""
    config = _whole_config(MODEL_IMPORT_PATH, args)
    return model_application(config, str(args.get("id")))


def _whole_config(import_path: str, args: Mapping[str, Any]) -> AppConfig:
    """The config this application makes with the others Serve holds (this one's `args` in
    place of what Serve holds for it), validated whole; one readable `ConfigError` if not.
    A model's builder also checks the models' checkpoints."""
    deployed = dict(deployed_args())
    is_model = import_path == MODEL_IMPORT_PATH
    mine = [
        name
        for name, (path, held) in deployed.items()
        if path == import_path and (not is_model or held.get("id") == args.get("id"))
    ]
    for name in mine:
        del deployed[name]
    name = mine[0] if mine else deployment_name(str(args.get("id"))) if is_model else import_path
    deployed[name] = (import_path, args)
    try:
        composed = compose_args(deployed)
    except PartError as exc:
        raise ConfigError(f"Invalid application config: {exc}") from None
    return load_config(composed, check_model_files=is_model)


def unplaceable_models(config: AppConfig) -> dict[str, str]:
    """Models whose replica fits on no alive node of the connected Ray cluster, with the reason."""
    if not ray.is_initialized():
        return {}
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    reasons = {
        model.id: unplaceable_reason(placement_for(model.parallelism), nodes) for model in config.models
    }
    return {model_id: reason for model_id, reason in reasons.items() if reason is not None}


def _warn_unplaceable(config: AppConfig, model: ModelConfig) -> None:
    """Say now, not after a silent wait, when `model`'s replica fits on no node of the cluster,
    or when the cluster has no room for a rolling update's extra replica. Serve itself repeats it
    in the deployment's status message once scheduling is slow."""
    reason = unplaceable_models(config).get(model.id)
    if reason is not None:
        logger.error("Model %s cannot be placed on the current cluster: %s", model.id, reason)
    if not ray.is_initialized():
        return
    totals: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for resource, amount in node["Resources"].items():
                totals[resource] = totals.get(resource, 0.0) + amount
    if model.id in models_without_surge_room(config, totals):
        logger.warning(
            "Model %s: the cluster has no room for a rolling update's extra replica next to the "
            "running ones. An update of this model waits (the old replicas keep serving) until a "
            "node with room joins; set replicas.max_surge_percent: 0 to stop first instead.",
            model.id,
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
