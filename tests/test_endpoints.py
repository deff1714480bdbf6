"""Every endpoint of the table (`apps.endpoints`) on the real stack, against bare vLLM.

One Serve app (tiny-chat and the embedding model tiny-embed of the embedded default, API keys
on) and, beside it, vLLM's own OpenAI server for each model with the same checkpoint and engine
arguments. A table of requests goes to both: same status class and same response shape, except
the gateway's documented refusals. Then the official `openai` and `anthropic` clients, the
embeddings' and scores' values against vLLM's, each new endpoint's limits and metrics, and the
gateway's 4xx answers to bad input.
"""

from __future__ import annotations

import base64
import builtins
import dis
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import numpy as np
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apps.edge.auth import key_hash
from apps.endpoints import ENDPOINTS
from apps.engine.model_server import _known_fields, _protocol_model
from scripts.sse import sse_lines
from tests.conftest import ROOT, app_args, deploy, ingress_log_line, serve_app

PORT = 18830
METRICS_PORT = 18831
BARE_PORTS = {"tiny-chat": 18832, "tiny-embed": 18833, "tiny-rerank": 18834}
GATEWAY = f"http://127.0.0.1:{PORT}"
BARE_START_TIMEOUT_S = 600
ADAPTER = "tiny-chat-lora"  # configs/app.yaml's LoRA adapter of tiny-chat
KEYS = {
    "full": {},
    "chat-only": {"models": ["tiny-chat"]},
    # An embeddings request's tokens count against the key's budget.
    "metered": {"tokens_per_minute": 60},
    # tokenize costs one request and no tokens.
    "counted": {"requests_per_minute": 2},
    "adapter-only": {"models": [ADAPTER]},
}
MESSAGES = [{"role": "user", "content": "Hello there."}]
DEFAULT_MAX_TOKENS = 256  # configs/app.yaml's tiny-chat limits
MAX_TOKENS_CAP = 512
CHAT_PROMPT_CAP = 1024  # set here; the gateway checks it on the real token count
MAX_INPUTS = 64  # configs/app.yaml's tiny-embed limits
MAX_PROMPT_TOKENS = 512


def secret(name: str) -> str:
    return f"sk-endpoints-{name}"


def bearer(name: str = "full") -> dict[str, str]:
    return {"Authorization": f"Bearer {secret(name)}"}


def bare_server(model: dict[str, Any], port: int) -> subprocess.Popen:
    """vLLM's own OpenAI server for `model` (its checkpoint and engine arguments)."""
    engine = model["engine"]
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model["path"], "--served-model-name", model["id"],
        "--dtype", engine["dtype"], "--max-model-len", str(engine["max_model_len"]),
        "--max-num-seqs", str(engine["max_num_seqs"]), "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if model.get("task") in ("embed", "score"):
        command += ["--runner", "pooling"]
    lora = model.get("lora")
    if lora is not None:
        adapters = [f"{a['name']}={ROOT / a['path']}" for a in lora["adapters"]]
        command += ["--enable-lora", "--max-lora-rank", str(lora["max_lora_rank"]), "--lora-modules", *adapters]
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": str(engine["cpu_kvcache_space_gib"])}
    log = open(f"/tmp/bare-vllm-{model['id']}.log", "w")  # noqa: SIM115 (the server's lifetime)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + BARE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"bare vLLM at {url} exited: see /tmp/bare-vllm-*.log"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(f"bare vLLM at {url} did not start")


@dataclass
class Stack:
    gateway: str
    bare: dict[str, str]  # model id (or adapter name) -> bare vLLM's base URL
    args: dict[str, Any] = field(default_factory=dict)  # the app's whole config


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    args = app_args("app.yaml", local_paths=True)
    models = {m["id"]: m for m in args["models"] if m["id"] in BARE_PORTS}
    models["tiny-chat"]["limits"]["max_prompt_tokens"] = CHAT_PROMPT_CAP
    # A cross-encoder (made by scripts/make_tiny_models.py, not in the embedded default).
    embed = models["tiny-embed"]
    models["tiny-rerank"] = {
        "id": "tiny-rerank",
        "path": str(ROOT / "models/tiny-rerank"),
        "task": "score",
        "engine": embed["engine"],
        "parallelism": embed["parallelism"],
    }
    args["models"] = list(models.values())
    args["auth"] = {
        "enabled": True,
        "keys": [{"name": name, "sha256": key_hash(secret(name))} | limits for name, limits in KEYS.items()],
    }
    # The bare servers start while the Serve app does.
    servers = {model_id: bare_server(models[model_id], port) for model_id, port in BARE_PORTS.items()}
    try:
        with serve_app(args, PORT, metrics_port=METRICS_PORT) as url:
            bare = {model_id: f"http://127.0.0.1:{port}" for model_id, port in BARE_PORTS.items()}
            for model_id, server in servers.items():
                wait_healthy(bare[model_id], server)
            yield Stack(url, bare | {ADAPTER: bare["tiny-chat"]}, args)
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def post(url: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=headers or {}, timeout=120)


# --- the differential table -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request to both servers. `gateway`/`bare`: the expected status class of each (2 or
    4); they differ only for the gateway's documented refusals (and its defaults)."""

    name: str
    path: str
    body: dict[str, Any]
    gateway: int = 2
    bare: int = 2


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 8} | fields


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny-chat", "prompt": "Once upon a time", "max_tokens": 8} | fields


def responses(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny-chat", "input": "Hello there.", "max_output_tokens": 8} | fields


def messages(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 8} | fields


def embed(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny-embed"} | fields


TOOL = {
    "type": "function",
    "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
DOCUMENTS = ["cats purr and sleep", "stock prices fell", "a kitten is a young cat"]
CASES = [
    Case("chat", "/v1/chat/completions", chat()),
    Case("chat stream", "/v1/chat/completions", chat(stream=True)),
    Case("chat stream usage", "/v1/chat/completions", chat(stream=True, stream_options={"include_usage": True})),
    Case("chat n=2", "/v1/chat/completions", chat(n=2)),
    Case("chat logprobs", "/v1/chat/completions", chat(logprobs=True, top_logprobs=2)),
    Case("chat json_object", "/v1/chat/completions", chat(response_format={"type": "json_object"})),
    Case("chat tools", "/v1/chat/completions", chat(tools=[TOOL], tool_choice="none")),
    Case("chat bad temperature", "/v1/chat/completions", chat(temperature=-1), 4, 4),
    # Refusal: an unknown role would be rendered by the chat template as it is.
    Case("chat unknown role", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), 4, 2),
    Case("chat through an adapter", "/v1/chat/completions", chat(model=ADAPTER)),
    Case("completion through an adapter stream", "/v1/completions", completion(model=ADAPTER, stream=True)),
    Case("responses through an adapter", "/v1/responses", responses(model=ADAPTER)),
    Case("completion", "/v1/completions", completion()),
    Case("completion batch", "/v1/completions", completion(prompt=["One", "Two"])),
    Case("completion token ids", "/v1/completions", completion(prompt=[5, 6, 7, 8])),
    Case("completion stream", "/v1/completions", completion(stream=True)),
    Case("completion echo logprobs", "/v1/completions", completion(echo=True, logprobs=1)),
    Case("completion best_of = n", "/v1/completions", completion(n=2, best_of=2)),
    # Refusals: vLLM ignores best_of (one sample for best-of-3); the model's max_tokens cap.
    Case("completion best_of > n", "/v1/completions", completion(best_of=3), 4, 2),
    Case("completion over the cap", "/v1/completions", completion(max_tokens=MAX_TOKENS_CAP + 1), 4, 2),
    Case("responses", "/v1/responses", responses()),
    Case(
        "responses instructions",
        "/v1/responses",
        responses(instructions="Be brief.", input=[{"role": "user", "content": "Hi"}]),
    ),
    Case("responses stream", "/v1/responses", responses(stream=True)),
    Case("responses default cap", "/v1/responses", {"model": "tiny-chat", "input": "Hi", "temperature": 0.5}),
    Case("responses bad temperature", "/v1/responses", responses(temperature=-1), 4, 4),
    # Refusal: a stored response lives in one engine's memory (vLLM ignores `store` without
    # its in-memory store switched on).
    Case("responses store", "/v1/responses", responses(store=True), 4, 2),
    Case("messages", "/v1/messages", messages()),
    Case("messages system stream", "/v1/messages", messages(system="Be brief.", stream=True)),
    Case("messages stop_sequences", "/v1/messages", messages(stop_sequences=["zz"])),
    Case("messages temperature", "/v1/messages", messages(temperature=0.2, top_p=0.9)),
    # The gateway fills in the model's default max_tokens (Anthropic requires the field).
    Case("messages without max_tokens", "/v1/messages", {"model": "tiny-chat", "messages": MESSAGES}, 2, 4),
    Case("messages bad role", "/v1/messages", messages(messages=[{"role": "wizard", "content": "x"}]), 4, 4),
    Case("messages count_tokens", "/v1/messages/count_tokens", {"model": "tiny-chat", "messages": MESSAGES}),
    Case(
        "messages count_tokens missing messages", "/v1/messages/count_tokens", {"model": "tiny-chat"}, 4, 4
    ),
    Case("tokenize prompt", "/tokenize", {"model": "tiny-chat", "prompt": "Hello world"}),
    Case(
        "tokenize messages",
        "/tokenize",
        {"model": "tiny-chat", "messages": MESSAGES, "add_generation_prompt": True},
    ),
    Case("tokenize token strs", "/tokenize", {"model": "tiny-chat", "prompt": "Hi", "return_token_strs": True}),
    Case("tokenize embed model", "/tokenize", {"model": "tiny-embed", "prompt": "Hello"}),
    Case("detokenize", "/detokenize", {"model": "tiny-chat", "tokens": [45, 328, 896]}),
    Case("detokenize bad tokens", "/detokenize", {"model": "tiny-chat", "tokens": ["a"]}, 4, 4),
    Case("embeddings text", "/v1/embeddings", embed(input="Hello there.")),
    Case("embeddings list", "/v1/embeddings", embed(input=["Hello", "World"])),
    Case("embeddings token ids", "/v1/embeddings", embed(input=[[5, 6, 7], [8, 9]])),
    Case("embeddings base64", "/v1/embeddings", embed(input="Hello", encoding_format="base64")),
    Case("embeddings dimensions", "/v1/embeddings", embed(input="Hello", dimensions=8), 4, 4),
    # Refusal: vLLM's bytes formats carry their shapes in response headers.
    Case("embeddings bytes", "/v1/embeddings", embed(input="Hello", encoding_format="bytes"), 4, 2),
    Case("embeddings missing input", "/v1/embeddings", embed(), 4, 4),
    Case("score", "/v1/score", embed(queries="cats", documents=DOCUMENTS)),
    Case("score text pairs", "/v1/score", embed(text_1="cats", text_2="kittens")),
    Case("score missing", "/v1/score", embed(queries="cats"), 4, 4),
    Case("rerank", "/v1/rerank", embed(query="cats", documents=DOCUMENTS)),
    Case("rerank top_n", "/v1/rerank", embed(query="cats", documents=DOCUMENTS, top_n=1)),
    Case("rerank bad top_n", "/v1/rerank", embed(query="cats", documents=DOCUMENTS, top_n=-1), 4, 4),
    Case("cross-encoder score", "/v1/score", embed(model="tiny-rerank", queries="cats", documents=DOCUMENTS)),
    Case("cross-encoder rerank", "/v1/rerank", embed(model="tiny-rerank", query="cats", documents=DOCUMENTS)),
    Case("embeddings from the cross-encoder", "/v1/embeddings", embed(model="tiny-rerank", input="Hi"), 4, 4),
    # A model asked for an endpoint its task does not serve (bare vLLM: the route is missing).
    Case("chat from the embedding model", "/v1/chat/completions", chat(model="tiny-embed"), 4, 4),
    Case("embeddings from the chat model", "/v1/embeddings", {"model": "tiny-chat", "input": "Hi"}, 4, 4),
]


def shape(response: httpx.Response) -> Any:
    """What must be the same at both servers: the JSON's top-level fields (an error's fields
    inside it), or a stream's event names in order (consecutive repeats counted once) and
    whether it ends with `[DONE]`."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line.removeprefix("event: ") for line in sse_lines(response.text) if line.startswith("event: ")]
        names = [name for i, name in enumerate(events) if i == 0 or events[i - 1] != name]
        return names, response.text.rstrip().endswith("data: [DONE]")
    body = response.json()
    if response.status_code >= 400:
        return sorted(body), sorted(body["error"])
    return sorted(body)


def test_the_table_covers_every_endpoint():
    assert len(CASES) >= 40
    assert {case.path for case in CASES} == {spec.path for spec in ENDPOINTS.values()}


# The gateway's engine priority (`apps.admission.gate`) where vLLM's request type has the field.
PRIORITY_KEPT = {"chat", "completion", "responses", "embeddings", "score", "rerank"}
PRIORITY_DROPPED = {"messages", "count_tokens", "tokenize", "detokenize"}


@pytest.mark.parametrize("endpoint", sorted(PRIORITY_KEPT | PRIORITY_DROPPED))
def test_the_gateways_priority_reaches_vllm_where_it_can_and_breaks_no_endpoint(endpoint):
    assert PRIORITY_KEPT | PRIORITY_DROPPED == set(ENDPOINTS)
    for path in ENDPOINTS[endpoint].request_types:
        kept = _known_fields({"priority": 7}, _protocol_model(path))
        assert kept == ({"priority": 7} if endpoint in PRIORITY_KEPT else {}), path


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_the_gateway_answers_as_bare_vllm_does(stack, case):
    model_id = case.body["model"] if case.body["model"] in stack.bare else "tiny-chat"
    bare = post(stack.bare[model_id], case.path, case.body)
    ours = post(stack.gateway, case.path, case.body, bearer())
    assert bare.status_code // 100 == case.bare, (bare.status_code, bare.text[:300])
    assert ours.status_code // 100 == case.gateway, (ours.status_code, ours.text[:300])
    if ours.status_code >= 400:
        # Always the error object of the endpoint's API (bare vLLM answers some with FastAPI's
        # `detail`, and a malformed /v1/messages body with OpenAI's object).
        assert shape(ours) == error_shape(case.path)
    elif case.gateway == case.bare:
        assert shape(ours) == shape(bare)


def error_shape(path: str) -> Any:
    if path.startswith("/v1/messages"):
        return ["error", "type"], ["message", "type"]
    return ["error"], ["code", "message", "param", "type"]


# --- the official clients ---------------------------------------------------------------------


def openai_client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=secret("full"), max_retries=0)


def test_openai_client_embeddings_float_and_base64_agree(stack):
    client = openai_client(stack)
    floats = client.embeddings.create(model="tiny-embed", input=["Hello", "World"], encoding_format="float")
    # The client decodes base64 itself (its default format).
    decoded = client.embeddings.create(model="tiny-embed", input=["Hello", "World"])
    assert [len(item.embedding) for item in floats.data] == [256, 256]
    for a, b in zip(floats.data, decoded.data, strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-6)
    assert floats.usage.prompt_tokens > 0


def test_openai_client_responses_whole_and_streamed(stack):
    client = openai_client(stack)
    whole = client.responses.create(model="tiny-chat", input="Hello there.", max_output_tokens=8)
    assert whole.status == "incomplete" and whole.usage.output_tokens == 8
    assert whole.output_text
    with client.responses.stream(model="tiny-chat", input="Hello there.", max_output_tokens=8) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.usage.output_tokens == 8


def test_anthropic_client_messages_whole_and_streamed(stack):
    # Anthropic's client sends its key as `x-api-key`.
    client = anthropic.Anthropic(base_url=stack.gateway, api_key=secret("full"), max_retries=0)
    whole = client.messages.create(model="tiny-chat", max_tokens=8, messages=MESSAGES)
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 8
    assert whole.content[0].type == "text" and whole.content[0].text
    with client.messages.stream(model="tiny-chat", max_tokens=8, messages=MESSAGES, system="Be brief.") as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text and final.usage.output_tokens == 8
    counted = client.messages.count_tokens(model="tiny-chat", messages=MESSAGES, system="Be brief.")
    assert counted.input_tokens == final.usage.input_tokens
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="tiny-chat", max_tokens=MAX_TOKENS_CAP + 1, messages=MESSAGES)
    assert refused.value.body["type"] == "error"
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=stack.gateway, api_key="sk-wrong", max_retries=0).messages.create(
            model="tiny-chat", max_tokens=8, messages=MESSAGES
        )


# --- values against vLLM's own ----------------------------------------------------------------


def embeddings(url: str, texts: list[str], headers: dict[str, str] | None = None) -> np.ndarray:
    response = post(url, "/v1/embeddings", embed(input=texts), headers)
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]])


def test_embeddings_are_stable_and_equal_vllms_own(stack):
    texts = ["The quick brown fox.", "Jumps over the lazy dog.", "The quick brown fox."]
    first = embeddings(stack.gateway, texts, bearer())
    again = embeddings(stack.gateway, texts, bearer())
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_allclose(first, embeddings(stack.bare["tiny-embed"], texts), atol=1e-3)
    assert not np.allclose(first[0], first[1]), "different texts, different embeddings"


@pytest.mark.parametrize("model", ["tiny-embed", "tiny-rerank"])
def test_score_and_rerank_order_is_the_models(stack, model):
    """By the embeddings' cosine similarity, or by a cross-encoder (`task: score`)."""
    query = {"model": model, "query": "a cat", "documents": DOCUMENTS}
    ours = post(stack.gateway, "/v1/rerank", query, bearer()).json()
    bare = post(stack.bare[model], "/v1/rerank", query).json()
    assert [r["index"] for r in ours["results"]] == [r["index"] for r in bare["results"]]
    scores = [r["relevance_score"] for r in ours["results"]]
    assert scores == sorted(scores, reverse=True)
    pairs = {"model": model, "queries": "a cat", "documents": DOCUMENTS}
    ours = post(stack.gateway, "/v1/score", pairs, bearer()).json()["data"]
    bare = post(stack.bare[model], "/v1/score", pairs).json()["data"]
    np.testing.assert_allclose([d["score"] for d in ours], [d["score"] for d in bare], atol=1e-3)


# --- LoRA adapters ----------------------------------------------------------------------------


def greedy_text(url: str, model: str, headers: dict[str, str] | None = None) -> str:
    body = chat(model=model, temperature=0, max_tokens=16)
    response = post(url, "/v1/chat/completions", body, headers)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_an_adapter_answers_as_vllm_does_with_it_and_unlike_its_base(stack):
    adapted = greedy_text(stack.gateway, ADAPTER, bearer())
    assert adapted != greedy_text(stack.gateway, "tiny-chat", bearer())
    assert adapted == greedy_text(stack.bare["tiny-chat"], ADAPTER)


def test_an_adapter_is_a_model_of_its_own_to_clients(stack):
    listed = httpx.get(f"{stack.gateway}/v1/models", headers=bearer(), timeout=10).json()["data"]
    (entry,) = [m for m in listed if m["id"] == ADAPTER]
    assert entry["parent"] == "tiny-chat"
    only = httpx.get(f"{stack.gateway}/v1/models", headers=bearer("adapter-only"), timeout=10).json()["data"]
    assert [m["id"] for m in only] == [ADAPTER]
    assert post(stack.gateway, "/v1/chat/completions", chat(), bearer("adapter-only")).status_code == 403
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=secret("adapter-only"), max_retries=0)
    answer = client.chat.completions.create(model=ADAPTER, messages=MESSAGES, max_tokens=4)
    assert answer.model == ADAPTER and answer.usage.completion_tokens == 4
    ingress_log_line(f"model={ADAPTER} key=adapter-only status=200")


def engine_pids() -> set[int]:
    """The model replicas' processes (a restarted engine is a new one)."""
    return {
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [""])[0].startswith("ray::ServeReplica:model-")
    }


def test_adding_and_removing_an_adapter_restarts_no_engine(stack):
    before = engine_pids()
    assert before
    (tiny,) = [m for m in stack.args["models"] if m["id"] == "tiny-chat"]
    second = {"name": "tiny-chat-lora-2", "path": tiny["lora"]["adapters"][0]["path"]}
    tiny["lora"]["adapters"].append(second)
    try:
        deploy(stack.args, PORT)
        deadline = time.monotonic() + 30
        while post(stack.gateway, "/v1/chat/completions", chat(model=second["name"]), bearer()).status_code == 404:
            assert time.monotonic() < deadline, "the new adapter was not served within 30 s"
            time.sleep(0.5)
        # The same weights under another name: the same greedy answer.
        assert greedy_text(stack.gateway, second["name"], bearer()) == greedy_text(stack.gateway, ADAPTER, bearer())
    finally:
        tiny["lora"]["adapters"].remove(second)
        deploy(stack.args, PORT)
    deadline = time.monotonic() + 30
    while post(stack.gateway, "/v1/chat/completions", chat(model=second["name"]), bearer()).status_code != 404:
        assert time.monotonic() < deadline, "the removed adapter was still served after 30 s"
        time.sleep(0.5)
    assert engine_pids() == before, "an adapter change restarted an engine"


# --- limits, keys and metrics -----------------------------------------------------------------


def test_output_caps_apply_to_responses_and_messages(stack):
    default = post(stack.gateway, "/v1/responses", {"model": "tiny-chat", "input": "Hi"}, bearer())
    assert default.status_code == 200 and default.json()["max_output_tokens"] == DEFAULT_MAX_TOKENS
    over = post(stack.gateway, "/v1/responses", responses(max_output_tokens=MAX_TOKENS_CAP + 1), bearer())
    assert over.status_code == 400 and over.json()["error"]["code"] == "max_tokens_too_large"
    assert over.json()["error"]["param"] == "max_output_tokens"
    over = post(stack.gateway, "/v1/messages", messages(max_tokens=MAX_TOKENS_CAP + 1), bearer())
    assert over.status_code == 400 and over.json()["error"]["type"] == "invalid_request_error"


def test_the_prompt_cap_holds_on_every_generating_endpoint_streamed_or_not(stack):
    long = [5] * (CHAT_PROMPT_CAP + 1)  # token ids: exactly this many prompt tokens
    whole = post(stack.gateway, "/v1/completions", completion(prompt=long), bearer())
    assert whole.status_code == 400 and "accepts at most 1024" in whole.json()["error"]["message"]
    text = "word " * CHAT_PROMPT_CAP  # more tokens than the cap once templated
    for path, body in (("/v1/responses", responses(input=text)), ("/v1/messages", messages(messages=[{"role": "user", "content": text}]))):
        refused = post(stack.gateway, path, body, bearer())
        assert refused.status_code == 400, refused.text[:300]
        streamed = post(stack.gateway, path, body | {"stream": True}, bearer())
        # The Responses API submits inside its stream, after its first event: the refusal is then
        # the stream's error event, in the API's format; never an internal error.
        assert streamed.status_code in (200, 400), streamed.text[:300]
        if streamed.status_code == 200:
            assert "event: error" in streamed.text and "accepts at most 1024" in streamed.text
            assert "internal" not in streamed.text


def test_embedding_inputs_are_capped_in_number_and_tokens(stack):
    many = post(stack.gateway, "/v1/embeddings", embed(input=["x"] * (MAX_INPUTS + 1)), bearer())
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_inputs"
    assert post(stack.gateway, "/v1/embeddings", embed(input=["x"] * MAX_INPUTS), bearer()).status_code == 200
    long = post(stack.gateway, "/v1/embeddings", embed(input=[[5] * (MAX_PROMPT_TOKENS + 1)]), bearer())
    assert long.status_code == 400 and "accepts at most 512" in long.json()["error"]["message"]
    documents = ["doc"] * MAX_INPUTS
    many = post(stack.gateway, "/v1/rerank", embed(query="q", documents=documents), bearer())
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_inputs"


def test_keys_limit_the_new_endpoints(stack):
    refused = post(stack.gateway, "/v1/embeddings", embed(input="Hello"), bearer("chat-only"))
    assert refused.status_code == 403
    # 60 tokens a minute. An input of 200 characters (about 50 tokens) fits once; a second must
    # wait; one of 400 (about 100 tokens) never fits.
    statuses = [
        post(stack.gateway, "/v1/embeddings", embed(input="word " * 40), bearer("metered")).status_code
        for _ in range(2)
    ]
    assert statuses == [200, 429]
    never = post(stack.gateway, "/v1/embeddings", embed(input="word " * 80), bearer("metered"))
    assert never.status_code == 400 and never.json()["error"]["code"] == "exceeds_token_limit"
    # tokenize costs one request of the key's two a minute.
    tokenize = {"model": "tiny-chat", "prompt": "Hello"}
    statuses = [post(stack.gateway, "/tokenize", tokenize, bearer("counted")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def scrape() -> dict[tuple[str, str, str], float]:
    """gateway_requests by (endpoint, model, status), summed over series."""
    totals: dict[tuple[str, str, str], float] = {}
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ray_gateway_requests_total":
                labels = sample.labels
                key = (labels.get("endpoint", ""), labels["model"], labels["status"])
                totals[key] = totals.get(key, 0) + sample.value
    return totals


def test_each_endpoint_is_counted_in_metrics_and_the_access_log(stack):
    """...and, with tracing off (this app has no OTEL_* environment), traced by nobody: no
    `x-trace-id`, `trace_id=-` in the access line."""
    sent = {
        "responses": ("/v1/responses", responses()),
        "messages": ("/v1/messages", messages()),
        "count_tokens": ("/v1/messages/count_tokens", {"model": "tiny-chat", "messages": MESSAGES}),
        "embeddings": ("/v1/embeddings", embed(input="Count me.")),
        "score": ("/v1/score", embed(text_1="a", text_2="b")),
        "rerank": ("/v1/rerank", embed(query="a", documents=["b"])),
        "tokenize": ("/tokenize", {"model": "tiny-embed", "prompt": "a"}),
        "detokenize": ("/detokenize", {"model": "tiny-chat", "tokens": [45]}),
    }
    before = scrape()
    ids = {}
    for endpoint, (path, body) in sent.items():
        response = post(stack.gateway, path, body, bearer() | {"x-request-id": f"endpoints-{endpoint}"})
        assert response.status_code == 200, response.text
        assert "x-trace-id" not in response.headers, "tracing is off unless OTEL_* says otherwise"
        ids[endpoint] = (body["model"], response.headers["x-request-id"])
    deadline = time.monotonic() + 30
    while True:
        after = scrape()
        grown = {
            endpoint
            for endpoint, (model, _) in ids.items()
            if after.get((endpoint, model, "200"), 0) > before.get((endpoint, model, "200"), 0)
        }
        if grown == set(sent) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert grown == set(sent)
    for endpoint, (model, request_id) in ids.items():
        line = ingress_log_line(f"access request_id={request_id} ")
        assert f"endpoint={endpoint} model={model} key=full status=200" in line
        assert line.endswith(" trace_id=-"), "tracing off: no trace"
        if endpoint in ("embeddings", "score", "rerank"):
            assert "prompt_tokens=0 " not in line, "a pooling request's input tokens are counted"


# --- bad input --------------------------------------------------------------------------------

BAD = [
    ("/v1/responses", responses(store=True), "unsupported_parameter"),
    ("/v1/responses", responses(previous_response_id="resp_123"), "unsupported_parameter"),
    ("/v1/responses", responses(background=True), "unsupported_parameter"),
    ("/v1/responses", responses(max_output_tokens=0), None),
    ("/v1/responses", responses(max_output_tokens="ten"), None),
    ("/v1/responses", responses(temperatur=0.5), "unknown_parameter"),
    ("/v1/responses", responses(stream="yes"), None),
    ("/v1/messages", messages(max_tokens=MAX_TOKENS_CAP + 1), None),
    ("/v1/messages", messages(stop_sequences=["a", "b", "c", "d", "e"]), None),
    ("/v1/messages", messages(messages="Hello"), None),
    ("/v1/messages", messages(temperatur=0.5), None),
    ("/v1/messages", {"model": "no-such-model", "max_tokens": 8, "messages": MESSAGES}, None),
    ("/v1/embeddings", embed(input=["x"] * (MAX_INPUTS + 1)), "too_many_inputs"),
    ("/v1/embeddings", embed(input="x", encoding_format="bytes"), None),
    ("/v1/embeddings", embed(input=[[5] * (MAX_PROMPT_TOKENS + 1)]), None),
    ("/v1/embeddings", {"model": "tiny-chat", "input": "x"}, "unsupported_endpoint"),
    ("/v1/chat/completions", chat(model="tiny-embed"), "unsupported_endpoint"),
    ("/v1/score", embed(queries="x"), None),
    ("/v1/rerank", embed(query="x", documents=5), None),
    ("/v1/rerank", embed(query="x"), None),
    ("/tokenize", {"model": "tiny-chat"}, None),
    ("/tokenize", {"model": "tiny-chat", "messages": [{"role": "wizard", "content": "x"}]}, None),
    ("/detokenize", {"model": "tiny-chat", "tokens": "abc"}, None),
    ("/v1/completions", completion(best_of=3), "unsupported_parameter"),
    ("/v1/completions", completion(best_of=0), None),
]


@pytest.mark.parametrize(("path", "body", "code"), BAD, ids=lambda value: str(value)[:40])
def test_bad_input_is_a_clear_4xx(stack, path, body, code):
    response = post(stack.gateway, path, body, bearer())
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert shape(response) == error_shape(path)
    error = response.json()["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    # The server keeps serving everyone else.
    assert post(stack.gateway, "/tokenize", {"model": "tiny-chat", "prompt": "ok"}, bearer()).status_code == 200


def test_an_anthropic_error_has_anthropics_type_for_its_status(stack):
    unauthenticated = post(stack.gateway, "/v1/messages", messages())
    assert unauthenticated.status_code == 401
    assert unauthenticated.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": unauthenticated.json()["error"]["message"]},
    }
    forbidden = post(stack.gateway, "/v1/messages", messages(model="tiny-embed"), bearer("chat-only"))
    assert forbidden.status_code == 403 and forbidden.json()["error"]["type"] == "permission_error"


# --- the ingress module -----------------------------------------------------------------------


def test_every_global_an_ingress_method_reads_exists_in_its_copy():
    """`serve.ingress` copies the class with the module's globals of that moment: a helper
    defined below the class is a NameError in the replica (it was, for two of them)."""
    from apps.edge.ingress import Ingress

    missing = []
    for name, method in inspect.getmembers(Ingress, inspect.isfunction):
        if method.__module__ != "apps.edge.ingress":
            continue
        for code in [method.__code__, *(c for c in method.__code__.co_consts if inspect.iscode(c))]:
            for instruction in dis.get_instructions(code):
                ref = instruction.argval
                if instruction.opname == "LOAD_GLOBAL" and ref not in method.__globals__:
                    if not hasattr(builtins, ref):
                        missing.append((name, ref))
    assert missing == []


def test_base64_embedding_is_little_endian_float32(stack):
    """What the openai client assumes when it decodes the default format."""
    response = post(stack.gateway, "/v1/embeddings", embed(input="Hello", encoding_format="base64"), bearer())
    raw = base64.b64decode(response.json()["data"][0]["embedding"])
    floats = post(stack.gateway, "/v1/embeddings", embed(input="Hello"), bearer()).json()["data"][0]["embedding"]
    np.testing.assert_allclose(np.frombuffer(raw, dtype="<f4"), floats, rtol=1e-6)


# --- pure logic of the table and the error styles ---------------------------------------------


def test_an_endpoint_is_found_by_its_path_within_the_app():
    from apps.endpoints import endpoint_of, error_style

    assert endpoint_of({"path": "/v1/messages", "root_path": ""}) is ENDPOINTS["messages"]
    # Mounted under a route prefix, the scope's path holds the prefix too.
    assert endpoint_of({"path": "/llm/v1/embeddings", "root_path": "/llm"}) is ENDPOINTS["embeddings"]
    assert endpoint_of({"path": "/health"}) is None
    assert error_style({"path": "/llm/v1/messages", "root_path": "/llm"}) == "anthropic"
    assert error_style({"path": "/nowhere"}) == "openai"


def test_each_style_writes_its_apis_error_body_and_stream_event():
    import json

    from apps.errors import Overloaded, error_body, error_event

    error = Overloaded("Busy.", reason="queue_full", retry_after_s=1)
    assert error_body(error)["error"]["code"] == "queue_full"
    assert error_body(error, "responses") == error_body(error), "Responses bodies are OpenAI's"
    assert error_body(error, "anthropic") == {"type": "error", "error": {"type": "overloaded_error", "message": "Busy."}}
    chat_event = error_event(error).decode()
    assert chat_event.startswith("data: {") and chat_event.endswith("data: [DONE]\n\n")
    for style, expected in (
        ("anthropic", {"type": "error", "error": {"type": "overloaded_error", "message": "Busy."}}),
        ("responses", {"type": "error", "code": "queue_full", "message": "Busy.", "param": None}),
    ):
        name, data = error_event(error, style).decode().split("\n", 1)
        assert name == "event: error" and json.loads(data.removeprefix("data: ")) == expected


def test_an_adapter_above_the_engines_rank_is_refused_where_files_are_checked(tmp_path):
    from apps.config import ConfigError, load_config

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    model = {"id": "m", "path": str(ROOT / "models/tiny-chat"), "lora": {"adapters": [{"name": "a", "path": str(adapter)}]}}
    with pytest.raises(ConfigError, match="rank 16, above max_lora_rank"):
        load_config({"models": [model | {"lora": model["lora"] | {"max_lora_rank": 8}}]})
    assert load_config({"models": [model]}).models[0].lora.max_lora_rank == 16
