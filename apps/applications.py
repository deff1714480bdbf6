"""The Serve applications a gateway is deployed as, and the one `AppConfig` they make together.

Serve hashes each application's `args` on its own, and restarts every replica of an application
whose `args` changed (Ray 2.60, `get_app_code_version`). So a config file splits the gateway
where restarts are cheap or dear:

    llm            (`build_gateway`)   the HTTP ingress and the rate limiter: `ingress` replica
                                       options. An edit rolls the ingress; rarely needed.
    llm-settings   (`build_settings`)  everything live: `auth`, the ingress's request settings,
                                       per model `limits`, `admission`, `system_prompts`,
                                       `routing`, and its replica count or autoscaling bounds
                                       (`replicas.num_replicas`, `replicas.autoscaling`). An
                                       edit restarts only this application's one small replica;
                                       every ingress replica reads the new settings within about
                                       a second (`SETTINGS_POLL_S`) and swaps them in whole
                                       (`apps.live`); the models' autoscaling policy reads the
                                       new sizing as fast (`apps.engine.replica_policy`).
    model-<id>     (`build_model`)     one per model: `id`, `path`, `engine`, `parallelism`,
                                       `warmup`, and the rest of `replicas`. An edit rolls that
                                       model's replicas.

The applications are told apart by their import path (`apps.builder:...`); their names are
fixed, because the ingress and the model replicas find each other by them. Settings for a model
no application serves are ignored with a warning: Serve deletes an application left out of the
file even when another application's build fails. Every builder validates the whole config its
application makes with the others (read from Serve's controller, which holds the submitted file
before any build starts): an invalid edit fails that application's build, so Serve keeps running
what it had and `serve status` names the field. The ingress validates the same whole before it
swaps anything in.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import ray

logger = logging.getLogger("ray.serve")

GATEWAY_IMPORT_PATH = "apps.builder:build_gateway"
SETTINGS_IMPORT_PATH = "apps.builder:build_settings"
MODEL_IMPORT_PATH = "apps.builder:build_model"
# The application names the split of `split_args` gives (the committed configs use them too).
GATEWAY_APP = "llm"
SETTINGS_APP = "llm-settings"
LIMITER_DEPLOYMENT = "rate-limiter"
# Which fields each application's `args` hold.
GATEWAY_INGRESS_FIELDS = frozenset(
    {"num_replicas", "num_cpus", "max_ongoing_requests", "drain_timeout_s"}
)
MODEL_APP_FIELDS = frozenset({"id", "path", "task", "engine", "parallelism", "replicas", "warmup", "lora"})
MODEL_SETTINGS_FIELDS = frozenset(
    {"id", "limits", "admission", "system_prompts", "routing", "replicas", "lora"}
)
# A model's `replicas` fields that are live settings (`apps.engine.replica_policy`); the others stay
# with its application.
LIVE_REPLICA_FIELDS = frozenset({"num_replicas", "autoscaling"})
# A model's sections split between the two: their live fields in the settings application, the
# rest in the model's (the LoRA adapters served are live; the engine's LoRA limits are not).
SPLIT_SECTIONS = {"replicas": LIVE_REPLICA_FIELDS, "lora": frozenset({"adapters"})}
SETTINGS_FIELDS = frozenset({"ingress", "auth", "models"})
# How often an ingress replica reads the deployed settings.
SETTINGS_POLL_S = 1.0
CONTROLLER_TIMEOUT_S = 5.0

# {application name: (import path, args)}, as Serve's controller holds them.
DeployedArgs = Mapping[str, tuple[str, Mapping[str, Any]]]


class PartError(ValueError):
    """The applications do not make one config: a field in the wrong application, a misnamed or
    missing application, a model's settings listed twice."""


def deployment_name(model_id: str) -> str:
    """Serve deployment (and application) name for a model id (ids may hold '/' or ':')."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model_id)


def split_args(args: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Serve `applications:` entries for a whole config's `args` (an `AppConfig`'s fields)."""
    ingress = dict(args.get("ingress") or {})
    gateway_args = {"ingress": {k: v for k, v in ingress.items() if k in GATEWAY_INGRESS_FIELDS}}
    settings_args: dict[str, Any] = {}
    live_ingress = {k: v for k, v in ingress.items() if k not in GATEWAY_INGRESS_FIELDS}
    if live_ingress:
        settings_args["ingress"] = live_ingress
    if "auth" in args:
        settings_args["auth"] = copy.deepcopy(args["auth"])
    applications = [
        {
            "name": GATEWAY_APP,
            "route_prefix": "/",
            "import_path": GATEWAY_IMPORT_PATH,
            "args": gateway_args,
        },
        {
            "name": SETTINGS_APP,
            "route_prefix": None,
            "import_path": SETTINGS_IMPORT_PATH,
            "args": settings_args,
        },
    ]
    for model in args.get("models") or []:
        live = {
            k: copy.deepcopy(v) for k, v in model.items() if k in MODEL_SETTINGS_FIELDS - set(SPLIT_SECTIONS)
        }
        model_args = {
            k: copy.deepcopy(v) for k, v in model.items() if k not in MODEL_SETTINGS_FIELDS - {"id"}
        }
        for section, live_fields in SPLIT_SECTIONS.items():
            if model.get(section) is None:  # absent, or null: the defaults (LoRA off)
                continue
            fields = dict(model[section] or {})
            live_part = {k: copy.deepcopy(v) for k, v in fields.items() if k in live_fields}
            rolled_part = {k: copy.deepcopy(v) for k, v in fields.items() if k not in live_fields}
            if live_part:
                live[section] = live_part
            # A section present in the model's application even when all its fields are live:
            # its presence shapes the engine (LoRA on).
            if rolled_part or section != "replicas":
                model_args[section] = rolled_part
        if len(live) > 1:  # more than its id
            settings_args.setdefault("models", []).append(live)
        applications.append(
            {
                "name": deployment_name(str(model.get("id"))),
                "route_prefix": None,
                "import_path": MODEL_IMPORT_PATH,
                "args": model_args,
            }
        )
    return applications


def compose_args(deployed: DeployedArgs) -> dict[str, Any]:
    """One `AppConfig`'s fields from the gateway's applications (others are ignored). Raises
    `PartError` for a field in the wrong application, a missing gateway or settings
    application, or settings for a model no application serves."""
    by_kind: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for name, (import_path, args) in deployed.items():
        by_kind.setdefault(import_path, []).append((name, args or {}))
    for import_path in (GATEWAY_IMPORT_PATH, SETTINGS_IMPORT_PATH):
        found = by_kind.get(import_path, [])
        if len(found) != 1:
            names = [name for name, _ in found]
            raise PartError(
                f"Exactly one application must use {import_path}; found {len(found)} {names}."
            )
    ((gateway_name, gateway),) = by_kind[GATEWAY_IMPORT_PATH]
    ((settings_name, settings),) = by_kind[SETTINGS_IMPORT_PATH]
    # Model replicas find the rate limiter by the gateway's name; operators, the settings by theirs.
    for name, expected in ((gateway_name, GATEWAY_APP), (settings_name, SETTINGS_APP)):
        if name != expected:
            raise PartError(f"{name}: this application must be named {expected!r}.")
    _only(gateway_name, gateway, {"ingress"})
    _only(f"{gateway_name}: ingress", gateway.get("ingress") or {}, GATEWAY_INGRESS_FIELDS)
    _only(settings_name, settings, SETTINGS_FIELDS)
    live_ingress = settings.get("ingress") or {}
    _only(f"{settings_name}: ingress", live_ingress, set(live_ingress) - GATEWAY_INGRESS_FIELDS)

    models = []
    for name, model in by_kind.get(MODEL_IMPORT_PATH, []):
        _only(name, model, MODEL_APP_FIELDS)
        for section in SPLIT_SECTIONS:
            _only_section(f"{name}: {section}", section, model.get(section), live=False)
        expected = deployment_name(str(model.get("id")))
        if name != expected:
            # The ingress finds a model's replicas by this name.
            raise PartError(
                f"{name}: the application serving model {model.get('id')!r} must be named {expected!r}."
            )
        models.append(copy.deepcopy(dict(model)))
    by_id = {model.get("id"): model for model in models}
    seen: set[Any] = set()
    for index, live in enumerate(settings.get("models") or []):
        if not isinstance(live, Mapping):
            raise PartError(f"{settings_name}: models.{index} must be a mapping.")
        _only(f"{settings_name}: models.{index}", live, MODEL_SETTINGS_FIELDS)
        for section in SPLIT_SECTIONS:
            where = f"{settings_name}: models.{index}.{section}"
            _only_section(where, section, live.get(section), live=True)
        if live.get("id") in seen:
            raise PartError(f"{settings_name}: models.{index}: model {live.get('id')!r} is listed twice.")
        seen.add(live.get("id"))
        model = by_id.get(live.get("id"))
        if model is None:
            # Serve deletes an application left out of the file whatever else the file holds, so
            # the settings of a model just removed must not hold the rest back.
            logger.warning(
                "%s: models.%d: no application serves model %r; its settings are ignored.",
                settings_name,
                index,
                live.get("id"),
            )
            continue
        model.update({k: copy.deepcopy(v) for k, v in live.items() if k != "id" and k not in SPLIT_SECTIONS})
        if live.get("lora") and "lora" not in model:
            raise PartError(
                f"{settings_name}: models.{index}.lora: model {live.get('id')!r} serves no LoRA "
                f"adapters: switch LoRA on with `lora:` in its application ({deployment_name(str(live.get('id')))}) first."
            )
        for section in SPLIT_SECTIONS:
            if live.get(section):
                model[section] = dict(model.get(section) or {}) | copy.deepcopy(dict(live[section]))
    composed: dict[str, Any] = {
        "models": models,
        "ingress": dict(gateway.get("ingress") or {}) | dict(live_ingress),
    }
    if "auth" in settings:
        composed["auth"] = copy.deepcopy(settings["auth"])
    return composed


def compose_file(serve_config: Mapping[str, Any]) -> dict[str, Any]:
    """`compose_args` of a Serve config file's content (its `applications:`)."""
    return compose_args(_by_name(serve_config["applications"]))


def _by_name(applications: list[Mapping[str, Any]]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """Serve `applications:` entries as the controller holds them: {name: (import path, args)}."""
    return {app["name"]: (app["import_path"], app.get("args") or {}) for app in applications}


def _only(where: str, args: Mapping[str, Any], allowed: set[str] | frozenset[str]) -> None:
    misplaced = sorted(set(args) - set(allowed))
    if misplaced:
        raise PartError(
            f"{where}: {misplaced} do not belong here; this application's args take "
            f"{sorted(allowed)} (apps.applications says which application holds which field)."
        )


def _only_section(where: str, section: str, fields: Any, live: bool) -> None:
    """A model's split section (`SPLIT_SECTIONS`): its live fields in the settings application
    (`live`), the others in the model's. Its values are the schema's to check."""
    if not isinstance(fields, Mapping):
        return
    live_fields = SPLIT_SECTIONS[section]
    keys = set(fields)
    misplaced = sorted(keys - live_fields if live else keys & live_fields)
    if misplaced:
        raise PartError(
            f"{where}: {misplaced} do not belong here; {section}.{sorted(live_fields)} are "
            f"live settings, in {SETTINGS_APP}'s models, and the other {section} fields stay in the "
            "model's application."
        )


_controller_handle: Any = None


def _controller() -> Any:
    """Serve's controller actor, looked up once per process (the lookup blocks on the GCS)."""
    global _controller_handle
    if _controller_handle is None:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        _controller_handle = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return _controller_handle


def _forget_controller() -> None:
    """After a failed call: the controller may have been restarted as a new actor."""
    global _controller_handle
    _controller_handle = None


def _as_deployed(configs: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    return {name: (config.import_path, config.args or {}) for name, config in configs.items()}


def deployed_args() -> dict[str, tuple[str, Mapping[str, Any]]]:
    """Every application's import path and `args` as last submitted to Serve (`serve deploy`):
    the controller stores a config file before it builds any of its applications."""
    try:
        configs = ray.get(_controller().get_app_configs.remote(), timeout=CONTROLLER_TIMEOUT_S)
    except Exception:
        _forget_controller()
        raise
    return _as_deployed(configs)


class AppStatus(NamedTuple):
    """An application's status as `serve status` shows it (RUNNING, DEPLOYING, DEPLOY_FAILED, ...),
    and whether it has deployments (a failed build of a new application has none)."""

    status: str
    has_deployments: bool = True


def replica_count(model_id: str) -> int | None:
    """How many replicas `model_id`'s deployment has now (Serve's replica actors, starting and
    stopping ones included); None when Ray is not connected. Not from Serve's deployment
    details: while an application builds, they list none of its deployments."""
    if not ray.is_initialized():
        return None
    from ray.serve._private.common import REPLICA_ID_FULL_ID_STR_PREFIX

    name = deployment_name(model_id)
    prefix = f"{REPLICA_ID_FULL_ID_STR_PREFIX}{name}#{name}#"
    try:
        actors = ray.util.list_named_actors(all_namespaces=True)
    except Exception:
        return None
    return sum(1 for actor in actors if str(actor.get("name", "")).startswith(prefix))


async def app_statuses_async() -> dict[str, AppStatus]:
    """Each application's `AppStatus`."""
    from ray.serve._private.application_state import StatusOverview
    from ray.serve.generated.serve_pb2 import StatusOverview as StatusOverviewProto

    raw = await _ask_controller("list_serve_statuses")
    overviews = [StatusOverview.from_proto(StatusOverviewProto.FromString(item)) for item in raw]
    return {
        overview.name: AppStatus(str(overview.app_status.status.value), bool(overview.deployment_statuses))
        for overview in overviews
    }


def serving_args(
    deployed: DeployedArgs,
    statuses: Mapping[str, AppStatus],
    built: Mapping[str, tuple[str, Mapping[str, Any]]],
) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """The applications as Serve serves them. `deployed` holds what was last submitted, even for
    an application whose build failed. Serve keeps running what a failed application ran before
    if it has deployments: `built[name]` (its args when it last ran them), or, not known, what was
    submitted; a failed application without deployments (a new one) serves nothing."""
    serving = {}
    for name, app in deployed.items():
        status = statuses.get(name)
        if status is None or status.status != "DEPLOY_FAILED":
            serving[name] = app
        elif status.has_deployments:
            serving[name] = built.get(name, app)
    return serving


def applications_of(args: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    """`split_args` as the controller holds applications: {name: (import path, args)}."""
    return _by_name(split_args(args))


async def deployed_args_async() -> dict[str, tuple[str, Mapping[str, Any]]]:
    """`deployed_args`, without blocking the event loop."""
    return _as_deployed(await _ask_controller("get_app_configs"))


async def _ask_controller(method: str) -> Any:
    """The result of one of Serve's controller's methods, without blocking the event loop."""
    try:
        controller = _controller() if _controller_handle is not None else await asyncio.to_thread(_controller)
        return await asyncio.wait_for(getattr(controller, method).remote(), CONTROLLER_TIMEOUT_S)
    except Exception:
        _forget_controller()
        raise
