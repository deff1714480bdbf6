"""How a config is split into Serve applications and put back together (`apps.applications`),
and what a live settings change keeps (`apps.live`, the admission gate, the rate limiter)."""

from __future__ import annotations

import asyncio
import copy

import pytest
import yaml

from apps.admission.capacity import EngineCapacity
from apps.admission.gate import ModelGate, Slot
from apps.admission.rate_limits import KeyLimits
from apps.applications import (
    GATEWAY_IMPORT_PATH,
    MODEL_IMPORT_PATH,
    SETTINGS_IMPORT_PATH,
    AppStatus,
    PartError,
    compose_args,
    serving_args,
    split_args,
)
from apps.config import ApiKey, load_config
from apps.live import SettingsWatch, changed_fields, live_settings, starting_settings
from tests.conftest import CONFIGS, app_args

WHOLE = {
    "ingress": {"num_cpus": 0.1, "max_body_bytes": 4096},
    "auth": {"enabled": True, "keys": [{"name": "a", "sha256": "0" * 64, "requests_per_minute": 5}]},
    "models": [
        {
            "id": "m1",
            "path": "/x",
            "engine": {"max_num_seqs": 8},
            "limits": {"max_tokens_cap": 300},
            "replicas": {"num_replicas": 2, "max_surge_percent": 0},
        },
        {"id": "org/m2", "path": "/y", "admission": {"queue_timeout_s": 3}},
    ],
}


def deployed(applications: list[dict]) -> dict:
    return {app["name"]: (app["import_path"], app["args"]) for app in applications}


def test_split_puts_live_settings_apart_from_engines_and_composes_back():
    applications = split_args(WHOLE)
    by_name = {app["name"]: app for app in applications}
    assert by_name["llm"]["args"] == {"ingress": {"num_cpus": 0.1}}
    assert by_name["llm"]["route_prefix"] == "/"
    settings = by_name["llm-settings"]["args"]
    assert settings["ingress"] == {"max_body_bytes": 4096}
    assert settings["models"] == [
        {"id": "m1", "limits": {"max_tokens_cap": 300}, "replicas": {"num_replicas": 2}},
        {"id": "org/m2", "admission": {"queue_timeout_s": 3}},
    ]
    assert by_name["model-m1"]["args"] == {
        "id": "m1",
        "path": "/x",
        "engine": {"max_num_seqs": 8},
        "replicas": {"max_surge_percent": 0},  # the replica count is live; a surge setting rolls
    }
    assert by_name["model-org_m2"]["args"] == {"id": "org/m2", "path": "/y"}
    assert compose_args(deployed(applications)) == WHOLE


def test_lora_adapters_are_live_and_the_engines_lora_limits_are_not():
    whole = copy.deepcopy(WHOLE)
    adapters = [{"name": "m1-sql", "path": "/a"}]
    whole["models"][0]["lora"] = {"adapters": adapters, "max_lora_rank": 8}
    by_name = {app["name"]: app["args"] for app in split_args(whole)}
    assert by_name["model-m1"]["lora"] == {"max_lora_rank": 8}
    assert by_name["llm-settings"]["models"][0]["lora"] == {"adapters": adapters}
    assert compose_args(deployed(split_args(whole))) == whole
    # Adapters only: the model's application still says LoRA is on (it shapes the engine).
    whole["models"][0]["lora"] = {"adapters": adapters}
    assert {app["name"]: app["args"] for app in split_args(whole)}["model-m1"]["lora"] == {}
    edited = copy.deepcopy(whole)
    edited["models"][0]["lora"]["adapters"].append({"name": "m1-chat", "path": "/b"})
    before, after = deployed(split_args(whole)), deployed(split_args(edited))
    assert sorted(name for name in before if before[name] != after[name]) == ["llm-settings"]
    # `lora: null` is LoRA off, as if absent.
    whole["models"][1]["lora"] = None
    assert "lora" not in {app["name"]: app["args"] for app in split_args(whole)}["model-org_m2"]
    del whole["models"][1]["lora"]
    # Adapters for a model whose engine has no LoRA are refused, naming where to switch it on.
    applications = deployed(split_args(whole))
    import_path, model_args = applications["model-m1"]
    applications["model-m1"] = (import_path, {k: v for k, v in model_args.items() if k != "lora"})
    with pytest.raises(PartError, match="switch LoRA on with `lora:` in its application"):
        compose_args(applications)


def test_a_limits_or_replica_count_edit_changes_only_the_settings_application():
    edited = copy.deepcopy(WHOLE)
    edited["models"][0]["limits"]["max_tokens_cap"] = 290
    edited["auth"]["keys"].append({"name": "b", "sha256": "1" * 64})
    edited["models"][0]["replicas"]["num_replicas"] = 1
    edited["models"][1]["replicas"] = {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}
    before, after = deployed(split_args(WHOLE)), deployed(split_args(edited))
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == ["llm-settings"], "any other application's args changing would restart it"


def test_an_engine_edit_changes_only_that_models_application():
    edited = copy.deepcopy(WHOLE)
    edited["models"][1]["engine"] = {"max_num_seqs": 4}
    before, after = deployed(split_args(WHOLE)), deployed(split_args(edited))
    assert sorted(name for name in before if before[name] != after[name]) == ["model-org_m2"]


@pytest.mark.parametrize(
    ("where", "field", "message"),
    [
        ("model-m1", "limits", r"model-m1: \['limits'\] do not belong here"),
        ("llm-settings", "engine", r"llm-settings: models.0: \['engine'\] do not belong here"),
        ("llm", "auth", r"llm: \['auth'\] do not belong here"),
        ("model-m1", "replicas.num_replicas", r"model-m1: replicas: \['num_replicas'\] do not belong here"),
        (
            "llm-settings",
            "replicas.max_surge_percent",
            r"llm-settings: models.0.replicas: \['max_surge_percent'\] do not belong here",
        ),
        ("model-m1", "lora.adapters", r"model-m1: lora: \['adapters'\] do not belong here"),
        ("llm-settings", "lora.max_loras", r"llm-settings: models.0.lora: \['max_loras'\] do not belong here"),
    ],
)
def test_a_field_in_the_wrong_application_is_named(where, field, message):
    applications = deployed(split_args(WHOLE))
    import_path, args = applications[where]
    args = copy.deepcopy(args)
    section = args["models"][0] if where == "llm-settings" else args
    if "." in field:  # a field of a model's `replicas`
        parent, field = field.split(".")
        section = section.setdefault(parent, {})
    section[field] = 1
    applications[where] = (import_path, args)
    with pytest.raises(PartError, match=message):
        compose_args(applications)


def test_misnamed_applications_and_twice_listed_settings_are_refused():
    applications = deployed(split_args(WHOLE))
    applications["other-name"] = applications.pop("model-m1")
    with pytest.raises(PartError, match=r"must be named 'model-m1'"):
        compose_args(applications)
    applications = deployed(split_args(WHOLE))
    applications["gateway"] = applications.pop("llm")
    with pytest.raises(PartError, match=r"gateway: this application must be named 'llm'"):
        compose_args(applications)
    applications = deployed(split_args(WHOLE))
    del applications["llm-settings"]
    with pytest.raises(PartError, match=SETTINGS_IMPORT_PATH):
        compose_args(applications)
    applications = deployed(split_args(WHOLE))
    settings = copy.deepcopy(applications["llm-settings"][1])
    settings["models"].append({"id": "m1", "limits": {"default_max_tokens": 10}})
    applications["llm-settings"] = (SETTINGS_IMPORT_PATH, settings)
    with pytest.raises(PartError, match=r"models.2: model 'm1' is listed twice"):
        compose_args(applications)


def test_settings_of_a_model_just_removed_are_ignored_not_refused(caplog):
    """Serve deletes an application left out of the file whatever else happens to the edit."""
    applications = deployed(split_args(WHOLE))
    del applications["model-org_m2"]
    composed = compose_args(applications)
    assert [model["id"] for model in composed["models"]] == ["m1"]
    assert "no application serves model 'org/m2'; its settings are ignored" in caplog.text


@pytest.mark.parametrize("config_file", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_committed_configs_are_split_as_split_args_does(config_file):
    serve_config = yaml.safe_load((CONFIGS / config_file).read_text())
    split = split_args(app_args(config_file))
    assert [(a["name"], a["import_path"]) for a in serve_config["applications"]] == [
        (a["name"], a["import_path"]) for a in split
    ]
    kinds = {a["import_path"] for a in split}
    assert kinds == {GATEWAY_IMPORT_PATH, SETTINGS_IMPORT_PATH, MODEL_IMPORT_PATH}


class FakeController:
    """What the ingress reads from Serve's controller, and what it keeps in Ray's KV store."""

    def __init__(self, monkeypatch, applications: dict) -> None:
        self.applications = applications
        self.statuses: dict[str, AppStatus] = {}
        self.published: list[dict] = []

        async def read() -> dict:
            return copy.deepcopy(self.applications)

        async def statuses() -> dict:
            return {name: self.statuses.get(name, AppStatus("RUNNING")) for name in self.applications}

        async def applied() -> dict | None:
            return self.published[-1] if self.published else None

        monkeypatch.setattr("apps.live.deployed_args_async", read)
        monkeypatch.setattr("apps.live.app_statuses_async", statuses)
        monkeypatch.setattr("apps.live._applied_args", applied)
        monkeypatch.setattr("apps.live.publish_applied", self.published.append)


def test_settings_watch_applies_a_valid_edit_once_and_refuses_an_invalid_one(monkeypatch):
    applications = deployed(split_args(WHOLE))
    current = load_config(compose_args(applications), check_model_files=False)
    applied = []
    watch = SettingsWatch(current, applied.append)
    FakeController(monkeypatch, applications)
    assert not asyncio.run(watch.poll()), "unchanged settings are not applied again"

    settings = copy.deepcopy(applications["llm-settings"][1])
    settings["models"][0]["limits"]["max_tokens_cap"] = 280
    applications["llm-settings"] = (SETTINGS_IMPORT_PATH, settings)
    assert asyncio.run(watch.poll())
    assert applied[-1].models[0].limits.max_tokens_cap == 280

    invalid = copy.deepcopy(settings)
    invalid["models"][0]["limits"]["max_tokens_cap"] = -1
    applications["llm-settings"] = (SETTINGS_IMPORT_PATH, invalid)
    assert not asyncio.run(watch.poll()), "an invalid edit changes nothing"
    assert len(applied) == 1


def test_an_edit_whose_build_fails_is_taken_back_and_a_new_model_that_fails_is_not_served(monkeypatch):
    """Only a model's builder reads its checkpoint: a bad `path` passes the ingress's checks."""
    applications = deployed(split_args(WHOLE))
    current = load_config(compose_args(applications), check_model_files=False)
    applied = []
    watch = SettingsWatch(current, applied.append)
    serve = FakeController(monkeypatch, applications)
    assert not asyncio.run(watch.poll())
    assert [args["models"][0]["limits"]["max_tokens_cap"] for args in serve.published] == [300]

    edited = copy.deepcopy(WHOLE)
    edited["models"][0]["limits"]["max_tokens_cap"] = 280  # fine
    edited["models"][1]["engine"] = {"max_num_seqs": 4}  # an engine change whose build fails
    edited["models"].append({"id": "m3", "path": "/missing", "limits": {"max_tokens_cap": 400}})
    serve.applications = deployed(split_args(edited))
    building = AppStatus("DEPLOYING")
    serve.statuses = {"llm-settings": building, "model-org_m2": building, "model-m3": AppStatus("DEPLOYING", False)}
    assert asyncio.run(watch.poll()), "submitted: applied at once, as the builds run"
    assert [m.id for m in applied[-1].models] == ["m1", "org/m2", "m3"]
    assert len(serve.published) == 1, "not kept for later replicas while builds run"

    serve.statuses = {
        "llm-settings": AppStatus("RUNNING"),
        "model-org_m2": AppStatus("DEPLOY_FAILED", has_deployments=True),  # its old replicas run
        "model-m3": AppStatus("DEPLOY_FAILED", has_deployments=False),
    }
    assert asyncio.run(watch.poll()), "the failed builds are taken back"
    m1, m2 = applied[-1].models
    assert (m1.id, m1.limits.max_tokens_cap) == ("m1", 280), "what built is kept"
    assert (m2.id, m2.engine.max_num_seqs) == ("org/m2", 64), "org/m2 still runs its previous engine"
    kept = load_config(serve.published[-1], check_model_files=False)
    assert [m.id for m in kept.models] == ["m1", "org/m2"], "kept for later replicas once all run it"

    starting = asyncio.run(starting_settings(current))
    assert [m.id for m in starting.models] == ["m1", "org/m2"], "a replica that starts now agrees"
    assert starting.models[0].limits.max_tokens_cap == 280 and starting.models[1].engine.max_num_seqs == 64


ANONYMOUS_SLOT = Slot()  # a slot of the default key: these gates are acquired without one


def gate(max_in_flight: int, max_queued: int = 10) -> ModelGate:
    return ModelGate(
        "m",
        max_in_flight=max_in_flight,
        max_queued=max_queued,
        queue_timeout_s=5.0,
        shed_depth={"high": max_queued, "normal": max_queued, "low": max_queued},
    )


def test_a_gate_keeps_its_requests_across_new_bounds():
    async def scenario() -> tuple[int, int, int]:
        live = gate(1)
        await live.acquire("normal")
        waiters = [asyncio.ensure_future(live.acquire("normal")) for _ in range(3)]
        await asyncio.sleep(0.01)
        live.adopt_bounds(gate(3))  # raised: two waiters get in at once
        await asyncio.sleep(0.01)
        admitted = sum(w.done() for w in waiters)
        live.adopt_bounds(gate(1))  # lowered: releases do not hand slots on above the bound
        live.release(ANONYMOUS_SLOT)
        live.release(ANONYMOUS_SLOT)
        await asyncio.sleep(0.01)
        still_waiting = sum(not w.done() for w in waiters)
        live.release(ANONYMOUS_SLOT)  # now at the bound: the next release hands on
        await asyncio.sleep(0.01)
        return admitted, still_waiting, live.in_flight

    admitted, still_waiting, in_flight = asyncio.run(scenario())
    assert admitted == 2
    assert still_waiting == 1
    assert in_flight == 1


def test_a_key_keeps_its_bucket_when_its_limits_change_and_new_keys_arrive():
    now = [0.0]
    limits = KeyLimits([], lease_s=60, clock=lambda: now[0])
    alice = ApiKey(name="alice", sha256="0" * 64, requests_per_minute=3)
    for _ in range(3):
        assert limits.reserve("alice", 1, limits=alice).admitted
    refused = limits.reserve("alice", 1, limits=alice)
    assert not refused.admitted, "a fourth request in the minute"
    bob = ApiKey(name="bob", sha256="1" * 64, requests_per_minute=1)
    assert limits.reserve("bob", 1, limits=bob).admitted, "a key added live"
    assert not limits.reserve("alice", 1, limits=alice).admitted, "adding bob gave alice nothing"
    raised = alice.model_copy(update={"requests_per_minute": 6})
    decision = limits.reserve("alice", 1, limits=raised)
    assert not decision.admitted and decision.requests.limit == 6, "a raised limit keeps the level"
    now[0] = 10.0  # one request's worth refilled at 6 per minute
    assert limits.reserve("alice", 1, limits=raised).admitted


def test_leases_of_different_lengths_expire_in_time_order():
    now = [0.0]
    key = ApiKey(name="k", sha256="0" * 64, max_concurrent_requests=2)
    limits = KeyLimits([], lease_s=60, clock=lambda: now[0])
    assert limits.reserve("k", 1, "long", limits=key, lease_s=100).admitted
    assert limits.reserve("k", 1, "short", limits=key, lease_s=10).admitted
    assert not limits.reserve("k", 1, limits=key).admitted
    now[0] = 11.0  # the short lease expired behind the long one: its slot is free again
    assert limits.reserve("k", 1, "third", limits=key, lease_s=10).admitted
    assert limits.in_flight("k") == 2


def test_settled_reservations_leave_no_pile_of_expiries():
    now = [0.0]
    key = ApiKey(name="k", sha256="0" * 64, max_concurrent_requests=5)
    limits = KeyLimits([], lease_s=600, clock=lambda: now[0])
    for i in range(5000):
        now[0] = i * 0.01
        limits.settle(limits.reserve("k", 1, limits=key).reservation, 1)
    held = limits.reserve("k", 1, "held", limits=key)  # one still open
    assert held.admitted
    assert len(limits._expiries) < 2 * 1 + 1024 + 2, "settled leases are compacted away"
    now[0] = 1000.0  # past every lease: the open one is charged, the settled ones change nothing
    assert limits.reserve("k", 1, limits=key).admitted
    assert limits.in_flight("k") == 1


def test_the_log_names_what_a_change_changed():
    before = load_config(WHOLE, check_model_files=False)
    edited = copy.deepcopy(WHOLE)
    edited["models"][0]["limits"]["max_tokens_cap"] = 290
    edited["auth"]["keys"][0]["requests_per_minute"] = 6
    del edited["models"][1]
    edited["models"].append({"id": "m3", "path": "/z"})
    after = load_config(edited, check_model_files=False)
    assert changed_fields(before, after) == [
        "auth",
        "models[m1].limits",
        "models[m3] added",
        "models[org/m2] removed",
    ]


def test_a_new_snapshot_keeps_each_models_gate_and_handle_and_takes_the_new_bounds():
    before = load_config(WHOLE, check_model_files=False)
    first = live_settings(before, None, lambda model_id, kind: None, stream_for=lambda model_id: object())
    edited = copy.deepcopy(WHOLE)
    edited["models"][0]["admission"] = {"max_in_flight": 3}
    del edited["models"][1]
    edited["models"].append({"id": "m3", "path": "/z"})
    after = load_config(edited, check_model_files=False)
    second = live_settings(after, first, lambda model_id, kind: None, stream_for=lambda model_id: object())
    kept, old = second.routes["m1"], first.routes["m1"]
    assert kept.gate is old.gate and kept.stream is old.stream and kept.replicas is old.replicas
    assert kept.gate.max_in_flight == 3 and kept.config.admission.max_in_flight == 3
    assert second.prefix_watches["m1"] is first.prefix_watches["m1"]
    assert sorted(second.routes) == ["m1", "m3"], "org/m2 removed, m3 added"
    assert first.routes["m1"].config.admission.max_in_flight is None, "the old snapshot is unchanged"


def test_a_published_kv_capacity_resizes_the_kept_gate_of_a_model_that_asks_for_it():
    def snapshot(config: dict, previous, capacities=None):
        loaded = load_config(config, check_model_files=False)
        stream_for = lambda model_id: object()  # noqa: E731
        return live_settings(loaded, previous, lambda model_id, kind: None, stream_for, capacities)

    sized = copy.deepcopy(WHOLE)
    sized["models"][0]["admission"] = {"typical_request_tokens": 1000}
    first = snapshot(sized, None)
    unsized_bound = first.routes["m1"].gate.max_in_flight
    capacities = {"m1": EngineCapacity(4_000, 8), "org/m2": EngineCapacity(4_000, 8)}
    second = snapshot(sized, first, capacities)
    assert second.routes["m1"].gate is first.routes["m1"].gate
    # 4 requests of 1000 tokens fit of the 8 m1 batches: 5 per replica (x 1.25), 2 replicas
    assert second.routes["m1"].gate.max_in_flight == 10 < unsized_bound == 20
    assert second.routes["org/m2"].gate.max_in_flight == first.routes["org/m2"].gate.max_in_flight, (
        "a model without typical_request_tokens keeps its bound"
    )


@pytest.mark.parametrize(
    ("deployed_valid", "applied_valid", "expected_cap"),
    [(True, True, 280), (False, True, 270), (False, False, 300)],
    ids=["deployed", "last-applied", "built"],
)
def test_a_starting_ingress_takes_the_deployed_then_the_last_applied_then_the_built_settings(
    monkeypatch, deployed_valid, applied_valid, expected_cap
):
    """A key revoked live must stay revoked when a replica restarts while an edit is refused."""

    def whole(cap: int) -> dict:
        args = copy.deepcopy(WHOLE)
        args["models"][0]["limits"]["max_tokens_cap"] = cap
        return args

    async def deployed() -> dict:
        return whole(280 if deployed_valid else -1)

    async def applied() -> dict | None:
        return whole(270) if applied_valid else None

    monkeypatch.setattr("apps.live._deployed_args", deployed)
    monkeypatch.setattr("apps.live._applied_args", applied)
    built = load_config(whole(300), check_model_files=False)
    config = asyncio.run(starting_settings(built))
    assert config.models[0].limits.max_tokens_cap == expected_cap


def test_a_failed_application_without_deployments_serves_nothing_whatever_ran_before():
    """A model removed, then added again with a wrong path: Serve runs nothing for it."""
    before = ("apps.builder:build_model", {"id": "m3", "path": "/models/m3"})
    deployed = {"model-m3": ("apps.builder:build_model", {"id": "m3", "path": "/missing"})}
    failed_new = {"model-m3": AppStatus("DEPLOY_FAILED", has_deployments=False)}
    assert serving_args(deployed, failed_new, {"model-m3": before}) == {}
    failed_roll = {"model-m3": AppStatus("DEPLOY_FAILED", has_deployments=True)}
    assert serving_args(deployed, failed_roll, {"model-m3": before}) == {"model-m3": before}
    assert serving_args(deployed, failed_roll, {}) == deployed, "its previous args unknown: as submitted"
