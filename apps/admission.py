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
                wait (best class first, then first come) ──> slot, or 503 at the deadline
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from apps.config import PRIORITIES, ModelConfig, Priority
from apps.errors import DeadlineExceeded, Overloaded
from apps.failover import ReplicaWatch
from apps.rate_limits import reservation_lease_s
from apps.routing import RoutingKnobs

# A replica may hold a few more requests than its engine batches, so the next batch is ready
# the moment a sequence finishes; more than that would only queue inside the engine.
ONGOING_REQUESTS_HEADROOM = 1.25
T = TypeVar("T")
# Weight of the newest interval between two freed slots in the drain-rate average.
DRAIN_EWMA_ALPHA = 0.2
MIN_RETRY_AFTER_S = 1.0


class ModelGate:
    """At most `max_in_flight` requests pass; up to `max_queued` wait for a freed slot.

    A class's arrivals are turned away once the queue holds `shed_depth[class]` waiters, unless a
    strictly lower class is waiting: the newest of the lowest such class is evicted instead. A
    freed slot goes straight to the best waiting class, first come first served within it.
    """

    def __init__(
        self,
        model_id: str,
        *,
        max_in_flight: int,
        max_queued: int,
        queue_timeout_s: float,
        shed_depth: Mapping[Priority, int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_id = model_id
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self._queue_timeout_s = queue_timeout_s
        self._shed_depth = dict(shed_depth)
        self._clock = clock
        self._in_flight = 0
        self._waiting: dict[Priority, deque[asyncio.Future[None]]] = {p: deque() for p in PRIORITIES}
        self._depth = 0  # live waiters; cancelled ones stay in the deques until popped
        self._last_release: float | None = None
        self._release_interval_s: float | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def depth(self) -> int:
        return self._depth

    async def acquire(self, priority: Priority, deadline: float | None = None) -> None:
        """Take a slot, waiting at most until the queue timeout (then `Overloaded`) or the
        request's `deadline` in clock time (then `DeadlineExceeded`). Raises `Overloaded` when
        turned away or evicted."""
        if self._in_flight < self.max_in_flight and self._depth == 0:
            self._in_flight += 1
            return
        if self._depth >= self._shed_depth[priority] and not self._evict_below(priority):
            full = self._depth >= self.max_queued
            raise self._overloaded(
                "queue_full" if full else "priority_shed",
                f"Model {self.model_id} is at capacity"
                + ("" if full else f"; {priority} priority requests are shed first")
                + ". Retry later.",
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[priority].append(waiter)
        self._depth += 1
        timeout = self._queue_timeout_s
        deadline_binds = deadline is not None and deadline - self._clock() < timeout
        if deadline_binds:
            timeout = max(0.0, deadline - self._clock())
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        except asyncio.CancelledError:
            if not waiter.done():
                waiter.cancel()
                self._depth -= 1
            elif waiter.exception() is None:
                self.release()  # the slot arrived as the client left: hand it on
            raise
        if not waiter.done():
            waiter.cancel()
            self._depth -= 1
            if deadline_binds:
                raise DeadlineExceeded(
                    f"Model {self.model_id}: the request's timeout passed while it waited for capacity."
                )
            raise self._overloaded(
                "queue_timeout", f"Model {self.model_id}: no capacity within {timeout:.1f}s. Retry later."
            )
        waiter.result()  # raises Overloaded if this waiter was evicted

    def adopt_bounds(self, other: ModelGate) -> None:
        """Take `other`'s bounds and timeout (new live settings), keeping the requests in flight
        and waiting: a raised bound lets waiters in at once; a lowered one admits nobody new
        until enough requests have finished."""
        self.max_in_flight, self.max_queued = other.max_in_flight, other.max_queued
        self._queue_timeout_s, self._shed_depth = other._queue_timeout_s, dict(other._shed_depth)
        while self._in_flight < self.max_in_flight and self._hand_to_waiter():
            self._in_flight += 1

    def release(self) -> None:
        """Free a slot: it passes to the best waiter, or back to the pool."""
        self._note_release()
        # Above a lowered bound (live settings) a freed slot is not handed on.
        if self._in_flight > self.max_in_flight or not self._hand_to_waiter():
            self._in_flight -= 1

    def _hand_to_waiter(self) -> bool:
        """Give a slot to the best waiter; False if nobody waits."""
        for priority in PRIORITIES:
            queue = self._waiting[priority]
            while queue:
                waiter = queue.popleft()
                if waiter.done():  # cancelled or timed out; already counted out of the depth
                    continue
                self._depth -= 1
                waiter.set_result(None)
                return True
        return False

    def retry_after_s(self) -> float:
        """When a request arriving now would likely get a slot, from the observed drain rate."""
        if self._release_interval_s is None:
            return MIN_RETRY_AFTER_S
        wait = (self._depth + 1) * self._release_interval_s
        return min(max(wait, MIN_RETRY_AFTER_S), self._queue_timeout_s)

    def _evict_below(self, priority: Priority) -> bool:
        """Turn away the newest waiter of the lowest class below `priority`; False if none."""
        for lower in reversed(PRIORITIES[PRIORITIES.index(priority) + 1 :]):
            queue = self._waiting[lower]
            while queue:
                waiter = queue.pop()
                if waiter.done():
                    continue
                self._depth -= 1
                waiter.set_exception(
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


def model_max_in_flight(model: ModelConfig) -> int:
    """Requests of a model at its engines at once, for the whole app: configured, or what all
    its replicas (at most) take on."""
    if model.admission.max_in_flight is not None:
        return model.admission.max_in_flight
    autoscaling = model.replicas.autoscaling
    replicas = autoscaling.max_replicas if autoscaling else model.replicas.num_replicas
    return replica_max_ongoing(model) * replicas


def gate_for(model: ModelConfig, ingress_replicas: int) -> ModelGate:
    """This ingress replica's gate for `model`: an even share of the app-wide bounds."""
    settings = model.admission
    max_in_flight = model_max_in_flight(model)
    max_queued = max_in_flight if settings.max_queued is None else settings.max_queued
    share_in_flight = math.ceil(max_in_flight / ingress_replicas)
    share_queued = math.ceil(max_queued / ingress_replicas)
    return ModelGate(
        model.id,
        max_in_flight=share_in_flight,
        max_queued=share_queued,
        queue_timeout_s=settings.queue_timeout_s,
        shed_depth=shed_depths(share_queued, settings.shed_low_at, settings.shed_normal_at),
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
        affinity = settings.policy == "prefix_affinity"
        return RoutingKnobs(affinity, settings.prefix_chars, settings.max_imbalance)

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
