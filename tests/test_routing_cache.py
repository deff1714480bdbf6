"""Cache-aware routing on the real stack: the same workloads against three deployments of the same
model, 2 replicas each, routed by prompt prefix (the default), by the engines' KV-cache events
(`precise_prefix`) and by Serve's power-of-two-choices router, interleaved in one run. The
prefix-cache hit rate (cached prompt tokens, from each answer's usage) must be clearly higher
with cache-aware routing.

Expected, for P prefixes each sent K times at low load: prefix routing misses once per prefix;
random routing misses once per prefix on each replica it lands on (about 1.75 of 2 for K = 3).
Precise routing is held to the multi-tenant workload's ideal (`scripts.prefix_routing`) with KV
caches too small to hold it on one replica. Defaults of the router's knobs and its ranking are
unit-tested in tests/test_routing.py.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import httpx
import pytest

from apps.routing.prompt_tokens import prompt_token_ids
from scripts.prefix_routing import Workload, ideal_cached_tokens, run
from tests.conftest import TINY_CHAT, app_args, ingress_log_line, serve_app

PORT = 18520
# The multi-tenant workload's prompts fill 7 blocks (3 of preamble, 4 of tenant context): all 12
# tenants on one replica would need 51, each half 27.
PRECISE_KV_BLOCKS = 36
PREFIXES = 32  # enough that the random router's luck moves its rate by ~0.03 (1 sigma)
REPEATS = 3
WORDS = "order shipping refund parcel invoice account address delivery return warranty".split()


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    (tiny,) = [m for m in app_args("app.yaml", local_paths=True)["models"] if m["id"] == "tiny-chat"]
    del tiny["system_prompts"]  # no warm prompts: every prefix starts cold on every replica
    del tiny["lora"]  # two models made from it: an adapter name is one model's
    models = []
    for model_id, policy in (
        ("tiny-prefix", "prefix_affinity"),
        ("tiny-p2c", "power_of_two"),
        ("tiny-precise", "precise_prefix"),
    ):
        models.append(
            tiny
            | {
                "id": model_id,
                "parallelism": {"cpus_per_worker": 0.3},  # 6 replicas and the ingress on 2 CPUs
                "replicas": {"num_replicas": 2},
                "routing": {"policy": policy},
            }
        )
    # Its engines publish their KV-cache events, in caches of PRECISE_KV_BLOCKS blocks.
    models[2]["engine"] = tiny.get("engine", {}) | {
        "kv_cache_events": True,
        "kv_cache_blocks": PRECISE_KV_BLOCKS,
    }
    with serve_app({"ingress": {"num_cpus": 0.1}, "models": models}, PORT) as url:
        yield url


def workload() -> list[list[dict]]:
    """PREFIXES system prompts of ~1,200 characters, each asked REPEATS different questions,
    in a fixed shuffled order."""
    rng = random.Random(0)
    systems = [" ".join(rng.choice(WORDS) for _ in range(150)) for _ in range(PREFIXES)]
    requests = [
        [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: {rng.random()}"}]
        for system in systems
        for i in range(REPEATS)
    ]
    rng.shuffle(requests)
    return requests


def test_prefix_routing_hits_the_prefix_cache_clearly_more_than_the_default_router(gateway):
    cached = {"tiny-prefix": 0, "tiny-p2c": 0}
    prompt = {"tiny-prefix": 0, "tiny-p2c": 0}
    with httpx.Client(base_url=gateway, timeout=60) as http:
        for messages in workload():
            for model in cached:  # interleaved: both see the same order at the same time
                response = http.post(
                    "/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 1}
                )
                assert response.status_code == 200, response.text
                usage = response.json()["usage"]
                cached[model] += usage["prompt_tokens_details"]["cached_tokens"]
                prompt[model] += usage["prompt_tokens"]
    rate = {model: cached[model] / prompt[model] for model in cached}
    print(f"prefix-cache hit rate: {rate}")
    # Expected about 0.6 against 0.37 (one miss per prefix against ~1.75 of 3; hits count in
    # whole KV blocks). A first run measured 0.58 against 0.40.
    assert rate["tiny-prefix"] > rate["tiny-p2c"] + 0.12, rate
    assert rate["tiny-prefix"] > 0.5, rate


def test_precise_routing_reaches_the_ideal_cache_reuse_of_a_multi_tenant_workload(gateway):
    """Tenants whose prompts share a platform preamble, then a long context of their own: precise
    routing must spread them over both replicas (one replica's cache cannot hold them all) and
    send each tenant's questions to the replica holding its context."""
    workload = Workload()
    with httpx.Client(base_url=gateway, timeout=60) as http:
        # The router follows a replica's events once Serve has reported where they are published
        # (routing stats, every 5 s): short prompts until it says so.
        deadline = time.monotonic() + 60
        while True:
            response = http.post(
                "/v1/chat/completions",
                json={
                    "model": "tiny-precise",
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 1,
                },
            )
            assert response.status_code == 200, response.text
            try:
                ingress_log_line("Routing on the KV-cache events of 2 replicas", timeout_s=0.5)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "the router never followed the engines' KV-cache events"
    reports = asyncio.run(run(gateway, ["tiny-precise", "tiny-p2c"], workload, rate=None))
    ideal = ideal_cached_tokens(workload.requests(), str(TINY_CHAT), block_size=128, replicas=2)
    precise, p2c = (report.summary(ideal) for report in reports)
    print(f"ideal cached tokens {ideal}: {precise} {p2c}")
    assert precise["errors"] == p2c["errors"] == 0
    assert precise["cached_share_of_ideal"] >= 0.9, precise
    # Random routing (with caches that hold everything) pays a tenant's context once per replica.
    assert reports[0].cached_tokens > reports[1].cached_tokens, (precise, p2c)


@pytest.mark.parametrize(
    "endpoint, path, body",
    [
        (
            "chat",
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}],
                    },
                    {"role": "assistant", "content": None},
                    {"role": "user", "content": "Again?"},
                ]
            },
        ),
        ("completion", "/v1/completions", {"prompt": "Once upon a time"}),
    ],
)
def test_the_router_tokenizes_a_prompt_as_the_engine_does(gateway, endpoint, path, body):
    """The precise-prefix router's tokens (`apps.routing.prompt_tokens`) against the engine's own."""
    from transformers import AutoTokenizer

    expected = prompt_token_ids(AutoTokenizer.from_pretrained(TINY_CHAT), endpoint, body)
    request = body | {"model": "tiny-precise", "max_tokens": 1, "return_token_ids": True}
    response = httpx.post(f"{gateway}{path}", json=request, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    engine_ids = answer.get("prompt_token_ids") or answer["choices"][0].get("prompt_token_ids")
    assert expected is not None and engine_ids == expected
