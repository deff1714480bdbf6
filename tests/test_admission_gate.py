"""Ingress backpressure without Ray: the per-model gate (slots, bounded priority queue, shedding,
eviction, timeouts, cancellation, Retry-After), its sizing from the model config, and deadlines."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from apps.admission.capacity import EngineCapacity
from apps.admission.gate import (
    ENGINE_PRIORITY_CLASS_STEP,
    MIN_RETRY_AFTER_S,
    ModelGate,
    ModelRoute,
    Slot,
    gate_for,
    model_max_in_flight,
    replica_concurrency,
    shed_depths,
    until,
)
from apps.config import ModelConfig, load_config
from apps.errors import DeadlineExceeded, Overloaded, error_body

# A slot of the default key: these tests acquire without naming one.
ANONYMOUS_SLOT = Slot()


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


# --- fair share between keys within a class ----------------------------------------------------


class KeyedWaiters:
    """Requests of named keys acquiring the gate; records which key got each slot, in order, and
    each one's slot."""

    def __init__(self, gate: ModelGate) -> None:
        self.gate = gate
        self.granted: list[str] = []
        self.slots: list[Slot] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def add(
        self, key: str, count: int = 1, priority: str = "normal", weight: float = 1.0, cost: int = 10
    ) -> None:
        async def wait() -> None:
            slot = await self.gate.acquire(priority, key=key, weight=weight, cost=cost)
            self.granted.append(key)
            self.slots.append(slot)

        for _ in range(count):
            self.tasks.append(asyncio.create_task(wait()))
        await let_run()

    async def release_each(self, times: int, used_tokens: int | None = None) -> None:
        """Release the oldest held slots one at a time, letting each freed slot be handed on."""
        for _ in range(times):
            self.gate.release(self.slots.pop(0), used_tokens)
            await let_run()

    async def finish(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def test_a_freed_slot_goes_to_the_key_served_least_not_to_the_longest_waiter():
    async def main():
        gate = make_gate(max_in_flight=2, max_queued=100)
        keys = KeyedWaiters(gate)
        await keys.add("greedy", 10)  # two run, eight wait
        await keys.add("light")
        assert keys.granted == ["greedy", "greedy"] and gate.depth == 9
        await keys.release_each(1)
        assert keys.granted[-1] == "light", "the light key waited behind the greedy key's backlog"
        assert keys.slots[-1].overtook and not keys.slots[0].overtook
        await keys.release_each(3)
        assert keys.granted[-3:] == ["greedy"] * 3, "work-conserving: the greedy key gets the rest"
        await keys.finish()

    asyncio.run(main())


def test_without_fair_share_the_longest_waiter_goes_first_and_the_engine_priority_is_the_class():
    async def main():
        gate = make_gate(max_in_flight=2, max_queued=100)
        gate.fair_share = False
        keys = KeyedWaiters(gate)
        await keys.add("greedy", 4)
        await keys.add("light")
        await keys.release_each(3)
        assert keys.granted == ["greedy"] * 4 + ["light"]
        assert {slot.engine_priority for slot in keys.slots} == {0}
        await keys.finish()

    asyncio.run(main())


def test_a_key_alone_gets_every_slot_in_its_own_order():
    async def main():
        gate = make_gate(max_in_flight=3, max_queued=100)
        waiters = Waiters(gate)
        for name in "abcdef":
            await waiters.add(name, "normal")
        assert waiters.served == ["a", "b", "c"] and gate.in_flight == 3
        for _ in range(3):
            gate.release(ANONYMOUS_SLOT)
            await let_run()
        assert waiters.served == list("abcdef")
        await waiters.finish()

    asyncio.run(main())


def test_weights_share_the_slots_in_their_ratio():
    async def main():
        gate = make_gate(max_in_flight=1, max_queued=200)
        keys = KeyedWaiters(gate)
        await keys.add("holder")
        await keys.add("double", 60, weight=2.0)
        await keys.add("single", 60, weight=1.0)
        await keys.release_each(60)
        counts = Counter(keys.granted[1:])
        assert counts == {"double": 40, "single": 20}, counts
        await keys.finish()

    asyncio.run(main())


def test_a_key_idle_while_another_was_served_earns_no_credit_to_starve_it_later():
    async def main():
        gate = make_gate(max_in_flight=1, max_queued=200)
        keys = KeyedWaiters(gate)
        await keys.add("busy", 50)  # served alone: its counter grows to 500 tokens
        await keys.release_each(45)
        await keys.add("idle", 10)  # lifted to the busy key's counter as it starts waiting
        await keys.release_each(10)
        shares = Counter(keys.granted[-10:])
        assert shares["busy"] >= 4 and shares["idle"] >= 4, shares
        await keys.finish()

    asyncio.run(main())


def test_a_key_arriving_to_an_empty_class_catches_up_with_that_class_not_another():
    async def main():
        gate = make_gate(max_in_flight=1, max_queued=100)
        keys = KeyedWaiters(gate)
        await keys.add("h1", priority="high", cost=100)
        await keys.add("n", priority="normal")
        await keys.add("h1", 3, priority="high", cost=100)
        await keys.release_each(4)  # h1 three more times (counter 400), then n (the last grant: 0)
        assert keys.granted == ["h1"] * 4 + ["n"]
        await keys.add("h2", priority="high")  # idle until now: no credit against h1
        assert gate.counters()["h2"] == 300, "lifted to the high class's last grant, not n's 0"
        await keys.finish()

    asyncio.run(main())


def test_a_request_that_used_less_than_it_reserved_is_charged_what_it_used():
    async def main():
        gate = make_gate(max_in_flight=2, max_queued=100)
        keys = KeyedWaiters(gate)
        await keys.add("thrifty", cost=1000)
        await keys.add("other", cost=100)
        await keys.add("other", cost=100)
        await keys.add("thrifty", cost=100)  # waits behind other's second request
        assert gate.counters() == {"thrifty": 1000, "other": 100}
        gate.release(keys.slots.pop(0), used_tokens=10)  # thrifty's: charged 1000, used 10
        await let_run()
        assert keys.granted[-1] == "thrifty", "with its true cost (10 < 100) it is the least served"
        assert gate.counters() == {"thrifty": 10 + 100, "other": 100}
        await keys.finish()

    asyncio.run(main())


def test_engine_priority_ranks_the_class_then_the_keys_backlog_at_the_engines():
    async def main():
        gate = make_gate(max_in_flight=10)
        first = await gate.acquire("normal", key="a")
        second = await gate.acquire("normal", key="a")
        other = await gate.acquire("normal", key="b")
        assert (first.engine_priority, second.engine_priority, other.engine_priority) == (0, 1, 0)
        heavy = await gate.acquire("normal", key="heavy", weight=2.0)
        heavy_second = await gate.acquire("normal", key="heavy", weight=2.0)
        heavy_third = await gate.acquire("normal", key="heavy", weight=2.0)
        assert [s.engine_priority for s in (heavy, heavy_second, heavy_third)] == [0, 0, 1]
        high = await gate.acquire("high", key="c")
        low = await gate.acquire("low", key="d")
        assert high.engine_priority == -ENGINE_PRIORITY_CLASS_STEP
        assert low.engine_priority == ENGINE_PRIORITY_CLASS_STEP
        gate.release(first)
        assert (await gate.acquire("normal", key="a")).engine_priority == 1  # one still in

    asyncio.run(main())


async def evicted_by_a_high_arrival(gate: ModelGate) -> list[int]:
    """Fill a one-slot gate's queue of 3 with low waiters of a heavy key (500 tokens served) and
    a light one, the light key's waiter the newest of all; then a high arrival evicts one. The
    indices of the evicted (0: heavy's granted request, 1: light, 2: heavy, 3: light, 4: high)."""
    keys = KeyedWaiters(gate)
    await keys.add("heavy", priority="low", cost=500)
    await keys.add("light", priority="low")
    await keys.add("heavy", priority="low")
    await keys.add("light", priority="low")
    assert gate.depth == 3 and gate.counters() == {"heavy": 500, "light": 0}
    await keys.add("urgent", priority="high")
    evicted = [i for i, task in enumerate(keys.tasks) if task.done() and task.exception() is not None]
    assert all(isinstance(keys.tasks[i].exception(), Overloaded) for i in evicted)
    await keys.finish()
    return evicted


def test_eviction_takes_the_newest_waiter_of_the_most_served_key_of_the_lowest_class():
    gate = make_gate(max_in_flight=1, max_queued=3)
    assert asyncio.run(evicted_by_a_high_arrival(gate)) == [2], "the heavy key's, not the newest"


def test_without_fair_share_eviction_takes_the_newest_waiter_of_all():
    gate = make_gate(max_in_flight=1, max_queued=3)
    gate.fair_share = False
    assert asyncio.run(evicted_by_a_high_arrival(gate)) == [3]


def test_without_fair_share_a_cancelled_waiter_is_not_taken_for_the_newest():
    async def main():
        # A normal arrival finding 2 waiting evicts a low one; low waits up to 3.
        gate = make_gate(max_in_flight=1, max_queued=3, shed_depth={"high": 3, "normal": 2, "low": 3})
        gate.fair_share = False
        keys = KeyedWaiters(gate)
        await keys.add("x", priority="low")  # holds the slot
        await keys.add("x", priority="low")  # 1
        await keys.add("y", priority="low")  # 2: the newest live waiter once 3 is gone
        await keys.add("x", priority="low")  # 3: cancelled
        keys.tasks[3].cancel()
        await let_run()
        assert gate.depth == 2
        await keys.add("n", priority="normal")
        assert isinstance(keys.tasks[2].exception(), Overloaded), "y's, the newest still waiting"
        assert not keys.tasks[1].done()
        await keys.finish()

    asyncio.run(main())



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
            gate.release(ANONYMOUS_SLOT)
            await let_run()
            assert waiters.served == expected
        assert gate.depth == 0 and gate.in_flight == 2
        gate.release(ANONYMOUS_SLOT)
        gate.release(ANONYMOUS_SLOT)
        assert gate.in_flight == 0

    asyncio.run(main())


def test_freed_slot_returns_to_the_pool_when_nobody_waits():
    async def main():
        gate = make_gate(max_in_flight=1)
        await gate.acquire("low")
        gate.release(ANONYMOUS_SLOT)
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
            gate.release(ANONYMOUS_SLOT)
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
        gate.release(ANONYMOUS_SLOT)  # the slot goes to the waiter, not back to the pool
        late = asyncio.create_task(gate.acquire("high"))
        await let_run()
        assert waiters.served == ["first"] and not late.done()
        assert gate.in_flight == 1 and gate.depth == 1
        gate.release(ANONYMOUS_SLOT)
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
        gate.release(ANONYMOUS_SLOT)
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
            gate.release(ANONYMOUS_SLOT)
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
        gate.release(ANONYMOUS_SLOT)
        gate.release(ANONYMOUS_SLOT)
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
        gate.release(ANONYMOUS_SLOT)  # the timed-out waiter must not receive the slot
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
        gate.release(ANONYMOUS_SLOT)
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
        gate.release(ANONYMOUS_SLOT)
        await let_run()
        assert waiters.served == ["next"]
        assert gate.depth == 0 and gate.in_flight == 1
        gate.release(ANONYMOUS_SLOT)
        assert gate.in_flight == 0

    asyncio.run(main())


def test_slot_arriving_as_the_waiter_is_cancelled_is_handed_to_the_next_waiter():
    async def main():
        gate = make_gate(max_in_flight=1)
        await gate.acquire("normal")
        waiters = Waiters(gate)
        leaving = await waiters.add("leaving", "normal")
        await waiters.add("next", "normal")
        gate.release(ANONYMOUS_SLOT)  # the slot is given to `leaving` ...
        leaving.cancel()  # ... which is cancelled before it runs
        await let_run()
        assert leaving.cancelled()
        assert waiters.served == ["next"]
        assert gate.depth == 0 and gate.in_flight == 1
        gate.release(ANONYMOUS_SLOT)
        assert gate.in_flight == 0

    asyncio.run(main())


def test_slot_arriving_as_the_last_waiter_is_cancelled_returns_to_the_pool():
    async def main():
        gate = make_gate(max_in_flight=1)
        await gate.acquire("normal")
        waiters = Waiters(gate)
        leaving = await waiters.add("leaving", "normal")
        gate.release(ANONYMOUS_SLOT)
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
        gate.release(ANONYMOUS_SLOT)


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


def test_an_engine_holding_fewer_typical_requests_than_its_batch_lowers_the_bound():
    sized = model(admission={"typical_request_tokens": 1000}, replicas={"num_replicas": 2})
    small = EngineCapacity(kv_cache_tokens=20_000, max_num_seqs=64)  # 20 requests of 1000 tokens
    assert small.sequences(1000) == 20
    assert replica_concurrency(sized, small) == 25  # x 1.25 headroom
    assert model_max_in_flight(sized, small) == 50
    assert gate_for(sized, ingress_replicas=2, capacity=small).max_in_flight == 25
    doubled = EngineCapacity(kv_cache_tokens=40_000, max_num_seqs=64)
    assert replica_concurrency(sized, doubled) == 2 * replica_concurrency(sized, small)


def test_the_kv_capacity_never_raises_the_bound_past_the_batch_nor_below_one_request():
    sized = model(admission={"typical_request_tokens": 1000})
    roomy = EngineCapacity(kv_cache_tokens=10_000_000, max_num_seqs=64)
    assert roomy.sequences(1000) == 64 and replica_concurrency(sized, roomy) == 80
    tiny = EngineCapacity(kv_cache_tokens=500, max_num_seqs=64)
    assert tiny.sequences(1000) == 1 and replica_concurrency(sized, tiny) == 2


def test_the_kv_capacity_sizes_nothing_unless_asked_or_when_a_bound_is_explicit():
    small = EngineCapacity(kv_cache_tokens=20_000, max_num_seqs=64)
    assert replica_concurrency(model(), small) == 80, "no typical_request_tokens: max_num_seqs alone"
    sized = model(admission={"typical_request_tokens": 1000})
    assert replica_concurrency(sized, None) == 80, "nothing published yet"
    explicit = model(admission={"typical_request_tokens": 1000}, replicas={"max_ongoing_requests": 40})
    assert replica_concurrency(explicit, small) == 40
    configured = model(admission={"typical_request_tokens": 1000, "max_in_flight": 7})
    assert model_max_in_flight(configured, small) == 7


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
