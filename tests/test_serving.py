"""The serving contract, end to end on the real stack: configs/app.yaml (two tiny models, TP 1 and
TP 2, real vLLM CPU engines) in a real Ray Serve app, driven by the official openai client.

The tiny models' text is gibberish, so tests assert on the protocol, statuses, token counts and
placement. `ignore_eos` makes the generated length exactly max_tokens; logprobs carry one entry per
generated token even when the engine packs several tokens into one chunk, so they count the stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
import ray
from ray import serve
from ray.util.state import list_placement_groups

from apps.builder import deployment_name
from scripts.sse import iter_sse_lines
from tests.conftest import app_args, driver_handle, serve_app

PORT = 18000
MODELS = ["tiny-chat", "tiny-chat-tp2"]
ADAPTER = "tiny-chat-lora"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say something."},
]
EXACT = {"ignore_eos": True}  # vLLM extension: generate exactly max_tokens tokens


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    """The embedded default app, started once for the module; yields the base URL."""
    args = app_args("app.yaml", local_paths=True)
    # The chat models; the embedding model is tests/test_endpoints.py's.
    args["models"] = [model for model in args["models"] if model["id"] in MODELS]
    # tiny-chat groups tokens from the second open stream on; tiny-chat-tp2 keeps the default.
    (tiny,) = [model for model in args["models"] if model["id"] == "tiny-chat"]
    tiny.setdefault("replicas", {})["stream_messages_per_step"] = 1
    # The dashboard serves the state API that the placement and replica checks read.
    with serve_app(args, PORT, dashboard=True) as url:
        yield url


@pytest.fixture(scope="module")
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def async_client(gateway: str) -> Callable[[], openai.AsyncOpenAI]:
    """Makes an async client; each test's event loop needs its own connection pool."""
    return lambda: openai.AsyncOpenAI(
        base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120
    )


def test_health_is_ok_when_every_model_has_a_ready_replica(gateway):
    response = httpx.get(f"{gateway}/health", timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["models"] == MODELS


def test_a_named_system_prompt_is_served_from_the_prefix_cache(client):
    """configs/app.yaml names a system prompt for tiny-chat, which each replica warms before it is
    ready: the first client request that references it finds its full blocks cached and gets the
    same prompt as if it had sent the text itself; an unseen prompt of the same length does not."""
    (tiny,) = [model for model in app_args("app.yaml")["models"] if model["id"] == "tiny-chat"]
    system = tiny["system_prompts"]["support"]
    unseen = system.upper()  # same length, no shared block
    name = deployment_name("tiny-chat")  # the model's application and deployment
    model_server = driver_handle(serve.get_deployment_handle(name, app_name=name))
    block = model_server.block_size.remote().result()
    question = {"role": "user", "content": "Where is my order?"}

    def cached_and_prompt_tokens(messages, **extra_body):
        usage = client.chat.completions.create(
            model="tiny-chat", messages=messages, max_tokens=1, extra_body=extra_body
        ).usage
        return usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens

    named_cached, named_prompt_tokens = cached_and_prompt_tokens([question], system_prompt="support")
    _, explicit_prompt_tokens = cached_and_prompt_tokens([{"role": "system", "content": system}, question])
    cold_cached, _ = cached_and_prompt_tokens([{"role": "system", "content": unseen}, question])
    # The warm-up prompt itself: the system prompt plus the few tokens that open the answer.
    _, warm_prompt_tokens = cached_and_prompt_tokens([{"role": "system", "content": system}])
    shared_full_blocks = (warm_prompt_tokens - 8) // block * block
    assert named_prompt_tokens == explicit_prompt_tokens
    assert shared_full_blocks > 0, (warm_prompt_tokens, block)
    assert named_cached >= shared_full_blocks, (named_cached, shared_full_blocks, block)
    assert cold_cached < block, cold_cached


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        ("/v1/chat/completions", {"system_prompt": "nope"}, "unknown_system_prompt"),
        ("/v1/chat/completions", {"system_prompt": ["support"]}, "unknown_system_prompt"),
        (
            "/v1/chat/completions",
            {"system_prompt": "support", "messages": [{"role": "system", "content": "x"}]},
            "invalid_request",
        ),
        ("/v1/completions", {"system_prompt": "support", "prompt": "hi"}, "invalid_request"),
    ],
)
def test_a_bad_system_prompt_reference_is_a_400(gateway, path, body, code):
    request = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    if path == "/v1/completions":
        del request["messages"]
    response = httpx.post(gateway + path, json=request | body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, "system_prompt"), error


def test_models_lists_the_served_ids(client):
    listed = client.models.list().data
    # The models, then their LoRA adapters (the embedded default's tiny-chat has one).
    assert [model.id for model in listed] == [*MODELS, ADAPTER]
    assert listed[-1].model_extra["parent"] == "tiny-chat"


@pytest.mark.parametrize("model", MODELS)
def test_chat_returns_text_and_usage_with_exact_max_tokens(client, model):
    response = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=7, logprobs=True, extra_body=EXACT
    )
    choice = response.choices[0]
    assert response.model == model
    assert choice.message.content, "no text generated"
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 7
    assert len(choice.logprobs.content) == 7, "logprobs disagree with usage"
    assert response.usage.total_tokens == response.usage.prompt_tokens + 7


@pytest.mark.parametrize("model", MODELS)
def test_chat_stream_counts_match_usage(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=9,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXACT,
    )
    streamed_tokens, text, usage, finish = 0, "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            streamed_tokens += len(choice.logprobs.content) if choice.logprobs else 0
            finish = choice.finish_reason or finish
    assert text, "no text streamed"
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 9
    assert streamed_tokens == 9, f"streamed {streamed_tokens} tokens, usage says 9"


@pytest.mark.parametrize("model", MODELS)
def test_async_completion_stream_and_non_stream(async_client, model):
    async def run() -> tuple[openai.types.Completion, int, openai.types.CompletionUsage | None]:
        async with async_client() as client:
            return await both(client)

    async def both(client: openai.AsyncOpenAI):
        whole = await client.completions.create(
            model=model, prompt="Once upon", max_tokens=5, logprobs=1, extra_body=EXACT
        )
        stream = await client.completions.create(
            model=model,
            prompt="Once upon",
            max_tokens=6,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=EXACT,
        )
        tokens, usage = 0, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                tokens += len(choice.logprobs.tokens) if choice.logprobs else 0
        return whole, tokens, usage

    whole, streamed, usage = asyncio.run(run())
    assert whole.choices[0].text and whole.usage.completion_tokens == 5
    assert len(whole.choices[0].logprobs.tokens) == 5
    assert streamed == 6 and usage is not None and usage.completion_tokens == 6


def test_missing_max_tokens_gets_the_model_default(client):
    response = client.completions.create(model="tiny-chat", prompt="Hello", extra_body=EXACT)
    assert response.usage.completion_tokens == 256, "default max_tokens of configs/app.yaml"


@pytest.mark.parametrize("model", MODELS)
def test_max_tokens_over_cap_is_400_naming_the_cap(client, model):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=513)
    assert raised.value.status_code == 400
    assert raised.value.body == {
        "message": f"`max_tokens` must be <= 512 for model {model}. Given: 513",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "max_tokens_too_large",
    }


def test_unknown_model_is_404_listing_served_ids(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-unknown", messages=MESSAGES)
    assert raised.value.status_code == 404
    assert raised.value.body["code"] == "model_not_found"
    assert str(sorted([*MODELS, ADAPTER])) in raised.value.body["message"]


def test_malformed_json_is_400(gateway):
    response = httpx.post(
        f"{gateway}/v1/chat/completions",
        content=b'{"model": "tiny-chat", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and error["type"] == "invalid_request_error"


def test_bad_parameter_rejected_by_the_engine_layer_is_400(gateway):
    response = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": "tiny-chat-tp2", "messages": MESSAGES, "temperature": -1},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "temperature"


def test_prompt_longer_than_the_context_is_400(client):
    long_prompt = "word " * 3000  # more tokens than max_model_len 2048
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="tiny-chat", prompt=long_prompt, max_tokens=10)
    assert raised.value.status_code == 400
    assert "context length" in raised.value.body["message"]


def test_error_from_vllm_request_validators_is_400(gateway):
    # vLLM's own validator (not pydantic's type check): stream_options need stream=true.
    response = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": "tiny-chat", "messages": MESSAGES, "stream_options": {"include_usage": True}},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_wrong_method_use_openai_errors(gateway):
    missing = httpx.get(f"{gateway}/v1/nothing")
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": "not_found"}
    }
    wrong = httpx.get(f"{gateway}/v1/chat/completions")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"


def test_stream_is_server_sent_events_ending_with_done(gateway):
    with httpx.stream(
        "POST",
        f"{gateway}/v1/chat/completions",
        json={"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 3, "stream": True},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in iter_sse_lines(response) if line]
    assert events[-1] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events)
    assert json.loads(events[0][len("data: ") :])["object"] == "chat.completion.chunk"


def test_32_concurrent_streams_across_both_models_complete(async_client):
    async def one(client: openai.AsyncOpenAI, i: int) -> int:
        stream = await client.chat.completions.create(
            model=MODELS[i % 2],
            messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=24,
            logprobs=True,
            stream=True,
            extra_body=EXACT,
        )
        tokens = 0
        async for chunk in stream:
            for choice in chunk.choices:
                tokens += len(choice.logprobs.content) if choice.logprobs else 0
        return tokens

    async def run() -> list[int]:
        async with async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    assert asyncio.run(run()) == [24] * 32


def test_a_loaded_replica_sends_tokens_in_groups_and_an_idle_one_does_not(gateway):
    """Two streams at once: tiny-chat (stream_messages_per_step 1) sends two tokens a message,
    tiny-chat-tp2 (the default 8) one. Each HTTP chunk is one message of the model server."""

    async def events_per_read(client: httpx.AsyncClient, model: str) -> list[int]:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 48, "stream": True} | EXACT
        async with client.stream("POST", f"{gateway}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            return [piece.count(b"data: ") async for piece in response.aiter_raw()]

    async def two_streams(model: str) -> list[list[int]]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(events_per_read(client, model) for _ in range(2)))

    for model, grouped in (("tiny-chat", True), ("tiny-chat-tp2", False)):
        for reads in asyncio.run(two_streams(model)):
            middle = reads[1:-2]  # past the first token, before one stream is left alone
            share = sum(events >= 2 for events in middle) / len(middle)
            assert (share > 0.8) if grouped else (share < 0.5), f"{model}: events per read {reads}"


def test_tp2_replica_has_two_bundles_strict_packed(gateway):
    name = deployment_name('tiny-chat-tp2')  # the model's application and deployment
    prefix = f"SERVE_REPLICA::{name}#{name}#"
    groups = [
        group
        for group in list_placement_groups(detail=True)
        if group.name.startswith(prefix) and group.state == "CREATED"
    ]
    assert len(groups) == 1, [group.name for group in list_placement_groups()]
    (group,) = groups
    assert [bundle["unit_resources"] for bundle in group.bundles] == [{"CPU": 0.25}, {"CPU": 0.25}]
    assert len({bundle["node_id"] for bundle in group.bundles}) == 1, "bundles on one node"
    # The state API does not carry the strategy; the placement group table does.
    assert ray.util.placement_group_table()[group.placement_group_id]["strategy"] == "STRICT_PACK"


def test_benchmark_harness_smoke_run_reports_every_figure(gateway, tmp_path):
    from scripts.loadgen import LATENCY_FIELDS, main

    out = tmp_path / "smoke.json"
    main(
        f"--url {gateway} --model tiny-chat-tp2 --workload chat --num-requests 12 "
        f"--concurrency 4 --output-len 16 --warmup 2 --rates inf,20 --out {out} "
        # An SLO no answer misses on a slow shared machine: goodput then equals throughput.
        "--slo-ttft-ms 600000 --slo-tpot-ms 600000".split()
    )
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0, "no plot written"
    assert [run["rate"] for run in report["runs"]] == ["inf", 20.0]
    for run in report["runs"]:
        summary = run["endpoints"][f"{gateway} tiny-chat-tp2"]
        assert summary["completed"] == summary["requests"] == 12 and summary["errors"] == {}
        assert summary["output_tokens"] > 0 and summary["output_tokens_per_s"] > 0
        assert summary["goodput_requests_per_s"] == summary["requests_per_s"] > 0
        for name in LATENCY_FIELDS:
            stats = summary[name]
            assert 0 < stats["p50"] <= stats["p95"] <= stats["p99"], (name, stats)
            assert stats["mean"] > 0, (name, stats)
