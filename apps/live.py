"""The ingress's live settings: one validated snapshot, swapped whole.

Each ingress replica reads the applications Serve holds every `SETTINGS_POLL_S`
(`apps.applications`); when their `args` changed, it validates the whole config again and, only
if it is valid, builds a new `LiveSettings` and swaps it in with one assignment. A request reads
the snapshot once, at its start, and keeps it to its end. What carries state across a swap is
kept: a model's admission gate (its requests in flight and waiting; it takes the new bounds), its
replica watch, its volatile-prefix watch and its handle. Rate-limit state lives in the limiter,
which gets each key's limits with every reservation.

A replica that starts (a new one, or one Serve restarted) serves with the deployed settings if
they are valid, else with the last settings every application ran (an ingress replica keeps them
in Ray's internal KV store), and only failing both with those its application was built with: a
key revoked live stays revoked after a restart, even while a later edit is being refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle

from apps.admission.capacity import EngineCapacity
from apps.admission.gate import ModelGate, ModelRoute, gate_for
from apps.applications import (
    SETTINGS_POLL_S,
    AppStatus,
    PartError,
    app_statuses_async,
    applications_of,
    compose_args,
    deployed_args_async,
    deployment_name,
    serving_args,
)
from apps.config import AppConfig, ConfigError, LoraAdapter, load_config
from apps.edge.auth import KeyTable
from apps.shaping.prefixes import VolatilePrefixWatch

logger = logging.getLogger("ray.serve")
# Where the last applied settings are kept for replicas that start later.
APPLIED_KEY = b"applied-settings"
APPLIED_NAMESPACE = "llm-gateway"
# Statuses of an application that runs the args it was last submitted with.
BUILT = frozenset({"RUNNING", "UNHEALTHY"})


@dataclass(frozen=True)
class LiveSettings:
    """What the ingress serves with, from one validated config."""

    config: AppConfig
    keys: KeyTable
    routes: Mapping[str, ModelRoute]
    prefix_watches: Mapping[str, VolatilePrefixWatch]
    model_list: list[dict[str, Any]]
    # LoRA adapters by name: their base model's id, and where the adapter is.
    adapters: Mapping[str, tuple[str, LoraAdapter]]

    @property
    def served(self) -> list[str]:
        """What clients may send as `model`: the models and their adapters."""
        return [*self.routes, *self.adapters]


def model_stream(model_id: str) -> Any:
    """A streaming handle to a model's deployment. Its application may still be deploying: a
    handle needs no replica yet."""
    name = deployment_name(model_id)
    return DeploymentHandle(name, name).options(stream=True)


def live_settings(
    config: AppConfig,
    previous: LiveSettings | None,
    on_volatile_prefix: Callable[[str, str], None],
    stream_for: Callable[[str], Any] = model_stream,
    capacities: Mapping[str, EngineCapacity] | None = None,
) -> LiveSettings:
    """The snapshot for `config`, carrying over the state of every model `previous` served.
    `stream_for`: a new model's streaming handle. `capacities`: the KV capacity each model's
    engines published (`apps.admission.capacity`), which may size its gate."""
    old_routes = previous.routes if previous else {}
    old_watches = previous.prefix_watches if previous else {}
    routes, watches = {}, {}
    new_bounds: list[tuple[ModelGate, ModelGate]] = []
    for model in config.models:
        gate = gate_for(model, config.ingress.num_replicas, (capacities or {}).get(model.id))
        old = old_routes.get(model.id)
        if old is None:
            routes[model.id] = ModelRoute(model, gate, stream_for(model.id))
        else:
            new_bounds.append((old.gate, gate))
            routes[model.id] = ModelRoute(model, old.gate, old.stream, old.replicas)
        watches[model.id] = old_watches.get(model.id) or VolatilePrefixWatch(
            model.id, lambda kind, model_id=model.id: on_volatile_prefix(model_id, kind)
        )
    created = int(time.time())
    old_created = {entry["id"]: entry["created"] for entry in (previous.model_list if previous else [])}
    adapters = {adapter.name: (model.id, adapter) for model in config.models for adapter in model.lora_adapters}
    model_list = [
        {
            "id": model.id,
            "object": "model",
            "created": old_created.get(model.id, created),
            "owned_by": "gateway",
        }
        for model in config.models
    ] + [
        {
            "id": name,
            "object": "model",
            "created": old_created.get(name, created),
            "owned_by": "gateway",
            "parent": base_id,
        }
        for name, (base_id, _) in adapters.items()
    ]
    settings = LiveSettings(config, KeyTable(config.auth), routes, watches, model_list, adapters)
    for kept, bounds in new_bounds:  # last: nothing changes unless the whole snapshot was built
        kept.adopt_bounds(bounds)
    return settings


class SettingsWatch:
    """Reads the deployed applications' `args` and statuses every `SETTINGS_POLL_S` and calls
    `apply` with each new valid config. An invalid one is logged (once) and changes nothing: its
    application's build fails too, and `serve status` says why. An application whose build
    failed on what only its builder checks (a model's checkpoint, say) counts with the args Serve
    still runs it with (`serving_args`): a submitted edit applies at once, and is taken back when
    its build fails, seconds later. A config is kept for replicas that start later once Serve is
    done with every application's submission (built, or failed and taken back)."""

    def __init__(self, current: AppConfig, apply: Callable[[AppConfig], None]) -> None:
        self._current = current
        self._apply = apply
        self._last_seen: tuple[Mapping[str, Any], Mapping[str, AppStatus]] | None = None
        self._last_error: str | None = None
        self._built: dict[str, tuple[str, Mapping[str, Any]]] | None = None  # as last seen BUILT
        self._published: dict[str, Any] | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SETTINGS_POLL_S)
            try:
                await self.poll()
            except Exception as exc:  # the controller restarting, say: try again next time
                logger.warning("Could not read the deployed settings: %r", exc)

    async def poll(self) -> bool:
        """One read; True when a new config was applied."""
        deployed = await deployed_args_async()
        statuses = {name: status for name, status in (await app_statuses_async()).items() if name in deployed}
        if (deployed, statuses) == self._last_seen:  # nothing deployed since: nothing to validate or log
            return False
        self._last_seen = (deployed, statuses)
        if self._built is None:
            self._built = await settled_applications()
        self._built = {name: app for name, app in self._built.items() if name in deployed}
        self._built.update({name: app for name, app in deployed.items() if _built(statuses.get(name))})
        args = compose_or_error(serving_args(deployed, statuses, self._built))
        try:
            if isinstance(args, str):
                raise ConfigError(args)
            config = load_config(args, check_model_files=False)
        except ConfigError as exc:
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                logger.error("Deployed settings refused; still serving the previous ones. %s", exc)
            return False
        self._last_error = None
        if all(_settled(statuses.get(name)) for name in deployed) and args != self._published:
            try:
                await asyncio.to_thread(publish_applied, args)
                self._published = args
            except Exception as exc:  # only later replicas' starting point is at stake
                logger.warning("Could not keep the applied settings for later replicas: %r", exc)
        if config == self._current:
            return False
        changed = changed_fields(self._current, config)
        self._current = config
        self._apply(config)
        logger.info("Live settings applied; changed: %s.", ", ".join(changed))
        return True


def _built(status: AppStatus | None) -> bool:
    return status is not None and status.status in BUILT


def _settled(status: AppStatus | None) -> bool:
    """Serve is done with the application's last submission, built or failed."""
    return status is not None and (status.status in BUILT or status.status == "DEPLOY_FAILED")


def compose_or_error(deployed: Mapping[str, Any]) -> dict[str, Any] | str:
    """The whole config's args, or the message saying why the applications do not make one."""
    try:
        return compose_args(deployed)
    except PartError as exc:
        return f"Invalid application config: {exc}"


def changed_fields(old: AppConfig, new: AppConfig) -> list[str]:
    """Where two configs differ, as field paths (`models[ID].limits`), for the log."""
    changed = [name for name in ("ingress", "auth") if getattr(old, name) != getattr(new, name)]
    old_models = {model.id: model for model in old.models}
    for model in new.models:
        before = old_models.pop(model.id, None)
        if before is None:
            changed.append(f"models[{model.id}] added")
            continue
        changed += [
            f"models[{model.id}].{name}"
            for name in type(model).model_fields
            if getattr(before, name) != getattr(model, name)
        ]
    changed += [f"models[{model_id}] removed" for model_id in old_models]
    return changed


async def starting_settings(built: AppConfig) -> AppConfig:
    """What a starting ingress replica serves with: the deployed settings if they are valid
    (`serving_args`), else the last ones every application ran (as an ingress replica kept them),
    else `built` (its application's build-time config)."""
    sources = (("deployed", _deployed_args), ("last applied", _applied_args))
    for source, read in sources:
        try:
            args = await read()
            if isinstance(args, str):
                raise ConfigError(args)
            if args is not None:
                return load_config(args, check_model_files=False)
        except Exception as exc:
            logger.warning("Starting without the %s settings: %s", source, exc)
    return built


async def _deployed_args() -> dict[str, Any] | str:
    deployed = await deployed_args_async()
    statuses = await app_statuses_async()
    return compose_or_error(serving_args(deployed, statuses, await settled_applications()))


async def settled_applications() -> dict[str, tuple[str, Mapping[str, Any]]]:
    """The applications of the last config every application ran, as an ingress replica kept it
    (empty when none was kept or it cannot be read)."""
    try:
        args = await _applied_args()
        return applications_of(args) if args else {}
    except Exception as exc:
        logger.warning("Could not read the last applied settings: %r", exc)
        return {}


async def _applied_args() -> dict[str, Any] | None:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = await asyncio.to_thread(_internal_kv_get, APPLIED_KEY, namespace=APPLIED_NAMESPACE)
    return json.loads(raw) if raw else None


def publish_applied(args: dict[str, Any]) -> None:
    """Keep `args` (valid, run by every application) as the starting point of replicas that
    start later."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(APPLIED_KEY, json.dumps(args).encode(), overwrite=True, namespace=APPLIED_NAMESPACE)
