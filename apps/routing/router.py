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

`precise_prefix` (`rank_by_cache`) goes further where the model's engines publish their KV-cache
events (`apps.routing.kv_index`): the prompt is tokenized as the engine will
(`apps.routing.prompt_tokens`), and the request goes to the replica whose engine holds the
longest run of the prompt's leading blocks when that run is at least half the prompt, else (a
prompt that shares only a preamble) to the replica whose cache holds the fewest blocks, among the
replicas within `max_imbalance` of the least loaded. It falls back to the prefix hash for a
prompt none of them holds the first block of, a prompt shorter than a block, a prompt or endpoint
it does not tokenize, and while no replica's events or the tokenizer are there yet; a replica
whose events are not (yet) in step takes part with an unknown cache.

All policies run here (`power_of_two` skips the prefix and leaves the choice to Serve's
least-loaded-of-two), so all honour the ingress's `avoid_replicas` hint: a request sent again
after its replica's engine died (`apps.routing.failover`) goes to another replica while one exists, where
rendezvous hashing or a short queue would send it straight back.

Why not Ray's `PrefixCacheAffinityRouter`: it reads the prompt from request objects' `messages` or
`prompt` attributes (our calls carry a dict), keeps a character trie per replica in a shared
actor, and calls it with blocking `ray.get` from the handle's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import weakref
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from apps.endpoints import ENDPOINTS, EndpointSpec, first_prompt, message_text
from apps.observability import tracing
from apps.routing.kv_index import (
    BLOCK_SIZE_STAT,
    KV_EVENTS_STAT,
    TOKENIZER_STAT,
    BlockHash,
    prompt_block_hashes,
    shared_subscriber,
)
from apps.routing.prompt_tokens import loaded_tokenizer, prompt_token_ids

logger = logging.getLogger("ray.serve")

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
# `ModelServer.generate`'s keyword argument carrying the call's trace context (`apps.observability.tracing`).
TRACE_KWARG = "trace"
# `ModelServer.generate`'s keyword argument naming the LoRA adapter a call runs (`LoraAdapter`).
ADAPTER_KWARG = "adapter"
# precise_prefix: the share of a prompt's blocks some replica must hold for the request to follow
# the longest cached run; below it, the prompt is new (or shares only a preamble) and goes to the
# emptiest cache. SGLang's router defaults its `cache_threshold` to the same 0.5.
CACHED_SHARE_TO_FOLLOW = 0.5
# Requests whose prompt blocks are kept while Serve retries their routing (it calls
# `choose_replicas` again while every replica is full): tokenized once each.
PROMPT_BLOCKS_KEPT = 1024
# Why a request went where it went (the `route` span's `gateway.route.reason`).
PREFIX_AFFINITY = "prefix_affinity"  # the replica its prefix prefers, else the next of the ranking
PRECISE_PREFIX = "precise_prefix"  # the replica caching most of the prompt's leading blocks
IMBALANCE_FALLBACK = "imbalance_fallback"  # the preferred replica was too busy: the least loaded
POWER_OF_TWO = "power_of_two"  # prefix affinity off: the less loaded of two at random
LEAST_LOADED = "least_loaded"  # no text prompt to hash, or one replica: the least loaded


@dataclass(frozen=True)
class RoutingKnobs:
    """A model's routing settings (`apps.config.RoutingSettings`), as a call carries them."""

    prefix_affinity: bool = True
    prefix_chars: int = DEFAULT_PREFIX_CHARS
    max_imbalance: float = DEFAULT_MAX_IMBALANCE
    precise_prefix: bool = False  # route on the engines' KV-cache events where they publish them


@dataclass(frozen=True)
class CachedPrefixes:
    """A prompt's full KV blocks (`apps.routing.kv_index` hashes), how many of the leading ones each
    replica's engine holds, and how full each one's cache is (by replica id)."""

    blocks: list[BlockHash]
    cached: dict[str, int]
    occupancy: dict[str, int]  # blocks each replica's cache holds in all
    # Replicas missing from both are out of step: their caches are unknown.


class PrefixAffinityRouter(RequestRouter):
    """Routes by the prompt's prefix (rendezvous hashing), falling back to the least loaded."""

    def initialize_state(
        self,
        prefix_chars: int = DEFAULT_PREFIX_CHARS,
        max_imbalance: float = DEFAULT_MAX_IMBALANCE,
        prefix_affinity: bool = True,
    ) -> None:
        self._defaults = RoutingKnobs(prefix_affinity, prefix_chars, max_imbalance)
        self._prompt_blocks_kept: OrderedDict[int, tuple[weakref.ref, list[BlockHash]]] = OrderedDict()
        self._precise_logged = False  # "routing on KV-cache events" is logged once per router
        self._following = False  # whether this router follows replicas' KV events (`apps.routing.kv_index`)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        cached = None
        if pending_request is not None and getattr(self._knobs(pending_request), "precise_prefix", False):
            try:
                cached = await self._cached_prefixes(candidate_replicas, pending_request)
            except Exception:  # Serve drops a request whose routing raised: use the prefix hash
                logger.exception("Precise-prefix routing failed; routing by the prefix hash")
        ranks, reason = self._rank(candidate_replicas, pending_request, cached)
        trace = pending_request.kwargs.get(TRACE_KWARG) if pending_request is not None else None
        if trace is not None:
            attributes = {
                "gateway.route.reason": reason,
                "gateway.route.first_choice": [r.replica_id.unique_id for r in ranks[0]],
                "gateway.route.candidates": len(candidate_replicas),
            }
            tracing.child(trace, "route", attributes).end()
        return ranks

    def _knobs(self, pending_request: PendingRequest | None) -> RoutingKnobs:
        """The knobs the call carries, else the router's defaults. Not an isinstance check: Serve
        ships this router to the caller by value, so its RoutingKnobs is another class object
        than the one the ingress imported."""
        carried = pending_request.kwargs.get(ROUTING_KWARG) if pending_request is not None else None
        return carried if carried is not None else self._defaults

    def _rank(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None,
        cached: CachedPrefixes | None = None,
    ) -> tuple[list[list[RunningReplica]], str]:
        """The replicas to try, best rank first (Serve takes the least loaded of a rank with
        room), and why. `cached`: what each replica holds of the prompt (precise_prefix)."""
        knobs = self._knobs(pending_request)
        if pending_request is not None:
            candidate_replicas = without_avoided(candidate_replicas, pending_request.kwargs.get(AVOID_KWARG))
        if not knobs.prefix_affinity:
            return [two_at_random(candidate_replicas)], POWER_OF_TWO  # Serve takes the less loaded
        if len(candidate_replicas) < 2:
            return [candidate_replicas], LEAST_LOADED
        loads = {
            r.replica_id.unique_id: self._replica_queue_len_cache.get(r.replica_id)
            for r in candidate_replicas
        }
        if cached is not None:
            ranks = rank_by_cache(cached, candidate_replicas, loads, knobs.max_imbalance)
            if ranks is not None:
                return ranks, PRECISE_PREFIX
        prefix = prompt_prefix(pending_request, knobs.prefix_chars) if pending_request else ""
        if not prefix:
            return [candidate_replicas], LEAST_LOADED
        ranked = rank_by_prefix(prefix, candidate_replicas)
        preferred = ranked[0]
        known = [load for load in loads.values() if load is not None]
        preferred_load = loads[preferred.replica_id.unique_id]
        if known and preferred_load is not None:
            allowed = knobs.max_imbalance * preferred.max_ongoing_requests
            if preferred_load - min(known) > allowed:
                return [candidate_replicas], IMBALANCE_FALLBACK
        # The preferred replica if it has room, else the least loaded of the others.
        return [[preferred], ranked[1:]], PREFIX_AFFINITY

    async def _cached_prefixes(
        self, candidate_replicas: list[RunningReplica], request: PendingRequest
    ) -> CachedPrefixes | None:
        """How much of the request's prompt each in-step candidate's engine holds; None (route by
        the prefix hash) while no replica's events, or the tokenizer or block size, are known, or
        when the prompt is not one this router tokenizes."""
        subscriber = shared_subscriber()
        # Every replica of the model, not just this call's candidates: what one follows is kept.
        replicas = list(getattr(self, "_replicas", {}).values()) or candidate_replicas
        endpoints = {r.replica_id.unique_id: (r.routing_stats or {}).get(KV_EVENTS_STAT) for r in replicas}
        if not self._following:
            # A router of a deleted model stops following its replicas when it is collected.
            weakref.finalize(self, subscriber.unfollow, str(id(self)))
            self._following = True
        subscriber.follow(str(id(self)), {rid: endpoint for rid, endpoint in endpoints.items() if endpoint})
        ids = [r.replica_id.unique_id for r in candidate_replicas]
        # Replicas out of step (just started, or their engine lost events) take part with an
        # unknown cache: no run cached, never the emptiest.
        in_step = [r for r in candidate_replicas if endpoints.get(r.replica_id.unique_id)]
        in_step = [r for r in in_step if subscriber.in_step(r.replica_id.unique_id)]
        if len(ids) < 2 or not in_step:
            return None
        stats = in_step[0].routing_stats or {}
        tokenizer = loaded_tokenizer(stats[TOKENIZER_STAT]) if TOKENIZER_STAT in stats else None
        block_size = stats.get(BLOCK_SIZE_STAT)
        if tokenizer is None or not block_size:
            return None
        if not self._precise_logged and len(in_step) == len(ids):
            self._precise_logged = True
            logger.info("Routing on the KV-cache events of %d replicas (precise_prefix)", len(ids))
        blocks = await self._prompt_blocks(request, tokenizer, int(block_size))
        if not blocks:
            return None
        index = subscriber.index
        known = [r.replica_id.unique_id for r in in_step]
        return CachedPrefixes(
            blocks,
            {rid: index.cached_blocks(rid, blocks) for rid in known},
            {rid: index.held_blocks(rid) for rid in known},
        )

    async def _prompt_blocks(
        self, request: PendingRequest, tokenizer: Any, block_size: int
    ) -> list[BlockHash]:
        """The prompt's full blocks, tokenized off the event loop once per request."""
        # Keyed by the request object (Serve passes the same one to every pass), not by its
        # request id, which the client's x-request-id sets.
        key = id(request)
        kept = self._prompt_blocks_kept.get(key)
        if kept is not None and kept[0]() is request:
            return kept[1]
        endpoint, body = request_endpoint_body(request)
        token_ids = None
        if isinstance(endpoint, str) and isinstance(body, dict):
            token_ids = await asyncio.to_thread(prompt_token_ids, tokenizer, endpoint, body)
        adapter = request.kwargs.get(ADAPTER_KWARG)
        # vLLM keys an adapter's blocks by its name (`BlockStored.extra_keys`).
        extra = (adapter.name,) if adapter is not None else None
        blocks = prompt_block_hashes(token_ids, block_size, extra) if token_ids else []
        self._prompt_blocks_kept[key] = (weakref.ref(request), blocks)
        if len(self._prompt_blocks_kept) > PROMPT_BLOCKS_KEPT:
            self._prompt_blocks_kept.popitem(last=False)
        return blocks


def rank_by_cache(
    cached: CachedPrefixes,
    replicas: list[RunningReplica],
    loads: dict[str, int | None],
    max_imbalance: float,
) -> list[list[RunningReplica]] | None:
    """The precise-prefix ranking, among the replicas within `max_imbalance` x their
    max_ongoing_requests of the least loaded (then the rest); None (the prefix hash places it)
    when none of them holds the prompt's first block:
    - a prompt of which some replica holds at least `CACHED_SHARE_TO_FOLLOW` of the blocks goes
      to the replica holding the longest run;
    - any other prompt (sharing only a preamble) goes to the replica whose cache holds the
      fewest blocks, so new prefixes spread over the caches instead of piling onto the one
      replica that computed a common preamble first (SGLang's cache-aware router does the same
      with its `cache_threshold`);
    - equals are ranked by rendezvous hashing on the first block past the longest run, so every
      ingress replica agrees and a tenant's requests stay together."""
    known = [load for load in loads.values() if load is not None]
    floor = min(known, default=0)

    def within_reach(replica: RunningReplica) -> bool:
        load = loads.get(replica.replica_id.unique_id)
        return load is None or load - floor <= max_imbalance * replica.max_ongoing_requests

    def held(replica: RunningReplica) -> int:
        return cached.cached.get(replica.replica_id.unique_id, 0)

    def occupancy(replica: RunningReplica) -> float:  # unknown (out of step): never the emptiest
        return cached.occupancy.get(replica.replica_id.unique_id, math.inf)

    reachable = [r for r in replicas if within_reach(r)] or replicas
    best = max(held(r) for r in reachable)
    if best == 0:
        return None
    past = cached.blocks[min(best, len(cached.blocks) - 1)]

    def rendezvous(replica: RunningReplica) -> int:
        return zlib.crc32(f"{replica.replica_id.unique_id}|{past}".encode())

    if best >= CACHED_SHARE_TO_FOLLOW * len(cached.blocks):
        ordered = sorted(reachable, key=lambda r: (held(r), rendezvous(r)), reverse=True)
    else:
        ordered = sorted(reachable, key=lambda r: (-occupancy(r), rendezvous(r)), reverse=True)
    rest = sorted((r for r in replicas if r not in reachable), key=held, reverse=True)
    return [[ordered[0]], ordered[1:] + rest]


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
    endpoint, body = request_endpoint_body(request)
    if endpoint not in ENDPOINTS or not isinstance(body, dict):
        return ""
    text = prompt_text(ENDPOINTS[endpoint], body, chars)
    model = body.get("model")
    # A LoRA adapter's requests share a prefix with each other, not with the base model's (its
    # KV cache is its own), and keep to the replicas that loaded it.
    return f"{model}\n{text}" if text and isinstance(model, str) else text


def request_endpoint_body(request: PendingRequest) -> tuple[Any, Any]:
    """The endpoint and body a `ModelServer.generate` call carries."""
    args = request.args
    endpoint = args[ENDPOINT_ARG] if len(args) > ENDPOINT_ARG else request.kwargs.get("endpoint")
    body = args[BODY_ARG] if len(args) > BODY_ARG else request.kwargs.get("body")
    return endpoint, body


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
