"""Per-key rate limits that hold exactly, for the whole application.

Each key has up to three limits: requests per minute and tokens per minute (token buckets that
refill continuously and hold at most one minute's worth), and concurrent requests. One
`RateLimiter` deployment (one replica) holds every bucket, so two ingress replicas cannot each
admit a full minute's worth.

A request reserves, at admission, one request and its worst case in tokens: the prompt estimate
plus n x max_tokens. So concurrent and streaming requests can never push a key past its limit.
When it ends (finished, failed or cancelled) the model server settles it with the engine's real
count; the unused part flows back, and a prompt the estimate undercounted is charged in full
(a non-streaming request cut short has no count yet: it is charged all it reserved). A
reservation nobody settles (its model replica died) is charged in full after a lease, so a lost
message never leaks a concurrency slot.

Keys are live settings: the ingress sends a key's limits with each reservation, and the limiter
brings that key's state in line (a bucket keeps its level, capped at a lowered limit). A key whose
limits did not change is untouched by any edit, so nobody gets a fresh minute from a colleague's
change, and the limiter never restarts for one.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from apps.config import ApiKey
from apps.errors import GatewayError, InvalidRequest, RateLimited

logger = logging.getLogger("ray.serve")
LimitKind = Literal["requests", "tokens"]
# A client retrying a concurrency rejection has nothing better to wait for.
CONCURRENCY_RETRY_AFTER_S = 1.0
FLOAT_SLACK_S = 1e-6
# A reservation nobody settled (its model replica died) is charged in full this long after the
# longest its request may take; requests without a timeout get an hour.
LEASE_MARGIN_S = 60.0
UNTIMED_REQUEST_S = 3600.0
DEFAULT_LEASE_S = UNTIMED_REQUEST_S + LEASE_MARGIN_S
COMPACT_SLACK = 1024


class TokenBucket:
    """`capacity` units, refilled at `capacity` per minute. The level may go below zero when a
    settled request used more than it reserved: the key then waits that debt off."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate_per_s = per_minute / 60.0
        self.level = self.capacity
        self._updated = now

    def resize(self, per_minute: int, now: float) -> None:
        """A new limit: the level so far is kept, capped at the new capacity."""
        self.refill(now)
        self.capacity = float(per_minute)
        self.rate_per_s = per_minute / 60.0
        self.level = min(self.level, self.capacity)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self._updated) * self.rate_per_s)
        self._updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until `amount` is available (after `refill`); inf if it never fits."""
        if amount > self.capacity:
            return math.inf
        wait = (amount - self.level) / self.rate_per_s
        # A client retrying exactly when told must not miss by a float rounding error.
        return wait if wait > FLOAT_SLACK_S else 0.0

    def reset_s(self) -> float:
        """Seconds until the bucket is full again (OpenAI's `x-ratelimit-reset-*`)."""
        return (self.capacity - self.level) / self.rate_per_s

    def state(self) -> LimitState:
        return LimitState(int(self.capacity), max(0, math.floor(self.level)), self.reset_s())


@dataclass(frozen=True)
class LimitState:
    """One limit as the `x-ratelimit-*` headers report it."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True)
class Decision:
    """The limiter's answer to a reservation. Rejected: `kind` names the limit, and
    `retry_after_s` is when it would admit the same request (inf: never, it is too large)."""

    reservation: str | None
    requests: LimitState | None = None
    tokens: LimitState | None = None
    kind: LimitKind | None = None
    message: str = ""
    retry_after_s: float = 0.0

    @property
    def admitted(self) -> bool:
        return self.reservation is not None


@dataclass
class _KeyState:
    requests: TokenBucket | None
    tokens: TokenBucket | None
    max_concurrent: int | None
    in_flight: int = 0

    @classmethod
    def new(cls, key: ApiKey, now: float) -> _KeyState:
        state = cls(None, None, None)
        state.apply(key, now)
        return state

    def apply(self, key: ApiKey, now: float) -> None:
        """Take `key`'s limits; a bucket whose limit is unchanged is left as it is."""
        self.requests = _bucket(self.requests, key.requests_per_minute, now)
        self.tokens = _bucket(self.tokens, key.tokens_per_minute, now)
        self.max_concurrent = key.max_concurrent_requests


def _bucket(bucket: TokenBucket | None, per_minute: int | None, now: float) -> TokenBucket | None:
    if per_minute is None:
        return None
    if bucket is None:
        return TokenBucket(per_minute, now)
    if bucket.capacity != per_minute:
        bucket.resize(per_minute, now)
    return bucket


@dataclass
class _Reservation:
    key: _KeyState
    tokens: int
    expires: float


class KeyLimits:
    """The bookkeeping, without Ray: reserve, settle, expire. `clock` is injectable for tests."""

    def __init__(
        self, keys: Iterable[ApiKey], lease_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._lease_s = lease_s
        now = clock()
        self._keys = {key.name: _KeyState.new(key, now) for key in keys}
        self._reservations: dict[str, _Reservation] = {}
        self._expiries: list[tuple[float, str]] = []  # a heap; settled entries are skipped

    def reserve(
        self,
        key_name: str,
        tokens: int,
        reservation: str | None = None,
        *,
        limits: ApiKey | None = None,
        lease_s: float | None = None,
    ) -> Decision:
        """Admit one request reserving `tokens`, or say which limit refuses it and until when.
        `reservation` is the caller's unique id for it (the ingress makes one, so it can settle
        a reservation whose answer it never received); None: a fresh one. `limits`: the key's
        current limits (live settings); None: those it had. `lease_s`: how long the reservation
        is held unsettled before it is charged in full; None: the limiter's default."""
        now = self._clock()
        self._expire(now)
        state = self._keys.get(key_name)
        if limits is not None:
            if state is None:
                state = self._keys[key_name] = _KeyState.new(limits, now)
            else:
                state.apply(limits, now)
        if state is None:
            raise KeyError(f"No limits known for key {key_name!r}.")
        for bucket in (state.requests, state.tokens):
            if bucket is not None:
                bucket.refill(now)
        snapshot = {
            "requests": state.requests.state() if state.requests else None,
            "tokens": state.tokens.state() if state.tokens else None,
        }
        if state.max_concurrent is not None and state.in_flight >= state.max_concurrent:
            return Decision(
                None,
                **snapshot,
                kind="requests",
                message=f"Too many concurrent requests for this key (limit {state.max_concurrent}).",
                retry_after_s=CONCURRENCY_RETRY_AFTER_S,
            )
        waits: list[tuple[float, LimitKind, str]] = []
        if state.requests is not None and state.requests.wait_s(1) > 0:
            waits.append(
                (state.requests.wait_s(1), "requests", f"{int(state.requests.capacity)} requests per minute")
            )
        if state.tokens is not None and state.tokens.wait_s(tokens) > 0:
            waits.append(
                (state.tokens.wait_s(tokens), "tokens", f"{int(state.tokens.capacity)} tokens per minute")
            )
        if waits:
            wait_s, kind, limit = max(waits)
            if math.isinf(wait_s):
                message = (
                    f"This request reserves {tokens} tokens (prompt estimate + n x max_tokens), more "
                    f"than the key's whole limit of {limit}: lower max_tokens or n."
                )
            else:
                message = f"Rate limit reached: {limit}. Retry in {wait_s:.1f}s."
            return Decision(None, **snapshot, kind=kind, message=message, retry_after_s=wait_s)

        if state.requests is not None:
            state.requests.level -= 1
        if state.tokens is not None:
            state.tokens.level -= tokens
        state.in_flight += 1
        reservation = reservation or uuid.uuid4().hex
        expires = now + (self._lease_s if lease_s is None else lease_s)
        self._reservations[reservation] = _Reservation(state, tokens, expires)
        heapq.heappush(self._expiries, (expires, reservation))
        return Decision(
            reservation,
            requests=state.requests.state() if state.requests else None,
            tokens=state.tokens.state() if state.tokens else None,
        )

    def settle(self, reservation: str, used_tokens: int | None) -> None:
        """End a reservation: refund what it did not use (None: it used all it reserved). A second
        settle of the same reservation does nothing."""
        now = self._clock()
        held = self._reservations.pop(reservation, None)
        if held is not None:
            self._release(held, held.tokens if used_tokens is None else used_tokens, now)
        self._expire(now)
        if len(self._expiries) > 2 * len(self._reservations) + COMPACT_SLACK:
            # Settled reservations leave their expiry behind; drop them before they pile up.
            self._expiries = [(held.expires, rid) for rid, held in self._reservations.items()]
            heapq.heapify(self._expiries)

    def in_flight(self, key_name: str) -> int:
        return self._keys[key_name].in_flight

    def _release(self, held: _Reservation, used_tokens: int, now: float) -> None:
        held.key.in_flight -= 1
        if held.key.tokens is not None:
            held.key.tokens.refill(now)
            held.key.tokens.level = min(
                held.key.tokens.capacity, held.key.tokens.level + held.tokens - used_tokens
            )

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, reservation = heapq.heappop(self._expiries)
            held = self._reservations.pop(reservation, None)
            if held is None:  # settled in time
                continue
            logger.warning("Reservation %s was never settled; charged in full.", reservation)
            self._release(held, held.tokens, now)


class RateLimiter:
    """The Serve deployment (one replica) that holds every key's limits for the application."""

    def __init__(self) -> None:
        self._limits = KeyLimits([], lease_s=DEFAULT_LEASE_S)

    async def reserve(
        self, key_name: str, tokens: int, reservation: str, limits: ApiKey, lease_s: float
    ) -> Decision:
        return self._limits.reserve(key_name, tokens, reservation, limits=limits, lease_s=lease_s)

    async def settle(self, reservation: str, used_tokens: int | None) -> None:
        self._limits.settle(reservation, used_tokens)


class Settler:
    """Sends settles to the limiter from tasks outside any request's context.

    Serve cancels the calls a request has made but not yet delivered when that request is
    cancelled (a client leaving), and a settle made on the way out is exactly such a call. A task
    started with an empty context belongs to no request, so its settle always goes out.
    """

    def __init__(self, limiter: Any) -> None:
        self._limiter = limiter
        self._tasks: set[asyncio.Task[None]] = set()

    def settle(self, reservation: str, used_tokens: int | None, delay_s: float = 0.0) -> asyncio.Task[None]:
        """Settle in the background (after `delay_s`); the task, for callers that want to wait."""
        task = asyncio.get_running_loop().create_task(
            self._send(reservation, used_tokens, delay_s), context=contextvars.Context()
        )
        self._tasks.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._tasks.discard)
        return task

    async def _send(self, reservation: str, used_tokens: int | None, delay_s: float) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        try:
            await self._limiter.settle.remote(reservation, used_tokens)
        except Exception as exc:  # the lease still ends the reservation
            logger.warning("Settling reservation %s failed: %r", reservation, exc)


def rate_limit_error(decision: Decision) -> GatewayError:
    """The answer to a refused reservation: 429 with `Retry-After`, or 400 for a request larger
    than the key's whole token limit (retrying it unchanged can never succeed)."""
    if math.isinf(decision.retry_after_s):
        return InvalidRequest(decision.message, param="max_tokens", code="exceeds_token_limit")
    return RateLimited(decision.message, kind=decision.kind or "requests", retry_after_s=decision.retry_after_s)


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    """OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the limits a key has."""
    headers = {}
    for kind, state in (("requests", decision.requests), ("tokens", decision.tokens)):
        if state is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = duration(state.reset_s)
    return headers


def duration(seconds: float) -> str:
    """A duration the way OpenAI writes it (Go's format): `120ms`, `1.5s`, `6m0s`, `1h1m0s`."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:g}s"
    hours, rest_ms = divmod(ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    return (f"{hours}h" if hours else "") + f"{minutes}m{rest_ms / 1000:g}s"


def reservation_lease_s(queue_timeout_s: float, request_timeout_s: float | None) -> float:
    """How long a model's unsettled reservation is held before it is charged in full."""
    return queue_timeout_s + (request_timeout_s or UNTIMED_REQUEST_S) + LEASE_MARGIN_S
