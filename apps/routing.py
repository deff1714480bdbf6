"""Cache-aware routing: requests whose prompts start alike go to the same replica of their model,
where that prefix is already in the engine's KV cache, unless that replica is much busier.

A Ray Serve request router (`request_router_config`), run by the ingress's handle to each model.
The prompt's first `prefix_chars` characters pick a replica by rendezvous hashing: every replica
gets a score from (prefix, replica id), the highest wins. So the choice needs no shared state
(every ingress replica makes the same one), and adding or removing a replica moves only the
prefixes that replica wins or held. When the preferred replica has `max_imbalance` x its
`max_ongoing_requests` more requests than the least loaded one, the least loaded wins instead:
a cache hit saves a prefill, a long queue costs every token.

The knobs are live settings: each call carries its model's current ones (`ROUTING_KWARG`, a
`RoutingKnobs`); the router's own (`initialize_state`) are the defaults for calls without.

Both policies run here (`power_of_two` skips the prefix and leaves the choice to Serve's
least-loaded-of-two), so both honour the ingress's `avoid_replicas` hint: a request sent again
after its replica's engine died (`apps.failover`) goes to another replica while one exists, where
rendezvous hashing or a short queue would send it straight back.

Why not Ray's `PrefixCacheAffinityRouter`: it reads the prompt from request objects' `messages` or
`prompt` attributes (our calls carry a dict), keeps a character trie per replica in a shared
actor, and calls it with blocking `ray.get` from the handle's event loop.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from apps import tracing
from apps.endpoints import ENDPOINTS, EndpointSpec, first_prompt, message_text

# The prompt's start that must be identical for two requests to share a replica: about 128
# tokens, 8 KV blocks of 16. Shorter shared starts save little prefill.
DEFAULT_PREFIX_CHARS = 512
# How much busier than the least loaded replica the preferred one may be, as a share of a
# replica's max_ongoing_requests, before the least loaded wins.
DEFAULT_MAX_IMBALANCE = 0.25
# `ModelServer.generate(endpoint, body, ...)`'s first two arguments.
ENDPOINT_ARG, BODY_ARG = 0, 1
# `ModelServer.generate`'s keyword argument naming replicas this request must not go back to.
AVOID_KWARG = "avoid_replicas"
# `ModelServer.generate`'s keyword argument carrying the model's routing knobs (`RoutingKnobs`).
ROUTING_KWARG = "routing"
# `ModelServer.generate`'s keyword argument carrying the call's trace context (`apps.tracing`).
TRACE_KWARG = "trace"
# Why a request went where it went (the `route` span's `gateway.route.reason`).
PREFIX_AFFINITY = "prefix_affinity"  # the replica its prefix prefers, else the next of the ranking
IMBALANCE_FALLBACK = "imbalance_fallback"  # the preferred replica was too busy: the least loaded
POWER_OF_TWO = "power_of_two"  # prefix affinity off: the less loaded of two at random
LEAST_LOADED = "least_loaded"  # no text prompt to hash, or one replica: the least loaded


@dataclass(frozen=True)
class RoutingKnobs:
    """A model's routing settings (`apps.config.RoutingSettings`), as a call carries them."""

    prefix_affinity: bool = True
    prefix_chars: int = DEFAULT_PREFIX_CHARS
    max_imbalance: float = DEFAULT_MAX_IMBALANCE


class PrefixAffinityRouter(RequestRouter):
    """Routes by the prompt's prefix (rendezvous hashing), falling back to the least loaded."""

    def initialize_state(
        self,
        prefix_chars: int = DEFAULT_PREFIX_CHARS,
        max_imbalance: float = DEFAULT_MAX_IMBALANCE,
        prefix_affinity: bool = True,
    ) -> None:
        self._defaults = RoutingKnobs(prefix_affinity, prefix_chars, max_imbalance)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ranks, reason = self._rank(candidate_replicas, pending_request)
        trace = pending_request.kwargs.get(TRACE_KWARG) if pending_request is not None else None
        if trace is not None:
            attributes = {
                "gateway.route.reason": reason,
                "gateway.route.first_choice": [r.replica_id.unique_id for r in ranks[0]],
                "gateway.route.candidates": len(candidate_replicas),
            }
            tracing.child(trace, "route", attributes).end()
        return ranks

    def _rank(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None
    ) -> tuple[list[list[RunningReplica]], str]:
        """The replicas to try, best rank first (Serve takes the least loaded of a rank with
        room), and why."""
        knobs = self._defaults
        if pending_request is not None:
            candidate_replicas = without_avoided(candidate_replicas, pending_request.kwargs.get(AVOID_KWARG))
            # Not an isinstance check: Serve ships this router to the caller by value, so its
            # RoutingKnobs is another class object than the one the ingress imported.
            carried = pending_request.kwargs.get(ROUTING_KWARG)
            knobs = carried if carried is not None else knobs
        if not knobs.prefix_affinity:
            return [two_at_random(candidate_replicas)], POWER_OF_TWO  # Serve takes the less loaded
        prefix = prompt_prefix(pending_request, knobs.prefix_chars) if pending_request else ""
        if not prefix or len(candidate_replicas) < 2:
            return [candidate_replicas], LEAST_LOADED
        ranked = rank_by_prefix(prefix, candidate_replicas)
        preferred = ranked[0]
        loads = [self._replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas]
        known = [load for load in loads if load is not None]
        preferred_load = self._replica_queue_len_cache.get(preferred.replica_id)
        if known and preferred_load is not None:
            allowed = knobs.max_imbalance * preferred.max_ongoing_requests
            if preferred_load - min(known) > allowed:
                return [candidate_replicas], IMBALANCE_FALLBACK
        # The preferred replica if it has room, else the least loaded of the others.
        return [[preferred], ranked[1:]], PREFIX_AFFINITY


def two_at_random(replicas: list[RunningReplica]) -> list[RunningReplica]:
    """Power of two choices: two replicas drawn at random, in random order (Serve takes the
    less loaded, the first of equals: a fixed order would send every tie to one replica)."""
    return random.sample(replicas, min(2, len(replicas)))


def without_avoided(replicas: list[RunningReplica], avoid: object) -> list[RunningReplica]:
    """`replicas` less those the request must not go back to, unless that leaves none."""
    if not avoid:
        return replicas
    kept = [replica for replica in replicas if replica.replica_id.unique_id not in avoid]
    return kept or replicas


def rank_by_prefix(prefix: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """`replicas`, best first for `prefix` (rendezvous hashing; stable across processes)."""

    def score(replica: RunningReplica) -> int:
        return zlib.crc32(f"{replica.replica_id.unique_id}|{prefix}".encode())

    return sorted(replicas, key=score, reverse=True)


def prompt_prefix(request: PendingRequest, chars: int) -> str:
    """The first `chars` characters of a request's prompt: a conversation's messages in order
    (role and text), or a completion's prompt, after the `model` the body names (a model or a
    LoRA adapter); "" when there is none (token ids, no body)."""
    args = request.args
    endpoint = args[ENDPOINT_ARG] if len(args) > ENDPOINT_ARG else request.kwargs.get("endpoint")
    body = args[BODY_ARG] if len(args) > BODY_ARG else request.kwargs.get("body")
    if endpoint not in ENDPOINTS or not isinstance(body, dict):
        return ""
    text = prompt_text(ENDPOINTS[endpoint], body, chars)
    model = body.get("model")
    # A LoRA adapter's requests share a prefix with each other, not with the base model's (its
    # KV cache is its own), and keep to the replicas that loaded it.
    return f"{model}\n{text}" if text and isinstance(model, str) else text


def prompt_text(spec: EndpointSpec, body: dict[str, Any], chars: int) -> str:
    """The first `chars` characters of the body's conversation (role and text of each
    message), or of its first prompt (`apps.endpoints`)."""
    messages = spec.conversation(body)
    if messages is None:
        return first_prompt(spec, body)[:chars]
    parts: list[str] = []
    size = 0
    for message in messages:
        if size >= chars or not isinstance(message, dict):
            break
        text = f"{message.get('role')}:{message_text(message.get('content'))}\n"
        parts.append(text)
        size += len(text)
    return "".join(parts)[:chars]
