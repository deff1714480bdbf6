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


# Where `apps.admission.capacity` keeps each model's engine KV capacity (this module may import nothing of
# the gateway's; tests/test_replica_policy.py checks the two agree).
CAPACITY_KEY_PREFIX = "engine-capacity/"
CAPACITY_NAMESPACE = "llm-gateway"


def publish_sizing(sizing: dict[str, dict[str, float]]) -> None:
    """Make `sizing` ({model id: its SIZING_FIELDS}) the models' live sizing."""
    from ray.experimental.internal_kv import _internal_kv_put

    value = {"published_at": time.time(), "models": sizing}
    _internal_kv_put(SIZING_KEY, json.dumps(value).encode(), overwrite=True, namespace=SIZING_NAMESPACE)


def read_sizing() -> dict[str, Any] | None:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(SIZING_KEY, namespace=SIZING_NAMESPACE)
    return json.loads(raw) if raw else None


def read_kv_sequences(model_id: str, typical_tokens: int) -> tuple[int, int] | None:
    """(requests of `typical_tokens` the model's engine KV cache holds, its max_num_seqs), as
    its replicas published them (`apps.admission.capacity`); None before any did."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(f"{CAPACITY_KEY_PREFIX}{model_id}".encode(), namespace=CAPACITY_NAMESPACE)
    if not raw:
        return None
    value = json.loads(raw)
    batch = int(value["max_num_seqs"])
    return max(1, min(batch, int(value["kv_cache_tokens"]) // typical_tokens)), batch


def kv_sized(sizing: dict[str, float], kv: tuple[int, int] | None) -> dict[str, float]:
    """`sizing` with its target scaled by the share of the batch the KV cache holds (`kv`: what
    `read_kv_sequences` gives), when the sizing asks for it (`typical_request_tokens`)."""
    if kv is None or not sizing.get("typical_request_tokens"):
        return sizing
    sequences, batch = kv
    target = max(1.0, sizing["target_ongoing_requests"] * sequences / batch)
    return sizing | {"target_ongoing_requests": target}


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
        self._kv: tuple[int, int] | None = None  # what the engine's KV cache holds (`read_kv_sequences`)

    def sizing(self) -> dict[str, float]:
        """The published sizing if it is newer than this deployment's build, else the build's;
        its target sized by the engines' KV capacity where it asks for that."""
        if time.monotonic() - self._read_at >= SIZING_READ_INTERVAL_S:
            self._read_at = time.monotonic()
            self._read()
        return kv_sized(self._live or self._built, self._kv)

    def _read(self) -> None:
        """Read the published sizing, then the engines' KV capacity if it asks for it; what
        cannot be read (the GCS busy, say) stays as read last."""
        try:
            published = read_sizing()
        except Exception:
            pass
        else:
            if isinstance(published, dict) and isinstance(published.get("models"), dict):
                fresh = published.get("published_at", -math.inf) >= self._built_at
                self._live = valid_sizing(published["models"].get(self._model_id)) if fresh else None
        typical = (self._live or self._built).get("typical_request_tokens")
        if typical:
            try:
                self._kv = read_kv_sequences(self._model_id, int(typical))
            except Exception:
                logger.warning("Model %s: reading its engines' KV capacity failed", self._model_id)

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
