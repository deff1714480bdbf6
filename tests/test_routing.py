"""Cache-aware routing: the prompt text a request is routed by, the replica ranking, and the
fallback to the least loaded replica (pure logic). The cache-hit gain against Serve's default
router is measured on the real stack in tests/test_routing_cache.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from apps.endpoints import ENDPOINTS
from apps.routing.router import (
    AVOID_KWARG,
    ROUTING_KWARG,
    PrefixAffinityRouter,
    RoutingKnobs,
    prompt_prefix,
    prompt_text,
    rank_by_prefix,
    two_at_random,
    without_avoided,
)


@dataclass(frozen=True)
class FakeId:
    unique_id: str


@dataclass(frozen=True)
class FakeReplica:
    replica_id: FakeId
    max_ongoing_requests: int = 8
    routing_stats: dict = field(default_factory=dict, hash=False, compare=False)  # `record_routing_stats`


@dataclass
class FakePending:
    args: list
    kwargs: dict


class FakeQueueLengths:
    def __init__(self, loads: dict[str, int | None]) -> None:
        self.loads = loads

    def get(self, replica_id: FakeId) -> int | None:
        return self.loads.get(replica_id.unique_id)


REPLICAS = [FakeReplica(FakeId(name)) for name in ("r1", "r2", "r3")]


def router(loads: dict[str, int | None], max_imbalance: float = 0.25) -> PrefixAffinityRouter:
    # The routing decision only: Serve's machinery around it is not needed here.
    instance = object.__new__(PrefixAffinityRouter)
    instance.initialize_state(prefix_chars=64, max_imbalance=max_imbalance)
    instance._replica_queue_len_cache = FakeQueueLengths(loads)
    return instance


def chat(system: str, user: str = "question") -> FakePending:
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    return FakePending(args=["chat", body, None, "anonymous"], kwargs={})


def choose(instance: PrefixAffinityRouter, request: FakePending) -> list[list[FakeReplica]]:
    return asyncio.run(instance.choose_replicas(REPLICAS, request))


def test_a_chat_is_routed_by_its_messages_in_order():
    body = {"messages": [{"role": "system", "content": "S" * 10}, {"role": "user", "content": [{"type": "text", "text": "U"}]}]}
    assert prompt_text(ENDPOINTS["chat"], body, 100) == "system:" + "S" * 10 + "\nuser:U\n"
    assert prompt_text(ENDPOINTS["chat"], body, 5) == "syste"


def test_a_completion_is_routed_by_its_prompt():
    completion = ENDPOINTS["completion"]
    assert prompt_text(completion, {"prompt": "abcdef"}, 3) == "abc"
    assert prompt_text(completion, {"prompt": ["first", "second"]}, 100) == "first"
    assert prompt_text(completion, {"prompt": [1, 2, 3]}, 100) == ""
    assert prompt_text(ENDPOINTS["embeddings"], {"input": ["first", "second"]}, 100) == "first"
    assert prompt_text(ENDPOINTS["rerank"], {"query": "q", "documents": ["d"]}, 100) == "q"


def test_responses_and_messages_are_routed_by_their_turns_like_a_chat():
    """The same conversation reaches the same prefix through every endpoint that carries one."""
    responses = {"instructions": "Be brief.", "input": [{"role": "user", "content": "Hi"}]}
    messages = {"system": "Be brief.", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    chat_body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    expected = "system:Be brief.\nuser:Hi\n"
    for endpoint, body in (("responses", responses), ("messages", messages), ("chat", chat_body)):
        assert prompt_prefix(FakePending(args=[endpoint, body], kwargs={}), 100) == expected
    text_input = {"input": "Hi"}
    assert prompt_prefix(FakePending(args=["responses", text_input], kwargs={}), 100) == "user:Hi\n"


def test_an_adapters_requests_share_a_prefix_apart_from_their_base_models():
    base = {"model": "tiny-chat", "prompt": "Once upon a time"}
    adapter = base | {"model": "tiny-chat-lora"}
    prefixes = [prompt_prefix(FakePending(args=["completion", body], kwargs={}), 100) for body in (base, adapter)]
    assert prefixes == ["tiny-chat\nOnce upon a time", "tiny-chat-lora\nOnce upon a time"]
    assert prompt_prefix(FakePending(args=["completion", {"model": "m", "prompt": [1, 2]}], kwargs={}), 100) == ""


def test_no_body_means_no_prefix():
    assert prompt_prefix(FakePending(args=["chat"], kwargs={}), 10) == ""
    assert prompt_prefix(FakePending(args=["chat", "not a dict"], kwargs={}), 10) == ""
    assert prompt_prefix(FakePending(args=["no such endpoint", {"prompt": "p"}], kwargs={}), 10) == ""


def test_the_ranking_is_a_function_of_prefix_and_replica_ids_only():
    ranked = rank_by_prefix("some prefix", REPLICAS)
    assert rank_by_prefix("some prefix", list(reversed(REPLICAS))) == ranked
    winners = {rank_by_prefix(f"prefix {i}", REPLICAS)[0].replica_id.unique_id for i in range(50)}
    assert winners == {"r1", "r2", "r3"}, "prefixes spread over all replicas"


def test_removing_a_replica_moves_only_the_prefixes_it_won():
    prefixes = [f"prefix {i}" for i in range(200)]
    before = {p: rank_by_prefix(p, REPLICAS)[0] for p in prefixes}
    after = {p: rank_by_prefix(p, REPLICAS[:2])[0] for p in prefixes}
    moved = [p for p in prefixes if before[p] != after[p]]
    assert moved and all(before[p] == REPLICAS[2] for p in moved)


def test_requests_sharing_a_prefix_prefer_the_same_replica_then_the_others():
    instance = router({"r1": 1, "r2": 1, "r3": 1})
    system = "You are the support assistant of Example Corp. " * 3
    first = choose(instance, chat(system, "where is my order?"))
    second = choose(instance, chat(system, "a different question"))
    assert first == second
    assert len(first) == 2 and len(first[0]) == 1 and set(first[0] + first[1]) == set(REPLICAS)


@pytest.mark.parametrize(
    ("preferred_load", "routed_by_prefix"),
    [(2, True), (3, True), (4, False), (None, True)],
)
def test_a_much_busier_preferred_replica_is_passed_over(preferred_load, routed_by_prefix):
    request = chat("You are the support assistant of Example Corp. " * 3)
    preferred = rank_by_prefix(prompt_prefix(request, 64), REPLICAS)[0].replica_id.unique_id
    loads = {name: 1 for name in ("r1", "r2", "r3")} | {preferred: preferred_load}
    # max_ongoing_requests 8 x 0.25: up to 2 more than the least loaded keeps the preference.
    groups = choose(router(loads), request)
    assert (len(groups) == 2) == routed_by_prefix, groups
    if not routed_by_prefix:
        assert groups == [REPLICAS], "the least loaded of all"


def test_a_request_without_a_prompt_goes_to_the_least_loaded():
    assert choose(router({}), FakePending(args=["chat", {}], kwargs={})) == [REPLICAS]


def test_a_request_sent_again_avoids_the_replicas_that_failed_it_while_others_exist():
    replicas = [FakeReplica(FakeId(name)) for name in ("a", "b", "c")]
    assert [r.replica_id.unique_id for r in without_avoided(replicas, frozenset({"a", "c"}))] == ["b"]
    assert without_avoided(replicas, frozenset()) == replicas
    assert without_avoided(replicas, frozenset({"a", "b", "c"})) == replicas, "none left: all of them"


def test_power_of_two_draws_two_distinct_replicas():
    replicas = [FakeReplica(FakeId(name)) for name in "abcdef"]
    for _ in range(50):
        drawn = two_at_random(replicas)
        assert len(drawn) == 2 and drawn[0] is not drawn[1]
    assert {r.replica_id.unique_id for _ in range(200) for r in two_at_random(replicas)} == set("abcdef")
    pair = replicas[:2]
    firsts = {two_at_random(pair)[0].replica_id.unique_id for _ in range(100)}
    assert firsts == {"a", "b"}, "with two replicas, either may come first (ties are broken by order)"


def test_the_router_never_sends_a_request_back_to_a_replica_it_must_avoid():
    instance = router({"r1": 0, "r2": 0, "r3": 0})
    request = chat("same system prompt " * 10)
    (preferred,) = choose(instance, request)[0]
    request.kwargs[AVOID_KWARG] = frozenset({preferred.replica_id.unique_id})
    groups = choose(instance, request)
    assert all(preferred not in group for group in groups), groups


def test_without_prefix_affinity_the_router_offers_two_replicas_at_random():
    instance = router({"r1": 0, "r2": 0, "r3": 0})
    instance.initialize_state(prefix_affinity=False)
    (offered,) = choose(instance, chat("s" * 100))
    assert len(offered) == 2 and offered[0] != offered[1]


def test_knobs_carried_by_the_call_override_the_routers_own():
    """Routing settings are live: each call carries its model's current ones."""
    instance = router({"r1": 0, "r2": 0, "r3": 0})  # prefix affinity by default
    request = chat("s" * 100)
    assert len(choose(instance, request)) == 2, "prefix affinity: the preferred, then the rest"
    request.kwargs[ROUTING_KWARG] = RoutingKnobs(prefix_affinity=False)
    (offered,) = choose(instance, request)
    assert len(offered) == 2 and offered[0] != offered[1], "power of two, as the call says"
    # Serve ships the router to the ingress by value: the knobs the ingress makes are of another
    # RoutingKnobs class than the router's, and must be honoured all the same.
    request.kwargs[ROUTING_KWARG] = SimpleNamespace(prefix_affinity=False, prefix_chars=64, max_imbalance=0.25)
    (offered,) = choose(instance, request)
    assert len(offered) == 2 and offered[0] != offered[1]
