"""Failover's pure rules: which failures mean the replica is lost (so the request may go to
another replica), and when a replacement is expected (the Retry-After of a model without a
running replica)."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from apps.errors import DeadlineExceeded, EngineUnavailable, InternalError, InvalidRequest
from apps.routing.failover import (
    MIN_RETRY_AFTER_S,
    UNKNOWN_STARTUP_RETRY_AFTER_S,
    ReplicaWatch,
    is_lost_replica_code,
    is_replica_lost,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "failure",
    [
        ActorDiedError(),
        ActorUnavailableError("unreachable", b"\x00" * 16),
        ReplicaUnavailableError("gone"),
        DeploymentUnavailableError("model"),
        EngineUnavailable("engine dead"),
    ],
)
def test_a_dead_replica_or_engine_is_a_lost_replica(failure):
    assert is_replica_lost(failure), failure


@pytest.mark.parametrize(
    "failure",
    [
        InvalidRequest("bad"),  # the same request fails anywhere
        DeadlineExceeded("late"),
        InternalError("bug"),
        EngineUnavailable("limiter down", code="limiter_unavailable"),
        BackPressureError(num_queued_requests=3, max_queued_requests=2),
        TimeoutError(),
        ValueError("x"),
    ],
)
def test_other_failures_are_not_sent_again(failure):
    assert not is_replica_lost(failure), failure


def test_only_the_engine_unavailable_code_of_an_answer_means_a_lost_replica():
    assert is_lost_replica_code("engine_unavailable")
    assert not is_lost_replica_code(None)
    assert not is_lost_replica_code("queue_timeout")


def test_replacement_expected_after_a_replicas_start_time_less_what_has_passed():
    clock = Clock()
    watch = ReplicaWatch(clock)
    assert watch.retry_after_s() == UNKNOWN_STARTUP_RETRY_AFTER_S, "no replica seen yet"
    watch.accepted(startup_s=40.0)
    assert not watch.in_outage
    watch.lost()
    assert watch.in_outage
    clock.now += 15
    watch.lost()  # a second failure does not restart the count
    assert watch.retry_after_s() == pytest.approx(25.0)
    clock.now += 60
    assert watch.retry_after_s() == MIN_RETRY_AFTER_S, "overdue: retry soon, not never"


def test_a_replica_accepting_again_ends_the_outage():
    clock = Clock()
    watch = ReplicaWatch(clock)
    watch.accepted(startup_s=30.0)
    watch.lost()
    clock.now += 20
    watch.accepted(startup_s=30.0)
    assert not watch.in_outage
    clock.now += 5
    watch.lost()
    assert watch.retry_after_s() == pytest.approx(30.0), "a new outage counts from its own start"
