"""The models' autoscaling policy (`apps.engine.replica_policy`): live bounds apply at once, demand moves
the count only after its delay, and the policy takes the published sizing only when it is newer
than its deployment's build."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from apps.admission.capacity import CAPACITY_NAMESPACE, capacity_key
from apps.engine import replica_policy
from apps.engine.replica_policy import LiveSizingPolicy, decide, kv_sized

AUTOSCALED = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 10.0,
    "upscale_delay_s": 30.0,
    "downscale_delay_s": 600.0,
}


def fixed(count: int) -> dict[str, float]:
    return AUTOSCALED | {"min_replicas": count, "max_replicas": count}


@pytest.mark.parametrize(
    ("sizing", "target", "expected"),
    [
        (fixed(1), 2, 1),  # num_replicas 2 -> 1
        (fixed(3), 2, 3),  # num_replicas 2 -> 3
        (AUTOSCALED | {"min_replicas": 3}, 2, 3),  # min_replicas raised above the count
        (AUTOSCALED | {"max_replicas": 2}, 4, 2),  # max_replicas lowered below it
    ],
)
def test_a_moved_bound_applies_at_once_whatever_the_demand(sizing, target, expected):
    for ongoing in (0.0, 1000.0):
        assert decide(sizing, target, running=target, ongoing=ongoing, now=0.0, state={}) == (expected, {})


def test_demand_moves_the_count_only_after_it_held_for_the_delay():
    state: dict = {}
    count, state = decide(AUTOSCALED, 1, running=1, ongoing=25.0, now=100.0, state=state)
    assert (count, state) == (1, {"direction": "up", "since": 100.0}), "3 wanted, not yet"
    count, state = decide(AUTOSCALED, 1, running=1, ongoing=25.0, now=129.0, state=state)
    assert count == 1
    count, state = decide(AUTOSCALED, 1, running=1, ongoing=25.0, now=130.0, state=state)
    assert (count, state) == (3, {}), "ceil(25 / 10) replicas after the 30 s upscale delay"
    count, state = decide(AUTOSCALED, 3, running=3, ongoing=0.0, now=131.0, state=state)
    assert (count, state) == (3, {"direction": "down", "since": 131.0})
    count, state = decide(AUTOSCALED, 3, running=3, ongoing=0.0, now=731.0, state=state)
    assert count == 1, "down to min_replicas after the 600 s downscale delay"


def test_a_lull_inside_the_delay_restarts_the_count():
    _, state = decide(AUTOSCALED, 1, running=1, ongoing=25.0, now=0.0, state={})
    count, state = decide(AUTOSCALED, 1, running=1, ongoing=5.0, now=20.0, state=state)
    assert (count, state) == (1, {}), "demand back to target: nothing pending"
    _, state = decide(AUTOSCALED, 1, running=1, ongoing=25.0, now=25.0, state=state)
    count, _ = decide(AUTOSCALED, 1, running=1, ongoing=25.0, now=40.0, state=state)
    assert count == 1, "the delay counts from 25 s, not from 0 s"


def test_with_no_replica_running_the_target_stays():
    # Serve itself starts a first replica when requests wait for a model at zero.
    assert decide(AUTOSCALED | {"min_replicas": 0}, 0, running=0, ongoing=0.0, now=0.0, state={}) == (0, {})
    assert decide(AUTOSCALED, 2, running=0, ongoing=0.0, now=0.0, state={}) == (2, {}), "still starting"


def context(target: int, running: int, ongoing: float, config: Any = None) -> SimpleNamespace:
    return SimpleNamespace(
        target_num_replicas=target,
        current_num_replicas=running,
        total_num_requests=ongoing,
        policy_state={"__decision_counters": 0},  # Serve's own keys are left to Serve
        config=config,
    )


def test_the_policy_takes_published_sizing_newer_than_its_build(monkeypatch):
    published: dict = {}
    monkeypatch.setattr(replica_policy, "read_sizing", lambda: published.get("value"))
    monkeypatch.setattr(replica_policy.time, "monotonic", lambda: clock[0])
    clock = [1000.0]
    policy = LiveSizingPolicy("m", fixed(2), built_at=500.0)
    assert policy(context(2, 2, 0.0)) == (2, {}), "nothing published: the build's sizing"

    published["value"] = {"published_at": 400.0, "models": {"m": fixed(1)}}  # a previous deployment's
    clock[0] += replica_policy.SIZING_READ_INTERVAL_S
    assert policy(context(2, 2, 0.0)) == (2, {}), "older than the build: ignored"

    published["value"] = {"published_at": 600.0, "models": {"m": fixed(1), "other": fixed(5)}}
    clock[0] += 0.5
    assert policy(context(2, 2, 0.0)) == (2, {}), "read at most once a second"
    clock[0] += 0.5
    assert policy(context(2, 2, 0.0)) == (1, {}), "an edit published after the build: applied"

    published["value"] = {"published_at": 700.0, "models": {"other": fixed(5)}}
    clock[0] += 1.0
    assert policy(context(1, 1, 0.0)) == (2, {}), "the model no longer published: the build's"


def test_a_target_asked_to_follow_the_kv_capacity_shrinks_with_what_the_cache_holds(monkeypatch):
    sizing = fixed(1) | {"target_ongoing_requests": 48.0, "typical_request_tokens": 1000.0}
    assert kv_sized(sizing, (16, 64))["target_ongoing_requests"] == 12.0, "a quarter of the batch fits"
    assert kv_sized(sizing, None) == sizing, "nothing published yet"
    assert kv_sized(fixed(1), (16, 64)) == fixed(1), "not asked: the configured target"
    assert kv_sized(sizing, (1, 1000))["target_ongoing_requests"] == 1.0

    monkeypatch.setattr(replica_policy, "read_sizing", lambda: None)
    monkeypatch.setattr(replica_policy, "read_kv_sequences", lambda model_id, typical: (16, 64))
    autoscaled = sizing | {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 0.0}
    policy = LiveSizingPolicy("m", autoscaled, built_at=0.0)
    assert policy.sizing()["target_ongoing_requests"] == 12.0
    assert policy(context(1, 1, ongoing=30.0)) == (3, {}), "30 requests over a target of 12"


def test_the_policy_reads_the_capacity_where_apps_capacity_writes_it():
    assert capacity_key("m") == f"{replica_policy.CAPACITY_KEY_PREFIX}m".encode()
    assert CAPACITY_NAMESPACE == replica_policy.CAPACITY_NAMESPACE


def test_a_malformed_publication_or_a_failure_keeps_the_build_or_the_current_count(monkeypatch):
    published = {"published_at": 600.0, "models": {"m": {"min_replicas": 3}}}  # fields missing
    monkeypatch.setattr(replica_policy, "read_sizing", lambda: published)
    policy = LiveSizingPolicy("m", fixed(2), built_at=500.0)
    assert policy(context(2, 2, 0.0)) == (2, {}), "an entry it cannot read: the build's sizing"

    def broken() -> dict:
        raise RuntimeError("a format from a newer gateway")

    policy = LiveSizingPolicy("m", fixed(2), built_at=500.0)
    monkeypatch.setattr(replica_policy, "decide", lambda *args: broken())
    assert policy(context(5, 5, 0.0)) == (5, {}), "Serve's controller never sees an exception"


def test_through_serves_own_wrapper_the_policys_decisions_pass_unchanged(monkeypatch):
    """Serve wraps a custom policy with its scaling factors, delays and cold-start path; with the
    builder's settings (delays 0, bounds 0..1000) they change nothing."""
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig

    from apps.builder import model_deployment_options
    from apps.config import ModelConfig

    model = ModelConfig.model_validate(
        {"id": "m", "path": "/x", "replicas": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}}},
        context={"check_model_files": False},
    )
    options = model_deployment_options(model)["autoscaling_config"]
    config = AutoscalingConfig(**options)
    policy = LiveSizingPolicy(**options["policy"]["policy_kwargs"])
    monkeypatch.setattr(replica_policy, "read_sizing", lambda: None)
    wrapped = _apply_autoscaling_config(policy)
    assert wrapped(context(0, 0, 0.0, config))[0] == 1, "a new deployment (target 0) goes to min at once"
    assert wrapped(context(6, 6, 0.0, config))[0] == 4, "above max: down at once"
    count, state = wrapped(context(1, 1, 200.0, config))
    assert count == 1 and state["direction"] == "up", "demand waits for the upscale delay"
    assert wrapped(context(0, 0, 5.0, config))[0] == 1, "requests at zero replicas: Serve's cold start"
