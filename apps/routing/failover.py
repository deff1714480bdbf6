"""Failover before the first token: what the ingress does when a model's replica is lost.

Serve's router retries a request on another replica only if the first never accepted it; a
replica that dies after accepting fails the call, and with no replica at all a call waits
without limit. So every model call starts with an `Accepted` message from the replica, and the
ingress bounds each phase on its own:

    call ──> Accepted within the queue deadline? ──no──> 503: engine_unavailable (no replica
      │                                                   running; Retry-After from the expected
      │ yes                                               replacement) or queue_timeout (full)
      v
    head (first token, or the whole answer) ──replica lost / engine dead──> call again (bounded)

A request whose replica dies before its head is sent again (to a live replica, or it waits for
the replacement within its queue deadline); the client sees no error. A replica that dies after
the head ends the stream with an error event.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from apps.errors import EngineUnavailable, GatewayError

# Calls of one request, the first included, before the ingress gives up on failing replicas.
MAX_ATTEMPTS = 3
# A retried call waits at least this long for a replica to accept it, even past the queue
# deadline: a live replica accepts within milliseconds.
RETRY_ACCEPT_GRACE_S = 1.0
# Retry-After when no replica of the model has been seen starting yet.
UNKNOWN_STARTUP_RETRY_AFTER_S = 30.0
MIN_RETRY_AFTER_S = 1.0


def is_replica_lost(failure: BaseException) -> bool:
    """Whether a model call failed because its replica (process or engine) is gone, so that the
    same request may succeed on another replica."""
    if isinstance(failure, GatewayError):
        return is_lost_replica_code(failure.code)
    return isinstance(failure, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError))


def is_lost_replica_code(code: str | None) -> bool:
    """Whether a model server's error answer (its OpenAI `code`) says its engine is gone."""
    return code == EngineUnavailable.code


class ReplicaWatch:
    """What one ingress replica knows of a model's replicas: how long one took to start (each
    replica says so when it accepts a call), and since when none has answered."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.startup_s: float | None = None
        self._lost_since: float | None = None

    def accepted(self, startup_s: float) -> None:
        """A replica accepted a call: the model is served."""
        self.startup_s = startup_s
        self._lost_since = None

    @property
    def in_outage(self) -> bool:
        """A replica was lost and none has accepted a call since."""
        return self._lost_since is not None

    def lost(self) -> None:
        """A call failed with its replica, or found no replica: a replacement is presumably starting."""
        if self._lost_since is None:
            self._lost_since = self._clock()

    def retry_after_s(self) -> float:
        """When a replacement replica is expected: its start time, less what has passed since
        the model was lost."""
        if self.startup_s is None:
            return UNKNOWN_STARTUP_RETRY_AFTER_S
        elapsed = self._clock() - (self._lost_since if self._lost_since is not None else self._clock())
        return max(MIN_RETRY_AFTER_S, self.startup_s - elapsed)
