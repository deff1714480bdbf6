"""The Serve autoscaling policy of every model deployment: replica counts and autoscaling bounds
that apply live.

Serve fixes a deployment's `num_replicas` and `autoscaling_config` when its application is built,
and a model application is rebuilt only by an engine change, which rolls its replicas. So every
model deployment autoscales under this policy, inside bounds Serve never reaches (0 and
`REPLICA_CEILING`), and the policy reads the model's sizing (a fixed count is min = max) from
Ray's internal KV store, where the live settings' builder puts it once it has validated an edit
(`publish_sizing`). A bound that moves applies within about a second (`SIZING_READ_INTERVAL_S`);
demand moves the count only after it has held for the upscale or downscale delay, which this
policy counts itself (Serve's own delays are set to 0, or they would delay a bound change too).
While a model has no replica running and requests wait, Serve's cold-start path starts one
without asking the policy.

Serve runs the policy in its controller, unpickled by value: this module imports nothing of the
gateway's, so the controller needs no `apps` package.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

logger = logging.getLogger("ray.serve")

# Serve's own bounds for a model deployment; the live ones lie inside.
REPLICA_CEILING = 1000
SIZING_KEY = b"replica-sizing"
SIZING_NAMESPACE = "llm-gateway"
# How long the policy keeps what it read (Serve calls it every control-loop tick, ~0.1 s).
SIZING_READ_INTERVAL_S = 1.0
# Keys of a model's sizing, as `publish_sizing` writes them and the policy's kwargs carry them.
SIZING_FIELDS = (
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
)


def publish_sizing(sizing: dict[str, dict[str, float]]) -> None:
    """Make `sizing` ({model id: its SIZING_FIELDS}) the models' live sizing."""
    from ray.experimental.internal_kv import _internal_kv_put

    value = {"published_at": time.time(), "models": sizing}
    _internal_kv_put(SIZING_KEY, json.dumps(value).encode(), overwrite=True, namespace=SIZING_NAMESPACE)


def read_sizing() -> dict[str, Any] | None:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(SIZING_KEY, namespace=SIZING_NAMESPACE)
    return json.loads(raw) if raw else None


def decide(
    sizing: dict[str, float],
    target: int,
    running: int,
    ongoing: float,
    now: float,
    state: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    """The replica count to aim for, and the policy's state for the next tick.

    `target`: the count Serve aims for now; `running`: replicas running; `ongoing`: requests at
    the model (Serve's average over its look-back window); `state`: what the last tick returned.
    """
    low, high = int(sizing["min_replicas"]), int(sizing["max_replicas"])
    if not low <= target <= high:  # a bound moved: at once
        return min(max(target, low), high), {}
    if running == 0:  # nothing to measure demand on (Serve starts a first replica on demand)
        return target, {}
    wanted = min(max(math.ceil(ongoing / sizing["target_ongoing_requests"]), low), high)
    if wanted == target:
        return target, {}
    direction = "up" if wanted > target else "down"
    since = state.get("since", now) if state.get("direction") == direction else now
    delay_s = sizing["upscale_delay_s"] if direction == "up" else sizing["downscale_delay_s"]
    if now - since >= delay_s:
        return wanted, {}
    return target, {"direction": direction, "since": since}


def valid_sizing(entry: Any) -> dict[str, float] | None:
    """`entry` if it is a model's sizing as `publish_sizing` writes it, else None."""
    if not isinstance(entry, dict):
        return None
    values = [entry.get(field) for field in SIZING_FIELDS]
    if not all(isinstance(value, (int, float)) and value >= 0 for value in values):
        return None
    if entry["min_replicas"] > entry["max_replicas"] or entry["target_ongoing_requests"] <= 0:
        return None
    return entry


class LiveSizingPolicy:
    """Serve's policy object for one model deployment (Serve builds it with `policy_kwargs`).
    It runs in Serve's controller, where an exception would hold up every application's update:
    whatever goes wrong keeps the current count."""

    def __init__(self, model_id: str, sizing: dict[str, float], built_at: float) -> None:
        self._model_id = model_id
        self._built = sizing
        self._built_at = built_at
        self._live: dict[str, float] | None = None
        self._read_at = -math.inf  # time.monotonic()

    def sizing(self) -> dict[str, float]:
        """The published sizing if it is newer than this deployment's build, else the build's."""
        if time.monotonic() - self._read_at >= SIZING_READ_INTERVAL_S:
            self._read_at = time.monotonic()
            try:
                published = read_sizing()
            except Exception:  # the GCS busy, say: keep what was read last
                return self._live or self._built
            if isinstance(published, dict) and isinstance(published.get("models"), dict):
                fresh = published.get("published_at", -math.inf) >= self._built_at
                self._live = valid_sizing(published["models"].get(self._model_id)) if fresh else None
        return self._live or self._built

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        try:
            state = {k: v for k, v in ctx.policy_state.items() if k in ("direction", "since")}
            return decide(
                self.sizing(),
                ctx.target_num_replicas,
                ctx.current_num_replicas,
                ctx.total_num_requests,
                time.time(),
                state,
            )
        except Exception:
            logger.exception("Model %s: replica sizing failed; keeping the current count", self._model_id)
            return ctx.target_num_replicas, {}
