"""An engine request lives exactly as long as someone waits for it: a client that disconnects
(streaming or not) has its vLLM request aborted, and so has a request that runs past its
time-to-first-token or total timeout (answered 504, or a stream ended by an error event). A
replica whose engine dies fails Serve's health check and is replaced; meanwhile its requests get
503 (never a hang, never a 500), and the service recovers without an operator.

Its own app (one model, a high max_tokens cap so a request outlives the abort by far, one request
in flight so a second one waits, short timeouts), because it kills an engine: no other test
should see that."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from ray import serve
from ray.util.state import list_actors

from apps.builder import deployment_name
from scripts.sse import iter_sse_lines, sse_lines
from tests.conftest import app_args, driver_handle, serve_app

PORT = 18200
MODEL = "tiny-chat"
LONG_MAX_TOKENS = 1900  # within max_model_len 2048 with a short prompt
REQUEST = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = REQUEST | {"max_tokens": LONG_MAX_TOKENS, "ignore_eos": True}
# Four choices with log-probabilities of LONG_MAX_TOKENS tokens each take the tiny model several
# times this long (a test would see the request finish instead of time out).
SLOW = LONG | {"n": 4, "logprobs": True, "top_logprobs": 5}
REQUEST_TIMEOUT_S = 2.0
FIRST_TOKEN_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    args = app_args("app.yaml", local_paths=True)
    args["models"] = [model for model in args["models"] if model["id"] == MODEL]
    args["models"][0]["limits"]["max_tokens_cap"] = LONG_MAX_TOKENS
    args["models"][0]["admission"] = {
        "max_in_flight": 1,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "first_token_timeout_s": FIRST_TOKEN_TIMEOUT_S,
    }
    with serve_app(args, PORT, dashboard=True) as url:
        # A cold engine's first request with log-probabilities takes ~2 s, past the timeout
        # here; the replica's warm-up must have paid that already.
        first = REQUEST | {"logprobs": True, "top_logprobs": 5}
        response = httpx.post(f"{url}/v1/chat/completions", json=first, timeout=60)
        assert response.status_code == 200, f"first request after warm-up: {response.text}"
        yield url


def test_client_disconnect_aborts_the_engine_request(gateway):
    engine = model_handle()
    assert engine.load.remote().result() == 0, "engine busy before the test"
    body = REQUEST | {"max_tokens": LONG_MAX_TOKENS, "stream": True, "logprobs": True, "ignore_eos": True}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=60) as response:
        started, tokens = time.monotonic(), 0
        # Hold the iterator: a dropped one closes the response, i.e. disconnects too early.
        lines = iter_sse_lines(response)
        for line in lines:
            if line.startswith("data: {"):
                for choice in json.loads(line[len("data: ") :])["choices"]:
                    tokens += len((choice.get("logprobs") or {}).get("content") or [])
            if tokens >= 50:
                break
        tokens_per_s = tokens / (time.monotonic() - started)
        assert engine.load.remote().result() == 1, f"not running after {tokens} tokens at {tokens_per_s:.0f}/s"
    closed = time.monotonic()
    wait_until_idle(engine, since=closed)
    abort_s = time.monotonic() - closed
    natural_s = (LONG_MAX_TOKENS - tokens) / tokens_per_s
    # Against the same run's speed: the abort must beat running to the end by far.
    assert abort_s < 1.0, f"abort took {abort_s:.2f}s"
    assert abort_s < natural_s / 3, f"abort {abort_s:.2f}s vs natural end {natural_s:.2f}s"


def test_non_streaming_client_that_leaves_has_its_engine_request_aborted(gateway):
    engine = model_handle()
    assert engine.load.remote().result() == 0, "engine busy before the test"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway}/v1/chat/completions", json=LONG, timeout=1.0)
    left = time.monotonic()
    wait_until_idle(engine, since=left)
    assert time.monotonic() - left < 1.5, "engine request outlived its client"


def test_request_past_its_total_timeout_is_aborted_and_answered_504(gateway):
    engine = model_handle()
    started = time.monotonic()
    response = httpx.post(f"{gateway}/v1/chat/completions", json=SLOW, timeout=60)
    answered_s = time.monotonic() - started
    assert response.status_code == 504, response.text[:300]
    assert response.json()["error"]["code"] == "timeout"
    assert REQUEST_TIMEOUT_S <= answered_s < REQUEST_TIMEOUT_S + 1.5, answered_s
    wait_until_idle(engine, since=time.monotonic())


def test_stream_past_its_total_timeout_ends_with_a_timeout_event(gateway):
    engine = model_handle()
    body = LONG | {"stream": True}
    response = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200
    events = [line[len("data: ") :] for line in sse_lines(response.text) if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["error"]["code"] == "timeout", events[-2]
    tokens = sum(len(json.loads(e)["choices"][0]["delta"].get("content") or "") > 0 for e in events[:-2])
    assert tokens < LONG_MAX_TOKENS, "the stream ran to its end: the timeout never fired"
    wait_until_idle(engine, since=time.monotonic())


def test_request_waiting_past_its_first_token_timeout_gets_504(gateway):
    engine = model_handle()
    # The one slot is taken by a long request; a stream queued behind it cannot start in time.
    holder = threading.Thread(
        target=httpx.post,
        args=(f"{gateway}/v1/chat/completions",),
        kwargs={"json": LONG, "timeout": 60},
    )
    holder.start()
    while engine.load.remote().result() == 0:
        time.sleep(0.02)
    started = time.monotonic()
    waiting = httpx.post(
        f"{gateway}/v1/chat/completions", json=REQUEST | {"stream": True}, timeout=60
    )
    waited_s = time.monotonic() - started
    holder.join()
    assert waiting.status_code == 504, waiting.text
    assert waiting.json()["error"]["code"] == "timeout"
    assert FIRST_TOKEN_TIMEOUT_S <= waited_s < FIRST_TOKEN_TIMEOUT_S + 1.0, waited_s
    wait_until_idle(engine, since=time.monotonic())


def test_replica_whose_engine_dies_is_replaced(gateway):
    actor_class = f"ServeReplica:{deployment_name(MODEL)}:{deployment_name(MODEL)}"
    before = alive_actor_ids(actor_class)
    assert len(before) == 1, before
    assert httpx.post(f"{gateway}/v1/chat/completions", json=REQUEST, timeout=30).status_code == 200

    (actor,) = list_actors(filters=[("class_name", "=", actor_class), ("state", "=", "ALIVE")])
    replica = psutil.Process(actor.pid)
    engines = [p for p in replica.children() if "EngineCore" in " ".join(p.cmdline())]
    assert engines, "no engine core process under the replica"
    for engine in engines:
        engine.kill()

    statuses = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        response = httpx.post(f"{gateway}/v1/chat/completions", json=REQUEST, timeout=30)
        statuses.append(response.status_code)
        if response.status_code != 200:
            error = response.json()["error"]
            # 503 when Serve knows the replica is gone; 504 when the request waited for a
            # replacement past its timeout.
            assert response.status_code in (503, 504), f"{response.status_code}: {error}"
            assert error["code"] in {"engine_unavailable", "overloaded", "timeout"}, error
        after = alive_actor_ids(actor_class)
        if response.status_code == 200 and after and after != before:
            break
        time.sleep(1)
    else:
        pytest.fail(f"replica not replaced in time; statuses seen: {statuses}")
    assert {503, 504} & set(statuses), "requests to the dead engine should have failed fast"
    health = httpx.get(f"{gateway}/health", timeout=10)
    assert health.status_code == 200, health.text


def model_handle():
    name = deployment_name(MODEL)  # the model's application and deployment
    return driver_handle(serve.get_deployment_handle(name, app_name=name))


def wait_until_idle(engine, since: float, limit_s: float = 30) -> None:
    while engine.load.remote().result() != 0:
        assert time.monotonic() - since < limit_s, "engine request never ended"
        time.sleep(0.02)


def alive_actor_ids(class_name: str) -> set[str]:
    actors = list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
    return {actor.actor_id for actor in actors}
