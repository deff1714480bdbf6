"""Admission control on the real stack: API keys, exact per-key limits shared by two ingress
replicas, bounded queues with priorities, and a table of bad requests, against a real Serve app
with real vLLM CPU engines.

One app for the module: two ingress replicas (so the limits must hold app-wide), `tiny-chat` with
generous admission, and `tiny-queue` (the same checkpoint) with a small in-flight bound and queue.
Every key has its own limits, so tests do not share buckets.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve

from apps.edge.auth import key_hash
from scripts.fairness import FairnessSettings, measure, percentile
from scripts.sse import iter_sse_lines, sse_lines
from tests.conftest import app_args, serve_app

PORT = 18300
BASE_URL = f"http://127.0.0.1:{PORT}"
CHAT = f"{BASE_URL}/v1/chat/completions"
PROMPT_CAP = 64  # tiny-chat's max_prompt_tokens
QUEUE_MAX_TOKENS_CAP = 300  # tiny-queue clamps max_tokens to this instead of refusing
KEY_LIMITS = {
    "open": {},
    "restricted": {"models": ["tiny-chat"]},
    "rpm10": {"requests_per_minute": 10},
    "rpm12": {"requests_per_minute": 12},
    "tpm1000": {"tokens_per_minute": 1000},
    "tpm300": {"tokens_per_minute": 300},
    "tpm2000": {"tokens_per_minute": 2000},
    "two-at-once": {"max_concurrent_requests": 2},
    "burst": {"requests_per_minute": 100},
    "low": {"priority": "low"},
    "high": {"priority": "high"},
    "greedy": {},
    "light": {},
}
RATE_LIMIT_HEADERS = [
    f"x-ratelimit-{field}-{kind}"
    for kind in ("requests", "tokens")
    for field in ("limit", "remaining", "reset")
]
VOCAB_SIZE = 4096  # the tiny models'; stopping on every token id ends a completion at 1 token


def key(name: str) -> str:
    return f"sk-test-{name}"


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key(name)}"}


def chat(model: str = "tiny-chat", **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | fields


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    (tiny,) = [
        model for model in app_args("app.yaml", local_paths=True)["models"] if model["id"] == "tiny-chat"
    ]
    tiny["limits"]["max_prompt_tokens"] = PROMPT_CAP
    # The embedded default's named system prompt is longer than this prompt cap (its warm-up
    # would refuse to start the replica, saying so); the built-in warm-up request still runs.
    del tiny["system_prompts"]
    # A second model with tiny-chat's settings; adapter names are unique, so not its LoRA adapter.
    queue = json.loads(json.dumps(tiny)) | {"id": "tiny-queue"}
    del queue["lora"]
    # Per ingress replica: 2 in flight, 8 waiting; low is shed from 4 waiting, normal from 7.
    queue["admission"] = {"max_in_flight": 4, "max_queued": 16}
    queue["limits"] |= {"over_cap": "clamp", "max_tokens_cap": QUEUE_MAX_TOKENS_CAP}
    args = {
        "ingress": {"num_replicas": 2, "num_cpus": 0.1},
        "models": [tiny, queue],
        "auth": {
            "enabled": True,
            "keys": [
                {"name": name, "sha256": key_hash(key(name))} | limits
                for name, limits in KEY_LIMITS.items()
            ],
        },
    }
    with serve_app(args, PORT) as url:
        yield url


async def post_many(bodies_and_keys: list[tuple[dict, str]], delay_s: float = 0.0) -> list[httpx.Response]:
    """POST every body at once (each with its key's header), optionally staggered."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=300)) as client:

        async def post(index: int, body: dict, name: str) -> httpx.Response:
            await asyncio.sleep(index * delay_s)
            return await client.post(CHAT, json=body, headers=auth(name))

        return await asyncio.gather(*(post(i, b, k) for i, (b, k) in enumerate(bodies_and_keys)))


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --- keys -------------------------------------------------------------------------------------


def test_requests_need_a_known_key(gateway):
    missing = httpx.post(CHAT, json=chat(), timeout=30)
    assert missing.status_code == 401 and error_of(missing)["code"] == "missing_api_key"
    wrong = httpx.post(CHAT, json=chat(), headers={"Authorization": "Bearer sk-nope"}, timeout=30)
    assert wrong.status_code == 401 and error_of(wrong)["code"] == "invalid_api_key"
    assert "sk-nope" not in wrong.text
    assert httpx.post(CHAT, json=chat(), headers=auth("open"), timeout=30).status_code == 200


def test_a_key_sees_and_uses_only_its_models(gateway):
    listed = httpx.get(f"{gateway}/v1/models", headers=auth("restricted"), timeout=30)
    assert [model["id"] for model in listed.json()["data"]] == ["tiny-chat"]
    forbidden = httpx.post(CHAT, json=chat("tiny-queue"), headers=auth("restricted"), timeout=30)
    assert forbidden.status_code == 403 and error_of(forbidden)["code"] == "model_not_allowed"
    unknown = httpx.post(CHAT, json=chat("gpt-9"), headers=auth("restricted"), timeout=30)
    assert unknown.status_code == 404 and "tiny-queue" not in error_of(unknown)["message"]


# --- rate limits ------------------------------------------------------------------------------


def test_ten_requests_per_minute_admit_exactly_ten_of_thirty_across_two_ingress_replicas(gateway):
    ingress = serve.status().applications["llm"].deployments["ingress"]
    assert sum(ingress.replica_states.values()) == 2
    responses = asyncio.run(post_many([(chat(max_tokens=1), "rpm10")] * 30))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 10 + [429] * 20, statuses
    for response in responses:
        assert response.headers["x-ratelimit-limit-requests"] == "10"
        if response.status_code == 429:
            error = error_of(response)
            assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
            assert int(response.headers["retry-after"]) >= 1


def test_token_limit_holds_under_twenty_concurrent_streams(gateway):
    body = chat(
        max_tokens=100, stream=True, stream_options={"include_usage": True}, ignore_eos=True
    )
    started = time.monotonic()
    responses = asyncio.run(post_many([(body, "tpm1000")] * 20))
    elapsed = time.monotonic() - started
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) + len(refused) == 20
    assert all(error_of(r)["type"] == "tokens" for r in refused)
    used = sum(stream_usage(r)["total_tokens"] for r in admitted)
    # Each reserves its prompt estimate + 100; what they really used may never pass the limit
    # (plus what refilled while the test ran).
    assert 0 < len(admitted) < 20
    assert used <= 1000 + 1000 / 60 * elapsed, (used, len(admitted))


def test_refund_after_a_short_completion_lets_the_next_request_in(gateway):
    # 300 tokens/min; each request reserves its estimate + 200, so two fit only with a refund.
    short = chat(max_tokens=200, stop_token_ids=list(range(VOCAB_SIZE)))
    first = httpx.post(CHAT, json=short, headers=auth("tpm300"), timeout=60)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["completion_tokens"] == 1
    second = httpx.post(CHAT, json=short, headers=auth("tpm300"), timeout=60)
    assert second.status_code == 200, second.text
    # Both were charged what they used, the second still holds its reservation.
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    used_first = first.json()["usage"]["total_tokens"]
    assert remaining <= 300 - used_first - 200 + 5, (remaining, used_first)


def test_a_stream_the_client_leaves_is_charged_only_what_it_generated(gateway):
    body = chat(max_tokens=500, stream=True, ignore_eos=True)
    with httpx.stream("POST", CHAT, json=body, headers=auth("tpm2000"), timeout=60) as response:
        assert response.status_code == 200
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < 2000 - 500
        lines = iter_sse_lines(response)  # held: dropping it would disconnect too early
        events = 0
        for line in lines:
            events += line.startswith("data: {")
            if events >= 5:
                break
    # The model server settles the cancelled request with the engine's real count: a few dozen
    # tokens at most, so nearly all of the 500 reserved comes back.
    deadline = time.monotonic() + 5
    while True:
        probe = httpx.post(CHAT, json=chat(max_tokens=1), headers=auth("tpm2000"), timeout=30)
        remaining = int(probe.headers["x-ratelimit-remaining-tokens"])
        if remaining > 2000 - 150 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert remaining > 2000 - 150, remaining


def test_retry_after_is_within_twenty_percent_of_the_real_wait(gateway):
    body = chat(max_tokens=1)
    for _ in range(12):
        assert httpx.post(CHAT, json=body, headers=auth("rpm12"), timeout=30).status_code == 200
    refused = httpx.post(CHAT, json=body, headers=auth("rpm12"), timeout=30)
    assert refused.status_code == 429
    announced_s = int(refused.headers["retry-after-ms"]) / 1000
    start = time.monotonic()
    while httpx.post(CHAT, json=body, headers=auth("rpm12"), timeout=30).status_code == 429:
        assert time.monotonic() - start < 30, "never admitted again"
        time.sleep(0.05)
    waited_s = time.monotonic() - start
    assert abs(waited_s - announced_s) <= 0.2 * waited_s, (announced_s, waited_s)
    assert int(refused.headers["retry-after"]) >= waited_s - 0.2


def test_concurrency_limit_refuses_the_third_request_at_once(gateway):
    long = chat(max_tokens=200, ignore_eos=True)
    responses = asyncio.run(post_many([(long, "two-at-once")] * 3))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429], statuses
    (refused,) = [r for r in responses if r.status_code == 429]
    assert "concurrent" in error_of(refused)["message"]
    assert httpx.post(CHAT, json=chat(), headers=auth("two-at-once"), timeout=30).status_code == 200


def test_clamp_mode_lowers_max_tokens_to_the_cap_and_says_so(gateway):
    # Stopping on every token id ends the answer at once; the header is what is checked.
    body = chat("tiny-queue", max_tokens=10**6, stop_token_ids=list(range(VOCAB_SIZE)))
    clamped = httpx.post(CHAT, json=body, headers=auth("open"), timeout=60)
    assert clamped.status_code == 200, clamped.text
    assert clamped.headers["x-max-tokens-clamped"] == str(QUEUE_MAX_TOKENS_CAP)
    within = httpx.post(CHAT, json=body | {"max_tokens": 5}, headers=auth("open"), timeout=60)
    assert within.status_code == 200 and "x-max-tokens-clamped" not in within.headers


# --- backpressure and priorities ----------------------------------------------------------------


def test_burst_of_200_gets_only_200_429_or_503_with_their_headers(gateway):
    body = chat("tiny-queue", max_tokens=8, ignore_eos=True)
    started = time.monotonic()
    responses = asyncio.run(post_many([(body, "burst")] * 200))
    refilled = 100 / 60 * (time.monotonic() - started)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429, 503}, statuses
    # 100 requests per minute: half the burst is refused by the key's limit (less what refilled
    # meanwhile), and the queue (2 in flight + 8 waiting per ingress replica) admits only part
    # of the rest.
    assert 100 - refilled - 1 <= statuses.count(429) <= 100, statuses
    assert statuses.count(200) >= 4, statuses
    for response in responses:
        assert all(name in response.headers for name in RATE_LIMIT_HEADERS[:3]), response.headers
        if response.status_code == 200:
            assert response.json()["usage"]["completion_tokens"] == 8
        elif response.status_code == 429:
            assert error_of(response)["code"] == "rate_limit_exceeded"
            assert "retry-after" in response.headers
        else:
            error = error_of(response)
            assert error["code"] in {"queue_full", "priority_shed", "queue_timeout"}, error
            assert response.headers["x-reject-reason"] == error["code"]
            assert int(response.headers["retry-after"]) >= 1


def test_low_priority_is_shed_before_high(gateway):
    long = chat("tiny-queue", max_tokens=48, ignore_eos=True)
    # Lows first, so they fill the queue; highs arrive while it is full.
    requests = [(long, "low")] * 24 + [(long, "high")] * 8
    responses = asyncio.run(post_many(requests, delay_s=0.01))
    low, high = responses[:24], responses[24:]
    assert [r.status_code for r in high] == [200] * 8, [r.text for r in high if r.status_code != 200]
    shed = [r for r in low if r.status_code == 503]
    assert shed and all(error_of(r)["code"] in {"priority_shed", "queue_full"} for r in shed)
    assert any(r.headers["x-reject-reason"] == "priority_shed" for r in shed)
    assert {r.status_code for r in low} <= {200, 503}


def test_a_light_key_is_not_queued_behind_a_greedy_keys_backlog(gateway):
    """Fair share within a class (`apps.admission.gate`): a key holding more streams than tiny-chat
    admits, and a key sending one short request at a time. First come first served, the light
    key would wait as long as the greedy key's own requests do (the backlog ahead of it); the
    fair queue hands it the next freed slot, and the engine batches it first. What is left is
    the wait for a sequence of the full batch to finish, and a step of the full batch: it cannot
    be as fast as on an idle engine (scripts/fairness.py; docs/BENCHMARKS.md)."""
    settings = FairnessSettings(
        BASE_URL, "tiny-chat", key("greedy"), key("light"), greedy_streams=100, light_requests=30
    )
    report = asyncio.run(measure(settings))
    print(report.summary())
    # First come first served, both of the light key's numbers would be about the greedy key's
    # median or above (1.07x and 1.36x measured); fair, about 0.14x and 0.3-0.5x.
    greedy_ttft_p50 = statistics.median(report.greedy_ttfts_s())
    assert statistics.median(report.light_shared_ttft_s) < 0.25 * greedy_ttft_p50, report.summary()
    assert percentile(report.light_shared_ttft_s, 0.95) < 0.75 * greedy_ttft_p50, report.summary()
    assert {r.status for r in report.greedy} == {200}, report.summary()
    alone = report.greedy_tokens_per_s(report.greedy_alone_window)
    assert report.greedy_tokens_per_s(report.shared_window) > 0.7 * alone, "the greedy key keeps the rest"


# --- bad input ---------------------------------------------------------------------------------

GOOD = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON_HEADERS = {"Content-Type": "application/json"}

# (id, method, path, key name or None or a raw Authorization value, body, status, error code)
BAD_REQUESTS = [
    ("syntax", "POST", "/v1/chat/completions", "open", b"{bad", 400, "invalid_json"),
    ("array", "POST", "/v1/chat/completions", "open", b"[1]", 400, "invalid_json"),
    ("not_utf8", "POST", "/v1/chat/completions", "open", b"\xff\xfe{}", 400, "invalid_json"),
    ("empty_body", "POST", "/v1/chat/completions", "open", b"", 400, "invalid_json"),
    ("nan", "POST", "/v1/chat/completions", "open", json.dumps(GOOD)[:-1].encode() + b', "temperature": NaN}', 400, "invalid_json"),
    ("deep_nesting", "POST", "/v1/chat/completions", "open", b"[" * 50_000 + b"]" * 50_000, 400, "invalid_json"),
    ("no_model", "POST", "/v1/chat/completions", "open", {k: v for k, v in GOOD.items() if k != "model"}, 400, "invalid_request"),
    ("model_not_string", "POST", "/v1/chat/completions", "open", GOOD | {"model": 7}, 400, "invalid_request"),
    ("unknown_model", "POST", "/v1/chat/completions", "open", GOOD | {"model": "gpt-9"}, 404, "model_not_found"),
    ("no_key", "POST", "/v1/chat/completions", None, GOOD, 401, "missing_api_key"),
    ("invalid_key", "POST", "/v1/chat/completions", "Bearer sk-wrong", GOOD, 401, "invalid_api_key"),
    ("basic_auth", "POST", "/v1/chat/completions", "Basic b3Blbg==", GOOD, 401, "missing_api_key"),
    ("model_not_allowed", "POST", "/v1/chat/completions", "restricted", GOOD | {"model": "tiny-queue"}, 403, "model_not_allowed"),
    ("max_tokens_zero", "POST", "/v1/chat/completions", "open", GOOD | {"max_tokens": 0}, 400, "invalid_request"),
    ("max_tokens_negative", "POST", "/v1/chat/completions", "open", GOOD | {"max_tokens": -5}, 400, "invalid_request"),
    ("max_tokens_huge", "POST", "/v1/chat/completions", "open", GOOD | {"max_tokens": 10**9}, 400, "max_tokens_too_large"),
    ("max_tokens_string", "POST", "/v1/chat/completions", "open", GOOD | {"max_tokens": "10"}, 400, "invalid_request"),
    ("max_tokens_bool", "POST", "/v1/chat/completions", "open", GOOD | {"max_tokens": True}, 400, "invalid_request"),
    ("token_fields_disagree", "POST", "/v1/chat/completions", "open", GOOD | {"max_completion_tokens": 3}, 400, "invalid_request"),
    ("no_messages", "POST", "/v1/chat/completions", "open", {"model": "tiny-chat"}, 400, "invalid_request"),
    ("empty_messages", "POST", "/v1/chat/completions", "open", GOOD | {"messages": []}, 400, "invalid_request"),
    ("messages_not_list", "POST", "/v1/chat/completions", "open", GOOD | {"messages": "hi"}, 400, "invalid_request"),
    ("unknown_role", "POST", "/v1/chat/completions", "open", GOOD | {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_request"),
    ("message_not_object", "POST", "/v1/chat/completions", "open", GOOD | {"messages": ["hi"]}, 400, "invalid_request"),
    ("temperature_negative", "POST", "/v1/chat/completions", "open", GOOD | {"temperature": -1}, 400, "invalid_request"),
    ("temperature_string", "POST", "/v1/chat/completions", "open", GOOD | {"temperature": "hot"}, 400, "invalid_request"),
    ("top_p_above_one", "POST", "/v1/chat/completions", "open", GOOD | {"top_p": 1.5}, 400, "invalid_request"),
    ("n_huge", "POST", "/v1/chat/completions", "open", GOOD | {"n": 1000}, 400, "n_too_large"),
    ("n_float", "POST", "/v1/chat/completions", "open", GOOD | {"n": 2.5}, 400, "invalid_request"),
    ("too_many_stops", "POST", "/v1/chat/completions", "open", GOOD | {"stop": [str(i) for i in range(10)]}, 400, "too_many_stop_sequences"),
    ("stream_not_bool", "POST", "/v1/chat/completions", "open", GOOD | {"stream": "yes"}, 400, "invalid_request"),
    ("unsupported_parameter", "POST", "/v1/chat/completions", "open", GOOD | {"temperatur": 0.5}, 400, "unknown_parameter"),
    ("client_priority", "POST", "/v1/chat/completions", "open", GOOD | {"priority": -100}, 400, "unsupported_parameter"),
    ("prompt_over_cap", "POST", "/v1/chat/completions", "open", GOOD | {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "invalid_request"),
    ("oversized_body", "POST", "/v1/chat/completions", "open", GOOD | {"messages": [{"role": "user", "content": "x" * (3 * 1024 * 1024)}]}, 413, "request_too_large"),
    ("completion_no_prompt", "POST", "/v1/completions", "open", {"model": "tiny-chat", "max_tokens": 2}, 400, "invalid_request"),
    ("wrong_method", "GET", "/v1/chat/completions", "open", None, 405, "method_not_allowed"),
    ("unknown_path", "POST", "/v1/chat/complete", "open", GOOD, 404, "not_found"),
]


@pytest.mark.parametrize(
    ("method", "path", "who", "body", "status", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_gets_its_exact_status_and_openai_error(gateway, method, path, who, body, status, code):
    headers = dict(JSON_HEADERS)
    if who in KEY_LIMITS:
        headers |= auth(who)
    elif who is not None:
        headers["Authorization"] = who
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    response = httpx.request(method, f"{gateway}{path}", content=content, headers=headers, timeout=60)
    assert response.status_code == status, response.text[:500]
    error = error_of(response)
    assert error["code"] == code, error
    assert error["type"] == "invalid_request_error" and error["message"], error


def test_prompt_over_the_cap_is_rejected_on_its_exact_token_count(gateway):
    body = GOOD | {"messages": [{"role": "user", "content": "word " * 100}]}
    response = httpx.post(CHAT, json=body, headers=auth("open"), timeout=60)
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert re.fullmatch(r"The prompt is \d+ tokens long; model tiny-chat accepts at most 64\. .*", message)


# Any JSON value, to put where the API expects something specific.
def _json_containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)


JSON_VALUES = st.recursive(
    # JSON has no NaN or Infinity (the client could not even send them; parse_body's tests cover them).
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    _json_containers,
    max_leaves=8,
)
# Fields of a chat request, each either plausible or any JSON value.
FUZZ_FIELDS = {
    "model": st.sampled_from(["tiny-chat", "tiny-queue", "nope", ""]) | JSON_VALUES,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "x"]), "content": st.text(max_size=40)}
        )
        | JSON_VALUES,
        max_size=3,
    )
    | JSON_VALUES,
    "max_tokens": st.integers(-2, 8) | JSON_VALUES,
    "max_completion_tokens": st.integers(-2, 8) | JSON_VALUES,
    "temperature": st.floats(-1, 3) | JSON_VALUES,
    "top_p": st.floats(-1, 2) | JSON_VALUES,
    "n": st.integers(-1, 6) | JSON_VALUES,
    "stop": st.lists(st.text(max_size=5), max_size=6) | JSON_VALUES,
    "stream": st.booleans() | JSON_VALUES,
    "logprobs": st.booleans() | JSON_VALUES,
    "seed": st.integers() | JSON_VALUES,
    "presence_penalty": st.floats(-3, 3) | JSON_VALUES,
}


# derandomize: the same 150 bodies every run, so a CI failure reproduces locally.
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=st.fixed_dictionaries({}, optional=FUZZ_FIELDS), streaming=st.booleans())
def test_fuzzed_requests_never_get_a_5xx_or_hang(gateway, body, streaming):
    if streaming and isinstance(body.get("max_tokens"), int):
        body["stream"] = True
    response = httpx.post(CHAT, json=body, headers=auth("open"), timeout=60)
    assert response.status_code < 500, (body, response.text[:300])
    if response.status_code != 200:
        error_of(response)


def test_the_server_still_serves_after_the_bad_requests(gateway):
    response = httpx.post(CHAT, json=GOOD, headers=auth("open"), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


# --- helpers -----------------------------------------------------------------------------------


def stream_usage(response: httpx.Response) -> dict:
    """The usage event of a streamed answer (requested with stream_options.include_usage)."""
    for line in sse_lines(response.text):
        if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
            event = json.loads(line[len("data: ") :])
            if event.get("usage") and not event.get("choices"):
                return event["usage"]
    raise AssertionError(f"no usage event in {response.text[-300:]}")
