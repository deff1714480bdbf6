"""The index of what each replica's engine caches, built from vLLM's KV-cache events, and the
precise-prefix ranking on it (pure logic, and the mirror-to-subscriber hop over real ZMQ sockets).
Event dicts are shaped as vLLM 0.32 publishes them (msgpack-decoded `BlockStored`, `BlockRemoved`,
`AllBlocksCleared`); real engines are exercised in tests/test_routing_cache.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from apps.routing.kv_index import (
    REMOVED,
    SNAPSHOT,
    STALE_AFTER_S,
    STORED,
    EngineBlocks,
    KVCacheMirror,
    KVEventSubscriber,
    KVIndex,
    prompt_block_hashes,
)
from apps.routing.prompt_tokens import prompt_token_ids
from apps.routing.router import CachedPrefixes, PrefixAffinityRouter, RoutingKnobs, rank_by_cache
from tests.conftest import ROOT, TINY_CHAT
from tests.test_routing import FakeId, FakePending, FakeReplica

BLOCK = 4


def stored(hashes: list[int], parent: int | None, tokens: list[int], extra_keys=None) -> dict:
    event = {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": BLOCK,
        "medium": "GPU",
        "group_idx": 0,
    }
    if extra_keys is not None:
        event["extra_keys"] = extra_keys
    return event


def removed(hashes: list[int]) -> dict:
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}


PROMPT = list(range(100, 114))  # 3 full blocks of 4, and 2 tokens more
BLOCKS = prompt_block_hashes(PROMPT, BLOCK)


def test_a_prompt_has_one_chained_hash_per_full_block():
    assert len(BLOCKS) == 3
    # Chained: the same block of tokens after another parent is another block.
    assert prompt_block_hashes(PROMPT[4:12], BLOCK)[0] != BLOCKS[1]
    assert prompt_block_hashes(PROMPT[:8], BLOCK) == BLOCKS[:2]
    assert prompt_block_hashes(PROMPT, BLOCK, extra=("adapter",)) != BLOCKS


def engine(*events: dict) -> EngineBlocks:
    blocks = EngineBlocks()
    for event in events:
        blocks.apply(event)
    return blocks


def leading(blocks: EngineBlocks, hashes: list[int]) -> int:
    index = KVIndex()
    index.apply("r1", 0, SNAPSHOT, list(blocks.held))
    return index.cached_blocks("r1", hashes)


def test_stored_blocks_are_found_by_the_prompts_leading_run_whatever_the_engines_hashes():
    # The engine's own hashes (seeded per process) are arbitrary: the mirror chains on tokens.
    blocks = engine(stored([901, 902], None, PROMPT[:8]), stored([903], 902, PROMPT[8:12]))
    assert leading(blocks, BLOCKS) == 3
    assert leading(blocks, prompt_block_hashes(PROMPT[:4] + [0, 0, 0, 0], BLOCK)) == 1


def test_the_mirror_reports_each_change_to_the_held_set():
    blocks = EngineBlocks()
    assert blocks.apply(stored([901, 902], None, PROMPT[:8])) == (STORED, BLOCKS[:2])
    # Stored again (a second copy, or a hit re-reported): held once, dropped at the first eviction.
    assert blocks.apply(stored([901], None, PROMPT[:4])) == (STORED, [])
    assert blocks.apply(removed([901])) == (REMOVED, BLOCKS[:1])
    assert blocks.apply(removed([901])) == (REMOVED, [])
    assert blocks.apply({"type": "AllBlocksCleared"}) == (SNAPSHOT, [])
    assert blocks.held == set()


def test_an_event_without_one_full_block_per_hash_is_ignored():
    assert engine(stored([901, 902], None, PROMPT[:6])).held == set()


def test_an_evicted_block_ends_the_run_and_a_clear_empties_the_cache():
    blocks = engine(stored([901, 902, 903], None, PROMPT[:12]), removed([902]))
    assert leading(blocks, BLOCKS) == 1
    blocks.apply({"type": "AllBlocksCleared"})
    assert blocks.held == set()


def test_blocks_whose_parent_was_never_seen_are_left_out():
    assert engine(stored([903], 902, PROMPT[8:12])).held == set()


def test_offloaded_tiers_and_other_kv_groups_are_ignored():
    blocks = engine(
        stored([901], None, PROMPT[:4]) | {"medium": "CPU"},
        stored([901], None, PROMPT[:4]) | {"group_idx": 1},
    )
    assert blocks.held == set()


def test_an_adapters_blocks_match_only_that_adapters_prompts():
    blocks = engine(stored([901, 902], None, PROMPT[:8], extra_keys=[["tiny-chat-lora"]] * 2))
    assert leading(blocks, BLOCKS) == 0
    assert leading(blocks, prompt_block_hashes(PROMPT, BLOCK, extra=("tiny-chat-lora",))) == 2


def test_the_ingress_is_in_step_from_a_snapshot_and_out_of_step_after_a_lost_message():
    index = KVIndex()
    index.apply("r1", 3, STORED, BLOCKS[:1])  # joined late: no snapshot yet
    assert not index.in_step("r1") and index.cached_blocks("r1", BLOCKS) == 0
    index.apply("r1", 4, SNAPSHOT, BLOCKS[:2])
    index.apply("r1", 5, STORED, BLOCKS[2:])
    assert index.in_step("r1") and index.cached_blocks("r1", BLOCKS) == 3
    index.apply("r1", 6, REMOVED, BLOCKS[1:2])
    assert (index.cached_blocks("r1", BLOCKS), index.held_blocks("r1")) == (1, 2)
    index.apply("r1", 8, STORED, BLOCKS[1:2])  # message 7 was lost
    assert not index.in_step("r1")
    index.apply("r1", 9, SNAPSHOT, BLOCKS)
    assert index.in_step("r1") and index.cached_blocks("r1", BLOCKS) == 3


def test_a_replica_whose_mirror_went_silent_is_out_of_step(monkeypatch):
    index = KVIndex()
    index.apply("r1", 0, SNAPSHOT, BLOCKS)
    assert index.in_step("r1")
    later = time.monotonic() + STALE_AFTER_S + 1
    monkeypatch.setattr("apps.routing.kv_index.time.monotonic", lambda: later)
    assert not index.in_step("r1")


def test_replicas_that_are_gone_are_forgotten():
    index = KVIndex()
    index.apply("r1", 0, SNAPSHOT, BLOCKS)
    index.apply("r2", 0, SNAPSHOT, BLOCKS)
    index.keep_only(["r2"])
    assert (index.in_step("r1"), index.cached_blocks("r1", BLOCKS), index.cached_blocks("r2", BLOCKS)) == (
        False,
        0,
        3,
    )


def test_block_hashes_are_the_same_in_every_process():
    """The mirror (a model replica) and the router (an ingress) hash in different processes, with
    different hash seeds."""
    code = (
        "from apps.routing.kv_index import prompt_block_hashes as h; "
        "print(h(list(range(100, 114)), 4, ('a',)))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {f"{prompt_block_hashes(PROMPT, BLOCK, ('a',))}\n"}


@contextmanager
def stand_in_engine(mirror: KVCacheMirror) -> Iterator[Callable[[int, list], None]]:
    """A PUB socket bound on the mirror's IPC endpoint, as vLLM's publisher binds it; yields
    `send(seq, events)`, which publishes one vLLM-shaped batch."""
    import msgspec
    import zmq

    socket_ = zmq.Context.instance().socket(zmq.PUB)
    socket_.bind(mirror.engine_endpoint)
    # The mirror connected before this socket was bound, as before an engine starts; ZMQ retries
    # the connection every 100 ms.
    time.sleep(1)

    def send(seq: int, events: list) -> None:
        socket_.send_multipart((b"", seq.to_bytes(8, "big"), msgspec.msgpack.encode([0.0, events, None])))

    try:
        yield send
    finally:
        socket_.close()
        os.unlink(mirror.engine_endpoint.removeprefix("ipc://"))


def test_a_mirror_republishes_an_engines_events_to_a_subscriber():
    """Real ZMQ sockets, a stand-in engine publishing vLLM-shaped batches on the mirror's IPC
    endpoint, and an ingress subscriber following the mirror."""
    mirror = KVCacheMirror("replica-under-test")
    subscriber = KVEventSubscriber(KVIndex())
    subscriber.follow("router", {"replica-under-test": mirror.endpoint})
    batches = [[stored([901, 902], None, PROMPT[:8])], [stored([903], 902, PROMPT[8:12])], [removed([902])]]
    with stand_in_engine(mirror) as send:
        for seq, events in enumerate(batches):
            send(seq, events)
        deadline = time.monotonic() + 20  # the subscriber is in step from the mirror's next snapshot
        while subscriber.index.cached_blocks("replica-under-test", BLOCKS) != 1:
            assert time.monotonic() < deadline, (
                mirror.blocks.held,
                subscriber.index.held_blocks("replica-under-test"),
            )
            time.sleep(0.05)
    assert subscriber.in_step("replica-under-test")
    assert subscriber.index.held_blocks("replica-under-test") == 2  # 901 and 903


REPLICAS = [FakeReplica(FakeId(name)) for name in ("r1", "r2", "r3")]


def ranked(cached: dict[str, int], occupancy: dict[str, int], loads=None, blocks=BLOCKS) -> list[str]:
    ranks = rank_by_cache(
        CachedPrefixes(blocks, cached, occupancy), REPLICAS, loads or dict.fromkeys(cached, 0), 0.25
    )
    assert len(ranks[0]) == 1
    return [r.replica_id.unique_id for rank in ranks for r in rank]


def test_a_prompt_mostly_cached_somewhere_goes_to_the_longest_run():
    assert ranked({"r1": 1, "r2": 3, "r3": 2}, {"r1": 0, "r2": 50, "r3": 9})[:2] == ["r2", "r3"]


def test_a_prompt_sharing_only_a_preamble_goes_to_the_emptiest_cache():
    # r1 computed the preamble first: following it would pile every tenant onto r1.
    assert ranked({"r1": 1, "r2": 0, "r3": 1}, {"r1": 40, "r2": 10, "r3": 25})[0] == "r2"


def test_a_prompt_no_replica_holds_is_left_to_the_prefix_hash():
    assert (
        rank_by_cache(CachedPrefixes(BLOCKS, dict.fromkeys(("r1", "r2", "r3"), 0), {}), REPLICAS, {}, 0.25)
        is None
    )


def test_equals_are_ranked_alike_for_every_request_sharing_the_first_block_past_the_run():
    even = dict.fromkeys(("r1", "r2", "r3"), 5)
    one_block = dict.fromkeys(("r1", "r2", "r3"), 1)
    # Two tenants' prompts: the same first block (a preamble), then each its own.
    tenants = [prompt_block_hashes(PROMPT[:4] + [tenant] * 8, BLOCK) for tenant in range(40)]
    again = [prompt_block_hashes(PROMPT[:4] + [tenant] * 8 + [1, 2, 3, 4], BLOCK) for tenant in range(40)]
    first = [ranked(one_block, even, blocks=blocks)[0] for blocks in tenants]
    assert first == [ranked(one_block, even, blocks=blocks)[0] for blocks in again]
    assert set(first) == {"r1", "r2", "r3"}  # and the tenants spread


def test_a_much_busier_holder_is_passed_over_for_the_best_replica_within_reach():
    # max_ongoing 8 x 0.25: 2 requests more than the least loaded is the most allowed.
    order = ranked(
        {"r1": 3, "r2": 2, "r3": 0}, {"r1": 9, "r2": 9, "r3": 0}, loads={"r1": 5, "r2": 1, "r3": 0}
    )
    assert order == ["r2", "r3", "r1"]


@pytest.mark.parametrize(
    "body",
    [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"},
            ]
        },
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]},
    ],
)
def test_a_chat_is_tokenized_as_the_chat_template_renders_it(body):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    messages = [
        {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "Hello"}
        for m in body["messages"]
    ]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt_token_ids(tokenizer, "chat", body) == list(expected)


@pytest.mark.parametrize(
    "body",
    [
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]},
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "user", "content": "Hi"}], "cache_salt": "tenant-1"},
        {"messages": [{"role": "developer", "content": "Be brief."}]},
    ],
)
def test_a_chat_this_module_would_not_render_as_vllm_does_is_not_tokenized(body):
    from transformers import AutoTokenizer

    assert prompt_token_ids(AutoTokenizer.from_pretrained(TINY_CHAT), "chat", body) is None


def test_a_message_without_content_is_rendered_with_empty_content():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    empty = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    expected = tokenizer.apply_chat_template(empty, add_generation_prompt=True, tokenize=True)["input_ids"]
    body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]}
    assert prompt_token_ids(tokenizer, "chat", body) == list(expected)


def test_a_long_prompt_is_tokenized_up_to_a_bound_and_agrees_with_the_full_prompt_there():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    prompt = "order shipping refund parcel invoice " * 1000  # 37,000 characters
    full = tokenizer(prompt).input_ids
    cut = prompt_token_ids(tokenizer, "completion", {"prompt": prompt})
    assert len(cut) < len(full) / 2 and cut == full[: len(cut)]


def test_a_completion_is_tokenized_with_its_special_tokens_and_others_are_not_tokenized():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    assert (
        prompt_token_ids(tokenizer, "completion", {"prompt": "Once upon"}) == tokenizer("Once upon").input_ids
    )
    assert prompt_token_ids(tokenizer, "embeddings", {"input": "Once upon"}) is None
    assert prompt_token_ids(tokenizer, "chat", {"messages": "not a list"}) is None


def test_a_mirror_that_lost_engine_batches_stops_and_lets_go_of_its_sockets():
    mirror = KVCacheMirror("replica-with-a-gap")
    with stand_in_engine(mirror) as send:
        for seq in (0, 2):  # batch 1 lost
            send(seq, [stored([900 + seq], None, [seq] * BLOCK)])
        mirror._thread.join(timeout=10)
    assert not mirror._thread.is_alive()
    assert len(mirror.blocks.held) == 1  # batch 2 was not applied


class FakeSubscriber:
    def __init__(self, index: KVIndex) -> None:
        self.index = index
        self.followed: dict[str, dict] = {}

    def follow(self, follower: str, replicas: dict) -> None:
        self.followed[follower] = replicas

    def unfollow(self, follower: str) -> None:
        self.followed.pop(follower, None)

    def in_step(self, replica_id: str) -> bool:
        return self.index.in_step(replica_id)


@pytest.fixture
def precise(monkeypatch):
    """A router on precise_prefix with two replicas that publish events, a fake subscriber and
    a fake tokenizer (the prompt's ids are PROMPT); yields (router, index, tokenizations)."""
    from apps.routing import router as router_module
    from tests.test_routing import FakeQueueLengths

    index = KVIndex()
    tokenizations = []

    def token_ids(tokenizer, endpoint, body):
        tokenizations.append(endpoint)
        return PROMPT

    monkeypatch.setattr(router_module, "shared_subscriber", lambda: FakeSubscriber(index))
    monkeypatch.setattr(router_module, "loaded_tokenizer", lambda path: object())
    monkeypatch.setattr(router_module, "prompt_token_ids", token_ids)
    instance = object.__new__(PrefixAffinityRouter)
    instance.initialize_state()
    instance._replica_queue_len_cache = FakeQueueLengths({"r1": 0, "r2": 0})
    return instance, index, tokenizations


def route(instance, replicas) -> tuple[list[str], FakePending]:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 600}]}
    request = FakePending(["chat", body], {"routing": RoutingKnobs(precise_prefix=True)})
    ranks = asyncio.run(instance.choose_replicas(replicas, request))
    return [r.replica_id.unique_id for r in ranks[0]], request


def publishing(*names: str) -> list[FakeReplica]:
    stats = {"kv_events": "tcp://127.0.0.1:1", "block_size": BLOCK, "tokenizer": "/nowhere"}
    return [FakeReplica(FakeId(name), routing_stats=stats) for name in names]


def test_precise_routing_sends_a_prompt_to_the_replica_caching_it(precise):
    instance, index, _ = precise
    index.apply("r1", 0, SNAPSHOT, [])
    index.apply("r2", 0, SNAPSHOT, BLOCKS)
    assert route(instance, publishing("r1", "r2"))[0] == ["r2"]


def test_a_replica_out_of_step_takes_part_with_an_unknown_cache(precise):
    instance, index, _ = precise
    index.apply("r1", 0, SNAPSHOT, BLOCKS[:1])  # r2 has sent no snapshot yet
    # Only a preamble's worth cached on r1: the emptiest known cache, never the unknown one.
    assert route(instance, publishing("r1", "r2"))[0] == ["r1"]


def test_without_any_replica_in_step_the_prefix_hash_routes(precise):
    instance, _, tokenizations = precise
    first, _ = route(instance, publishing("r1", "r2"))
    assert len(first) == 1 and tokenizations == []


def test_a_fault_in_precise_routing_falls_back_to_the_prefix_hash(precise, monkeypatch):
    instance, index, _ = precise
    index.apply("r1", 0, SNAPSHOT, BLOCKS)
    index.apply("r2", 0, SNAPSHOT, [])

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(instance, "_prompt_blocks", broken)
    first, _ = route(instance, publishing("r1", "r2"))
    assert len(first) == 1


def test_a_request_routed_again_is_tokenized_once(precise):
    instance, index, tokenizations = precise
    index.apply("r1", 0, SNAPSHOT, BLOCKS)
    index.apply("r2", 0, SNAPSHOT, [])
    replicas = publishing("r1", "r2")
    _, request = route(instance, replicas)
    asyncio.run(instance.choose_replicas(replicas, request))  # Serve's next pass, all replicas full
    assert tokenizations == ["chat"]
