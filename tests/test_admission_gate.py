"""Ingress backpressure without Ray: the per-model gate (slots, bounded priority queue, shedding,
eviction, timeouts, cancellation, Retry-After), its sizing from the model config, and deadlines."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from apps.admission import (
    MIN_RETRY_AFTER_S,
    ModelGate,
    ModelRoute,
    gate_for,
    model_max_in_flight,
    shed_depths,
    until,
)
from apps.config import ModelConfig, load_config
from apps.errors import DeadlineExceeded, Overloaded, error_body


def make_gate(
    max_in_flight: int = 1,
    max_queued: int = 10,
    queue_timeout_s: float = 30.0,
    shed_depth: dict[str, int] | None = None,
    clock=time.monotonic,
) -> ModelGate:
    return ModelGate(
        "m",
        max_in_flight=max_in_flight,
        max_queued=max_queued,
        queue_timeout_s=queue_timeout_s,
        shed_depth=shed_depth or {"high": max_queued, "normal": max_queued, "low": max_queued},
        clock=clock,
    )


async def let_run() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


class Waiters:
    """Tasks acquiring the gate, recording the order in which they got a slot."""

    def __init__(self, gate: ModelGate) -> None:
        self.gate = gate
        self.served: list[str] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def add(self, name: str, priority: str, deadline: float | None = None) -> asyncio.Task[None]:
        async def wait() -> None:
            await self.gate.acquire(priority, deadline)
            self.served.append(name)

        self.tasks[name] = asyncio.create_task(wait())
        await let_run()
        return self.tasks[name]

    async def finish(self) -> None:
        """Cancel whoever still waits, and collect every outcome."""
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


async def refused(gate: ModelGate, priority: str, deadline: float | None = None) -> Overloaded:
    """The error of an acquire that must be turned away at once (not after a wait)."""
    with pytest.raises(Overloaded) as raised:
        await asyncio.wait_for(gate.acquire(priority, deadline), timeout=1.0)
    return raised.value


def model(**fields: Any) -> ModelConfig:
    return load_config({"models": [{"id": "m", "path": "x", **fields}]}, check_model_files=False).models[0]


# Slots and order


def test_up_to_max_in_flight_acquire_at_once_then_waiters_get_slots_in_order():
    async def main():
        gate = make_gate(max_in_flight=2)
        for _ in range(2):
            task = asyncio.create_task(gate.acquire("normal"))
            await asyncio.sleep(0)
            assert task.done() and task.exception() is None
        assert gate.in_flight == 2 and gate.depth == 0

        waiters = Waiters(gate)
        for name in ("a", "b", "c"):
            await waiters.add(name, "normal")
        assert waiters.served == [] and gate.depth == 3
        for expected in (["a"], ["a", "b"], ["a", "b", "c"]):
            gate.release()
            await let_run()
            assert waiters.served == expected
        assert gate.depth == 0 and gate.in_flight == 2
        gate.release()
        gate.release()
        assert gate.in_flight == 0

    asyncio.run(main())


def test_freed_slot_returns_to_the_pool_when_nobody_waits():
    async def main():
        gate = make_gate(max_in_flight=1)
        await gate.acquire("low")
        gate.release()
        assert gate.in_flight == 0
        await asyncio.wait_for(gate.acquire("low"), timeout=1.0)
        assert gate.in_flight == 1

    asyncio.run(main())


def test_high_priority_is_served_before_normal_and_low_first_come_within_a_class():
    async def main():
        gate = make_gate(max_in_flight=1)
        await gate.acquire("normal")
        waiters = Waiters(gate)
        for name, priority in [
            ("low1", "low"), ("normal1", "normal"), ("high1", "high"),
            ("low2", "low"), ("normal2", "normal"), ("high2", "high"),
        ]:
            await waiters.add(name, priority)
        assert gate.depth == 6
        for _ in range(6):
            gate.release()
            await let_run()
        assert waiters.served == ["high1", "high2", "normal1", "normal2", "low1", "low2"]
        assert gate.depth == 0 and gate.in_flight == 1

    asyncio.run(main())


def test_arrival_does_not_jump_the_queue_when_a_slot_is_handed_on():
    async def main():
        gate = make_gate(max_in_flight=1)
        await gate.acquire("normal")
        waiters = Waiters(gate)
        await waiters.add("first", "low")
        gate.release()  # the slot goes to the waiter, not back to the pool
        late = asyncio.create_task(gate.acquire("high"))
        await let_run()
        assert waiters.served == ["first"] and not late.done()
        assert gate.in_flight == 1 and gate.depth == 1
        gate.release()
        await let_run()
        assert late.done()

    asyncio.run(main())


# Queue full, shedding and eviction


def test_full_queue_turns_arrivals_away_with_queue_full_and_retry_after():
    async def main():
        gate = make_gate(max_in_flight=1, max_queued=2)
        await gate.acquire("normal")
        waiters = Waiters(gate)
        await waiters.add("a", "high")
        await waiters.add("b", "high")
        for priority in ("high", "normal", "low"):
            error = await refused(gate, priority)
            assert error.status == 503 and error.code == "queue_full"
            assert error.headers == {
                "x-reject-reason": "queue_full",
                "retry-after": "1",
                "retry-after-ms": "1000",
            }
            assert error_body(error)["error"]["code"] == "queue_full"
            assert "Model m is at capacity" in error.message
        assert gate.depth == 2 and not any(task.done() for task in waiters.tasks.values())
        await waiters.finish()

    asyncio.run(main())


def test_low_priority_is_shed_at_its_depth_while_high_still_queues():
    async def main():
        gate = make_gate(max_in_flight=1, max_queued=4, shed_depth=shed_depths(4, 0.5, 0.8))
        await gate.acquire("normal")
        waiters = Waiters(gate)
        await waiters.add("n1", "normal")
        low = await waiters.add("l1", "low")  # depth 1 < low's shed depth 2: queued
        assert not low.done() and gate.depth == 2
        error = await refused(gate, "low")
        assert error.code == "priority_shed" and error.status == 503
        assert error.headers["x-reject-reason"] == "priority_shed"
        assert "low priority requests are shed first" in error.message
        assert gate.depth == 2 and not low.done()
        high = await waiters.add("h", "high")
        assert not high.done() and gate.depth == 3
        gate.release()
        await let_run()
        assert waiters.served == ["h"]
        await waiters.finish()

    asyncio.run(main())


def test_high_arrival_into_full_queue_evicts_the_newest_lowest_priority_waiter():
    async def main():
        gate = make_gate(max_in_flight=1, max_queued=3)
        await gate.acquire("normal")
        waiters = Waiters(gate)
        await waiters.add("low1", "low")
        await waiters.add("normal1", "normal")
        low2 = await waiters.add("low2", "low")
        assert gate.depth == 3
        high = await waiters.add("high1", "high")
        assert low2.done() and not high.done()
        error = low2.exception()
        assert isinstance(error, Overloaded)
        assert error.code == "priority_shed" and error.status == 503
        assert error.headers["x-reject-reason"] == "priority_shed"
        assert "low priority request made room" in error.message
        assert gate.depth == 3
        for _ in range(3):
            gate.release()
            await let_run()
        assert waiters.served == ["high1", "normal1", "low1"]
        assert gate.depth == 0 and gate.in_flight == 1

    asyncio.run(main())


def test_without_low_waiters_the_newest_normal_waiter_is_evicted():
    async def main():
        gate = make_gate(max_in_flight=1, max_queued=2)
        await gate.acquire("normal")
        waiters = Waiters(gate)
        first = await waiters.add("n1", "normal")
        second = await waiters.add("n2", "normal")
        await waiters.add("h", "high")
        assert second.done() and second.exception().code == "priority_shed"
        assert not first.done() and gate.depth == 2
        gate.release()
        gate.release()
        await let_run()
        assert waiters.served == ["h", "n1"]

    asyncio.run(main())


def test_normal_arrival_past_its_shed_depth_evicts_a_low_waiter_instead_of_being_shed():
    async def main():
        gate = make_gate(max_in_flight=1, max_queued=4, shed_depth={"high": 4, "normal": 2, "low": 1})
        await gate.acquire("normal")
        waiters = Waiters(gate)
        low = await waiters.add("low", "low")
        await waiters.add("n1", "normal")
        n2 = await waiters.add("n2", "normal")  # depth 2 = normal's shed depth: evicts the low one
        assert low.done() and low.exception().code == "priority_shed"
        assert not n2.done() and gate.depth == 2
        error = await refused(gate, "normal")  # no lower class left to evict
        assert error.code == "priority_shed"
        await waiters.finish()

    asyncio.run(main())


def test_arrivals_never_evict_their_own_or_a_higher_class():
    async def main():
        gate = make_gate(max_in_flight=1, max_queued=2, shed_depth={"high": 2, "normal": 1, "low": 1})
        await gate.acquire("high")
        waiters = Waiters(gate)
        queued = await waiters.add("h1", "high")
        assert (await refused(gate, "normal")).code == "priority_shed"
        assert (await refused(gate, "low")).code == "priority_shed"
        await waiters.add("h2", "high")
        assert (await refused(gate, "high")).code == "queue_full"
        assert not queued.done() and gate.depth == 2
        await waiters.finish()

    asyncio.run(main())


# Timeouts, deadlines and cancellation


def test_queue_timeout_rejects_and_the_depth_returns_to_zero():
    async def main():
        gate = make_gate(max_in_flight=1, queue_timeout_s=0.05)
        await gate.acquire("normal")
        started = time.monotonic()
        with pytest.raises(Overloaded) as raised:
            await asyncio.wait_for(gate.acquire("normal"), timeout=1.0)
        assert 0.04 <= time.monotonic() - started < 1.0
        assert raised.value.code == "queue_timeout" and raised.value.status == 503
        assert raised.value.headers["x-reject-reason"] == "queue_timeout"
        assert gate.depth == 0 and gate.in_flight == 1
        gate.release()  # the timed-out waiter must not receive the slot
        assert gate.in_flight == 0

    asyncio.run(main())


def test_deadline_earlier_than_the_queue_timeout_is_honoured_with_a_504():
    async def main():
        gate = make_gate(max_in_flight=1, queue_timeout_s=30.0)
        await gate.acquire("normal")
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as raised:
            await asyncio.wait_for(gate.acquire("normal", deadline=started + 0.05), timeout=1.0)
        assert 0.04 <= time.monotonic() - started < 1.0
        assert raised.value.status == 504 and raised.value.code == "timeout"
        assert gate.depth == 0 and gate.in_flight == 1
        gate.release()
        assert gate.in_flight == 0

    asyncio.run(main())


def test_deadline_later_than_the_queue_timeout_gives_queue_timeout():
    async def main():
        gate = make_gate(max_in_flight=1, queue_timeout_s=0.05)
        await gate.acquire("normal")
        with pytest.raises(Overloaded) as raised:
            await asyncio.wait_for(gate.acquire("normal", deadline=time.monotonic() + 60.0), timeout=1.0)
        assert raised.value.code == "queue_timeout" and gate.depth == 0

    asyncio.run(main())


def test_deadline_already_past_rejects_at_once():
    async def main():
        gate = make_gate(max_in_flight=1, queue_timeout_s=30.0)
        await gate.acquire("normal")
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(gate.acquire("normal", deadline=time.monotonic() - 5.0), timeout=1.0)
        assert gate.depth == 0

    asyncio.run(main())


def test_deadline_does_not_matter_when_a_slot_is_free():
    async def main():
        gate = make_gate(max_in_flight=1)
        await gate.acquire("normal", deadline=time.monotonic() - 5.0)
        assert gate.in_flight == 1

    asyncio.run(main())


def test_waiter_cancelled_while_queued_leaks_no_slot():
    async def main():
        gate = make_gate(max_in_flight=1)
        await gate.acquire("normal")
        waiters = Waiters(gate)
        gone = await waiters.add("gone", "high")
        await waiters.add("next", "normal")
        assert gate.depth == 2
        gone.cancel()
        await let_run()
        assert gone.cancelled()
        assert gate.depth == 1 and gate.in_flight == 1
        gate.release()
        await let_run()
        assert waiters.served == ["next"]
        assert gate.depth == 0 and gate.in_flight == 1
        gate.release()
        assert gate.in_flight == 0

    asyncio.run(main())


def test_slot_arriving_as_the_waiter_is_cancelled_is_handed_to_the_next_waiter():
    async def main():
        gate = make_gate(max_in_flight=1)
        await gate.acquire("normal")
        waiters = Waiters(gate)
        leaving = await waiters.add("leaving", "normal")
        await waiters.add("next", "normal")
        gate.release()  # the slot is given to `leaving` ...
        leaving.cancel()  # ... which is cancelled before it runs
        await let_run()
        assert leaving.cancelled()
        assert waiters.served == ["next"]
        assert gate.depth == 0 and gate.in_flight == 1
        gate.release()
        assert gate.in_flight == 0

    asyncio.run(main())


def test_slot_arriving_as_the_last_waiter_is_cancelled_returns_to_the_pool():
    async def main():
        gate = make_gate(max_in_flight=1)
        await gate.acquire("normal")
        waiters = Waiters(gate)
        leaving = await waiters.add("leaving", "normal")
        gate.release()
        leaving.cancel()
        await let_run()
        assert gate.in_flight == 0 and gate.depth == 0

    asyncio.run(main())


# Retry-After from the drain rate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def drain_steadily(gate: ModelGate, clock: Clock, interval_s: float, times: int = 5) -> None:
    for _ in range(times):
        await gate.acquire("normal")
        clock.now += interval_s
        gate.release()


def test_retry_after_is_one_second_before_any_drain_is_observed():
    gate = make_gate()
    assert gate.retry_after_s() == MIN_RETRY_AFTER_S


def test_retry_after_grows_with_depth_at_a_steady_release_interval():
    async def main():
        clock = Clock()
        gate = make_gate(max_in_flight=1, max_queued=3, queue_timeout_s=100.0, clock=clock)
        await drain_steadily(gate, clock, interval_s=2.0)
        assert gate.retry_after_s() == pytest.approx(2.0)  # next slot: one interval away
        await gate.acquire("normal")
        waiters = Waiters(gate)
        seen = []
        for name in ("a", "b", "c"):
            await waiters.add(name, "normal")
            seen.append(gate.retry_after_s())
        assert seen == pytest.approx([4.0, 6.0, 8.0])
        error = await refused(gate, "normal")
        assert error.headers["retry-after"] == "8" and error.headers["retry-after-ms"] == "8000"
        await waiters.finish()

    asyncio.run(main())


def test_release_interval_is_a_moving_average():
    async def main():
        clock = Clock()
        gate = make_gate(max_in_flight=1, queue_timeout_s=100.0, clock=clock)
        await drain_steadily(gate, clock, interval_s=2.0)
        await drain_steadily(gate, clock, interval_s=4.0, times=1)
        assert gate.retry_after_s() == pytest.approx(0.2 * 4.0 + 0.8 * 2.0)

    asyncio.run(main())


def test_retry_after_is_clamped_between_one_second_and_the_queue_timeout():
    async def main():
        clock = Clock()
        fast = make_gate(max_in_flight=1, queue_timeout_s=30.0, clock=clock)
        await drain_steadily(fast, clock, interval_s=0.1)
        assert fast.retry_after_s() == MIN_RETRY_AFTER_S

        slow = make_gate(max_in_flight=1, queue_timeout_s=30.0, clock=clock)
        await drain_steadily(slow, clock, interval_s=50.0)
        assert slow.retry_after_s() == 30.0

    asyncio.run(main())


# Sizing from the config


def test_shed_depths_round_up_shares_of_the_queue():
    assert shed_depths(10, 0.5, 0.8) == {"high": 10, "normal": 8, "low": 5}
    assert shed_depths(3, 0.5, 0.8) == {"high": 3, "normal": 3, "low": 2}
    assert shed_depths(0, 0.5, 0.8) == {"high": 0, "normal": 0, "low": 0}


def test_model_max_in_flight_default_is_what_the_replicas_take_on():
    assert model_max_in_flight(model()) == 80  # ceil(64 max_num_seqs x 1.25) x 1 replica
    assert model_max_in_flight(model(engine={"max_num_seqs": 8}, replicas={"num_replicas": 3})) == 30
    autoscaled = model(replicas={"max_ongoing_requests": 7, "autoscaling": {"max_replicas": 4}})
    assert model_max_in_flight(autoscaled) == 28


def test_model_max_in_flight_configured_wins():
    assert model_max_in_flight(model(admission={"max_in_flight": 5}, replicas={"num_replicas": 4})) == 5


def test_gate_for_splits_app_wide_bounds_across_ingress_replicas_rounding_up():
    config = model(admission={"max_in_flight": 10, "max_queued": 7, "queue_timeout_s": 12.0})
    gate = gate_for(config, ingress_replicas=3)
    assert gate.model_id == "m"
    assert gate.max_in_flight == 4 and gate.max_queued == 3
    single = gate_for(config, ingress_replicas=1)
    assert single.max_in_flight == 10 and single.max_queued == 7


def test_gate_for_queue_defaults_to_max_in_flight():
    gate = gate_for(model(admission={"max_in_flight": 9}), ingress_replicas=2)
    assert gate.max_in_flight == 5 and gate.max_queued == 5


def test_gate_for_applies_shed_depths_and_timeout_of_the_share():
    async def main():
        # Share: 1 in flight, 4 queued; low is shed at ceil(4 x 0.25) = 1 waiter.
        config = model(
            admission={"max_in_flight": 2, "max_queued": 8, "shed_low_at": 0.25, "queue_timeout_s": 0.05}
        )
        gate = gate_for(config, ingress_replicas=2)
        await gate.acquire("normal")
        waiters = Waiters(gate)
        queued = await waiters.add("n", "normal")
        assert (await refused(gate, "low")).code == "priority_shed"
        await asyncio.wait_for(asyncio.gather(queued, return_exceptions=True), timeout=1.0)
        assert queued.exception().code == "queue_timeout"

    asyncio.run(main())


# Deadlines


def route(**admission: Any) -> ModelRoute:
    config = model(admission=admission)
    return ModelRoute(config=config, gate=gate_for(config, 1), stream=None)


def test_deadlines_stream_head_is_the_first_token_timeout():
    assert route(first_token_timeout_s=60, request_timeout_s=600).deadlines(100.0, streaming=True) == (160.0, 700.0)


def test_deadlines_non_stream_head_is_the_total_timeout():
    assert route(first_token_timeout_s=60, request_timeout_s=600).deadlines(100.0, streaming=False) == (700.0, 700.0)


def test_deadlines_head_never_later_than_total():
    assert route(first_token_timeout_s=60, request_timeout_s=30).deadlines(100.0, streaming=True) == (130.0, 130.0)


def test_deadlines_none_means_no_limit():
    assert route(first_token_timeout_s=None, request_timeout_s=None).deadlines(1.0, streaming=True) == (None, None)
    assert route(first_token_timeout_s=5, request_timeout_s=None).deadlines(1.0, streaming=True) == (6.0, None)
    assert route(first_token_timeout_s=5, request_timeout_s=None).deadlines(1.0, streaming=False) == (None, None)


def test_until_returns_the_result_before_the_deadline():
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def main():
        loop = asyncio.get_running_loop()
        assert await until(answer(), None) == 42
        assert await until(answer(), loop.time() + 5.0) == 42

    asyncio.run(main())


def test_until_raises_timeout_at_the_deadline():
    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await until(asyncio.sleep(10), started + 0.05)
        assert loop.time() - started < 1.0
        with pytest.raises(TimeoutError):
            await until(asyncio.sleep(10), started - 1.0)

    asyncio.run(main())
