"""Backpressure for one model at one ingress replica: a bounded number of requests in flight at the
engines, a bounded wait queue in front of them, priority classes, and nothing that waits forever.

Why at the ingress: a request that waits here holds no engine memory and no Ray message, it can
be shed by priority and deadline, and the client learns at once, with a `Retry-After` from the
queue's real drain rate, when the model is full. Serve's own per-replica queue knows none of that.

    arrival ──> slot free and nobody waiting? ──yes──> in flight
                     │ no
                     v
                queue below this class's shed depth? ──no──> evict a lower class's newest
                     │ yes                                   waiter, else 503
                     v
                wait (best class first; within it, the key served least) ──> slot, or 503
                                                                              at the deadline

Fair share within a class (the Virtual Token Counter of Sheng et al., OSDI 2024): each key has a
counter of the tokens it was granted (its requests' reserved tokens, corrected to the tokens
really used when they end), divided by its weight; a freed slot goes to the waiting key with the
lowest counter. A key that starts waiting is lifted to the lowest counter of those already waiting
(or to the last grant's counter when nobody waits), so idle time earns no credit to spend later.
Work-conserving: a key alone gets every slot.

The engine has a short queue of its own (a replica takes up to `ONGOING_REQUESTS_HEADROOM` more
requests than it batches), first come first served unless told otherwise: each granted request
carries an engine priority (vLLM's `priority` under `scheduling_policy: priority`), its class, then
how many requests its key already has at the engines, so a light key's request is batched before
a greedy key's backlog there too.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from apps.admission.capacity import EngineCapacity
from apps.admission.rate_limits import reservation_lease_s
from apps.config import PRIORITIES, ModelConfig, Priority
from apps.errors import DeadlineExceeded, Overloaded
from apps.routing.failover import ReplicaWatch
from apps.routing.router import RoutingKnobs

# A replica may hold a few more requests than its engine batches, so the next batch is ready
# the moment a sequence finishes; more than that would only queue inside the engine.
ONGOING_REQUESTS_HEADROOM = 1.25
T = TypeVar("T")
# Weight of the newest interval between two freed slots in the drain-rate average.
DRAIN_EWMA_ALPHA = 0.2
MIN_RETRY_AFTER_S = 1.0
# vLLM's priority orders by the class first: a class is worth more than any key's backlog.
ENGINE_PRIORITY_CLASS_STEP = 1 << 20
ANONYMOUS_KEY = "anonymous"


@dataclass(frozen=True)
class Slot:
    """A granted slot: whose it is, what its grant charged the key's counter, and the request's
    engine priority (lower is scheduled first)."""

    key: str = ANONYMOUS_KEY
    weight: float = 1.0
    charged_tokens: int = 0
    engine_priority: int = 0
    overtook: bool = False  # granted ahead of an earlier waiter of another key (fair share at work)


@dataclass
class _Waiter:
    key: str
    weight: float
    cost: int
    arrival: int  # the gate's arrival order
    future: asyncio.Future[Slot]


class ModelGate:
    """At most `max_in_flight` requests pass; up to `max_queued` wait for a freed slot.

    A class's arrivals are turned away once the queue holds `shed_depth[class]` waiters, unless a
    strictly lower class is waiting: the newest waiter of that class's most-served key is evicted
    instead. A freed slot goes straight to the best waiting class, and within it to the key with
    the lowest token counter (first come first served within a key).
    """

    def __init__(
        self,
        model_id: str,
        *,
        max_in_flight: int,
        max_queued: int,
        queue_timeout_s: float,
        shed_depth: Mapping[Priority, int],
        fair_share: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_id = model_id
        self.fair_share = fair_share
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self._queue_timeout_s = queue_timeout_s
        self._shed_depth = dict(shed_depth)
        self._clock = clock
        self._in_flight = 0
        # Per class, per key, in arrival order; cancelled waiters stay until popped.
        self._waiting: dict[Priority, dict[str, deque[_Waiter]]] = {p: {} for p in PRIORITIES}
        self._depth = 0  # live waiters
        self._served: dict[str, float] = {}  # each key's granted tokens / weight (its counter)
        # Per class: the counter of the last key granted a slot, before its charge.
        self._last_grant: dict[Priority, float] = dict.fromkeys(PRIORITIES, 0.0)
        self._key_in_flight: dict[str, int] = {}
        self._arrivals = itertools.count()
        self._last_release: float | None = None
        self._release_interval_s: float | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def depth(self) -> int:
        return self._depth

    async def acquire(
        self,
        priority: Priority,
        deadline: float | None = None,
        *,
        key: str = ANONYMOUS_KEY,
        weight: float = 1.0,
        cost: int = 0,
    ) -> Slot:
        """Take a slot for `key` (its share `weight`, the request's `cost` in reserved tokens),
        waiting at most until the queue timeout (then `Overloaded`) or the request's `deadline`
        in clock time (then `DeadlineExceeded`). Raises `Overloaded` when turned away or
        evicted."""
        if not self._backlogged(priority, key):
            self._lift(priority, key)
        if self._in_flight < self.max_in_flight and self._depth == 0:
            self._in_flight += 1
            return self._grant(priority, key, weight, cost)
        if self._depth >= self._shed_depth[priority] and not self._evict_below(priority):
            full = self._depth >= self.max_queued
            raise self._overloaded(
                "queue_full" if full else "priority_shed",
                f"Model {self.model_id} is at capacity"
                + ("" if full else f"; {priority} priority requests are shed first")
                + ". Retry later.",
            )
        future: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(key, weight, cost, next(self._arrivals), future)
        self._waiting[priority].setdefault(key, deque()).append(waiter)
        self._depth += 1
        timeout = self._queue_timeout_s
        deadline_binds = deadline is not None and deadline - self._clock() < timeout
        if deadline_binds:
            timeout = max(0.0, deadline - self._clock())
        try:
            await asyncio.wait({future}, timeout=timeout)
        except asyncio.CancelledError:
            if not future.done():
                future.cancel()
                self._depth -= 1
            elif future.exception() is None:
                self.release(future.result(), 0)  # the slot arrived as the client left: hand it on
            raise
        if not future.done():
            future.cancel()
            self._depth -= 1
            if deadline_binds:
                raise DeadlineExceeded(
                    f"Model {self.model_id}: the request's timeout passed while it waited for capacity."
                )
            raise self._overloaded(
                "queue_timeout", f"Model {self.model_id}: no capacity within {timeout:.1f}s. Retry later."
            )
        return future.result()  # raises Overloaded if this waiter was evicted

    def adopt_bounds(self, other: ModelGate) -> None:
        """Take `other`'s bounds and timeout (new live settings), keeping the requests in flight
        and waiting: a raised bound lets waiters in at once; a lowered one admits nobody new
        until enough requests have finished."""
        self.max_in_flight, self.max_queued = other.max_in_flight, other.max_queued
        self._queue_timeout_s, self._shed_depth = other._queue_timeout_s, dict(other._shed_depth)
        self.fair_share = other.fair_share
        while self._in_flight < self.max_in_flight and self._hand_to_waiter():
            self._in_flight += 1

    def release(self, slot: Slot, used_tokens: int | None = None) -> None:
        """Free `slot`: it passes to the best waiter, or back to the pool. `used_tokens`: what
        the request really cost, to correct its key's counter (None: as charged)."""
        self._note_release()
        held = self._key_in_flight.get(slot.key, 0)
        if held <= 1:
            self._key_in_flight.pop(slot.key, None)
        else:
            self._key_in_flight[slot.key] = held - 1
        if used_tokens is not None and slot.key in self._served:
            self._served[slot.key] += (used_tokens - slot.charged_tokens) / slot.weight
        # Above a lowered bound (live settings) a freed slot is not handed on.
        if self._in_flight > self.max_in_flight or not self._hand_to_waiter():
            self._in_flight -= 1

    def counters(self) -> dict[str, float]:
        """Each key's token counter (granted tokens / weight), to inspect the fair share."""
        return dict(self._served)

    def _grant(self, priority: Priority, key: str, weight: float, cost: int, overtook: bool = False) -> Slot:
        """Charge `key` for a granted slot; its engine priority counts its requests already in."""
        held = self._key_in_flight.get(key, 0)
        self._key_in_flight[key] = held + 1
        counter = self._served.get(key, 0.0)
        self._last_grant[priority] = counter
        self._served[key] = counter + cost / weight
        backlog = min(math.floor(held / weight), ENGINE_PRIORITY_CLASS_STEP - 1) if self.fair_share else 0
        # `normal` is 0 and up: a request that carries no priority (vLLM's default 0, say of an
        # endpoint whose protocol has none) is scheduled as a normal one with no backlog.
        engine_priority = (PRIORITIES.index(priority) - 1) * ENGINE_PRIORITY_CLASS_STEP + backlog
        return Slot(key, weight, cost, engine_priority, overtook)

    def _lift(self, priority: Priority, key: str) -> None:
        """A key that starts waiting (or arrives to an empty queue) catches up with the least
        served waiting key of its class, or with the last grant: no credit for idle time."""
        waiting = [self._served.get(k, 0.0) for k in self._live_keys(priority) if k != key]
        floor = min(waiting) if waiting else self._last_grant[priority]
        self._served[key] = max(self._served.get(key, 0.0), floor)

    def _backlogged(self, priority: Priority, key: str) -> bool:
        return self._head(priority, key) is not None

    def _head(self, priority: Priority, key: str) -> _Waiter | None:
        """`key`'s oldest live waiter in `priority`'s queue (dropping dead ones on the way)."""
        queue = self._waiting[priority].get(key)
        while queue and queue[0].future.done():  # cancelled or timed out: counted out already
            queue.popleft()
        if not queue:
            self._waiting[priority].pop(key, None)
            return None
        return queue[0]

    def _live_keys(self, priority: Priority) -> list[str]:
        return [key for key in list(self._waiting[priority]) if self._head(priority, key) is not None]

    def _hand_to_waiter(self) -> bool:
        """Give a slot to the best waiter: best class, then the key with the lowest counter (ties:
        fewer requests in flight); False if nobody waits."""
        for priority in PRIORITIES:
            keys = self._live_keys(priority)
            if not keys:
                continue
            queues = self._waiting[priority]
            if self.fair_share:
                key = min(keys, key=lambda k: (self._served.get(k, 0.0), self._key_in_flight.get(k, 0)))
            else:  # first come first served
                key = min(keys, key=lambda k: queues[k][0].arrival)
            waiter = queues[key].popleft()
            overtook = any(queues[other][0].arrival < waiter.arrival for other in keys if other != key)
            self._depth -= 1
            waiter.future.set_result(self._grant(priority, key, waiter.weight, waiter.cost, overtook))
            return True
        return False

    def retry_after_s(self) -> float:
        """When a request arriving now would likely get a slot, from the observed drain rate."""
        if self._release_interval_s is None:
            return MIN_RETRY_AFTER_S
        wait = (self._depth + 1) * self._release_interval_s
        return min(max(wait, MIN_RETRY_AFTER_S), self._queue_timeout_s)

    def _evict_below(self, priority: Priority) -> bool:
        """Turn away the newest waiter of the lowest class below `priority` (of its most-served
        key, with fair share); False if none."""
        for lower in reversed(PRIORITIES[PRIORITIES.index(priority) + 1 :]):
            keys = self._live_keys(lower)
            if keys:
                queues = self._waiting[lower]
                if self.fair_share:
                    key = max(keys, key=lambda k: self._served.get(k, 0.0))
                else:  # the newest live waiter of all
                    key = max(keys, key=lambda k: max(w.arrival for w in queues[k] if not w.future.done()))
                queue = queues[key]
                waiter = queue.pop()
                while waiter.future.done():  # the head is live, so this ends
                    waiter = queue.pop()
                self._depth -= 1
                waiter.future.set_exception(
                    self._overloaded(
                        "priority_shed",
                        f"Model {self.model_id} is at capacity; this {lower} priority request made "
                        "room for a higher one. Retry later.",
                    )
                )
                return True
        return False

    def _note_release(self) -> None:
        now = self._clock()
        if self._last_release is not None:
            interval = now - self._last_release
            previous = self._release_interval_s
            self._release_interval_s = (
                interval
                if previous is None
                else DRAIN_EWMA_ALPHA * interval + (1 - DRAIN_EWMA_ALPHA) * previous
            )
        self._last_release = now

    def _overloaded(self, reason: str, message: str) -> Overloaded:
        return Overloaded(message, reason=reason, retry_after_s=self.retry_after_s())


def shed_depths(max_queued: int, shed_low_at: float, shed_normal_at: float) -> dict[Priority, int]:
    """Queue depth at which each class's arrivals are turned away."""
    return {
        "high": max_queued,
        "normal": math.ceil(max_queued * shed_normal_at),
        "low": math.ceil(max_queued * shed_low_at),
    }


def replica_max_ongoing(model: ModelConfig) -> int:
    """Requests Serve sends one replica at once (its `max_ongoing_requests`)."""
    configured = model.replicas.max_ongoing_requests
    return configured or math.ceil(model.engine.max_num_seqs * ONGOING_REQUESTS_HEADROOM)


def replica_concurrency(model: ModelConfig, capacity: EngineCapacity | None = None) -> int:
    """Requests one replica takes on at once: Serve's `max_ongoing_requests`, or fewer when the
    model's `admission.typical_request_tokens` is set and its engine's KV cache (`capacity`,
    once a replica has published it) holds fewer such requests, with the same headroom. An
    explicit `replicas.max_ongoing_requests` is kept as it is."""
    serve_bound = replica_max_ongoing(model)
    typical = model.admission.typical_request_tokens
    if capacity is None or typical is None or model.replicas.max_ongoing_requests is not None:
        return serve_bound
    return min(serve_bound, math.ceil(capacity.sequences(typical) * ONGOING_REQUESTS_HEADROOM))


def model_max_in_flight(model: ModelConfig, capacity: EngineCapacity | None = None) -> int:
    """Requests of a model at its engines at once, for the whole app: configured, or what all
    its replicas (at most) take on."""
    if model.admission.max_in_flight is not None:
        return model.admission.max_in_flight
    autoscaling = model.replicas.autoscaling
    replicas = autoscaling.max_replicas if autoscaling else model.replicas.num_replicas
    return replica_concurrency(model, capacity) * replicas


def gate_for(model: ModelConfig, ingress_replicas: int, capacity: EngineCapacity | None = None) -> ModelGate:
    """This ingress replica's gate for `model`: an even share of the app-wide bounds (sized by
    its engine's KV `capacity` where `replica_concurrency` says so)."""
    settings = model.admission
    max_in_flight = model_max_in_flight(model, capacity)
    max_queued = max_in_flight if settings.max_queued is None else settings.max_queued
    share_in_flight = math.ceil(max_in_flight / ingress_replicas)
    share_queued = math.ceil(max_queued / ingress_replicas)
    return ModelGate(
        model.id,
        max_in_flight=share_in_flight,
        max_queued=share_queued,
        queue_timeout_s=settings.queue_timeout_s,
        shed_depth=shed_depths(share_queued, settings.shed_low_at, settings.shed_normal_at),
        fair_share=settings.fair_share,
    )


@dataclass(frozen=True)
class ModelRoute:
    """What an ingress replica holds per model: its config, its gate, its (streaming) handle and
    what it knows of the model's replicas."""

    config: ModelConfig
    gate: ModelGate
    stream: Any  # DeploymentHandle with stream=True
    replicas: ReplicaWatch = field(default_factory=ReplicaWatch)

    @functools.cached_property
    def routing(self) -> RoutingKnobs:
        """The model's routing settings, as each call carries them to the router (made once per
        settings snapshot: a route is rebuilt when they change)."""
        settings = self.config.routing
        affinity = settings.policy in ("prefix_affinity", "precise_prefix")
        precise = settings.policy == "precise_prefix"
        return RoutingKnobs(affinity, settings.prefix_chars, settings.max_imbalance, precise)

    @functools.cached_property
    def lease_s(self) -> float:
        """How long the limiter holds an unsettled reservation for this model."""
        admission = self.config.admission
        return reservation_lease_s(admission.queue_timeout_s, admission.request_timeout_s)

    @property
    def scales_to_zero(self) -> bool:
        """The model may have no replica on purpose (autoscaling `min_replicas: 0`)."""
        autoscaling = self.config.replicas.autoscaling
        return autoscaling is not None and autoscaling.min_replicas == 0

    def deadlines(self, arrived: float, streaming: bool) -> tuple[float | None, float | None]:
        """(head, total): when the first bytes (for a stream: the first token) and the whole
        answer are due, in loop time; None: no limit."""
        settings = self.config.admission
        total = arrived + settings.request_timeout_s if settings.request_timeout_s else None
        first = (
            arrived + settings.first_token_timeout_s
            if streaming and settings.first_token_timeout_s
            else None
        )
        return _earliest(first, total), total


async def until(awaitable: Awaitable[T], deadline: float | None) -> T:
    """`awaitable`'s result, or TimeoutError at `deadline` (loop time)."""
    if deadline is None:
        return await awaitable
    return await asyncio.wait_for(awaitable, max(0.0, deadline - asyncio.get_running_loop().time()))


def _earliest(*deadlines: float | None) -> float | None:
    given = [d for d in deadlines if d is not None]
    return min(given) if given else None
