"""Cache-aware routing: the prompt text a request is routed by, the replica ranking, and the
fallback to the least loaded replica (pure logic). The cache-hit gain against Serve's default
router is measured on the real stack in tests/test_routing_cache.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from apps.routing import PrefixAffinityRouter, prompt_prefix, prompt_text, rank_by_prefix


@dataclass(frozen=True)
class FakeId:
    unique_id: str


@dataclass(frozen=True)
class FakeReplica:
    replica_id: FakeId
    max_ongoing_requests: int = 8


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
    assert prompt_text(body, 100) == "system:" + "S" * 10 + "\nuser:U\n"
    assert prompt_text(body, 5) == "syste"


def test_a_completion_is_routed_by_its_prompt():
    assert prompt_text({"prompt": "abcdef"}, 3) == "abc"
    assert prompt_text({"prompt": ["first", "second"]}, 100) == "first"
    assert prompt_text({"prompt": [1, 2, 3]}, 100) == ""


def test_no_body_means_no_prefix():
    assert prompt_prefix(FakePending(args=["chat"], kwargs={}), 10) == ""
    assert prompt_prefix(FakePending(args=["chat", "not a dict"], kwargs={}), 10) == ""


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
