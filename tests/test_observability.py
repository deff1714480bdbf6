"""Metrics, request ids and the access log on the real stack: a known workload against a real Serve
app with two real vLLM CPU engines, then one scrape of the node's Prometheus endpoint (Ray's
metrics agent) checked against what the client saw.

One app for the module: `tiny-chat` (the embedded default's model, with its named system prompt,
one request in flight and one waiting, so a third is turned away) and `tiny-ngram` (ngram
speculative decoding), auth on with two keys, one of them limited to 2 requests a minute.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apps.auth import key_hash
from tests.conftest import ROOT, app_args, replica_log_lines, serve_app, warm_up_and_first_request

PORT = 18460
METRICS_PORT = 18461
BASE_URL = f"http://127.0.0.1:{PORT}"
METRICS_URL = f"http://127.0.0.1:{METRICS_PORT}/metrics"
DASHBOARD = ROOT / "cluster" / "grafana-dashboard.json"
KEYS = {"team-a": {}, "team-b": {"requests_per_minute": 2}}
EXACT = {"ignore_eos": True}
USER = {"role": "user", "content": "Where is my order?"}
REPETITIVE = "one two three four five six seven eight " * 12
VOLATILE_SYSTEM = "Now: 2026-11-24T10:41:07Z. You are the support assistant."


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer sk-metrics-{name}"}


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    (tiny,) = [m for m in app_args("app.yaml", local_paths=True)["models"] if m["id"] == "tiny-chat"]
    tiny["admission"] = {"max_in_flight": 1, "max_queued": 1}
    ngram = {
        "id": "tiny-ngram",
        "path": tiny["path"],
        "engine": tiny["engine"]
        | {
            "speculative": {
                "method": "ngram",
                "num_speculative_tokens": 4,
                "prompt_lookup_min": 2,
                "prompt_lookup_max": 4,
            }
        },
        "parallelism": tiny["parallelism"],
    }
    args = {
        "ingress": {"num_cpus": 0.1},
        "models": [tiny, ngram],
        "auth": {
            "enabled": True,
            "keys": [
                {"name": name, "sha256": key_hash(auth(name)["Authorization"][len("Bearer ") :])}
                | limits
                for name, limits in KEYS.items()
            ],
        },
    }
    with serve_app(args, PORT, metrics_port=METRICS_PORT) as url:
        yield url


class Seen:
    """What the client saw, per (model, key): statuses, error codes, tokens, streams."""

    def __init__(self) -> None:
        self.statuses: Counter[tuple[str, str, str]] = Counter()
        self.reasons: Counter[tuple[str, str, str]] = Counter()
        self.prompt_tokens: Counter[tuple[str, str]] = Counter()
        self.completion_tokens: Counter[tuple[str, str]] = Counter()
        self.successes: Counter[tuple[str, str]] = Counter()
        self.streams: Counter[tuple[str, str]] = Counter()
        self.reached_gate: Counter[tuple[str, str]] = Counter()

    def record(self, model: str, key: str, response: httpx.Response, stream: bool) -> None:
        labels = (model, key)
        self.statuses[(*labels, str(response.status_code))] += 1
        if response.status_code != 200:
            code = response.json()["error"]["code"]
            self.reasons[(*labels, code)] += 1
            if code in ("queue_full", "priority_shed", "queue_timeout"):
                self.reached_gate[labels] += 1
            return
        self.successes[labels] += 1
        self.reached_gate[labels] += 1
        usage = stream_usage(response.text) if stream else response.json()["usage"]
        self.streams[labels] += stream
        self.prompt_tokens[labels] += usage["prompt_tokens"]
        self.completion_tokens[labels] += usage["completion_tokens"]


def stream_usage(text: str) -> dict[str, int]:
    events = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return json.loads(events[-2])["usage"]


def chat_body(model: str, stream: bool = False, **fields: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [USER], "max_tokens": 5, "stream": stream} | EXACT | fields
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def completion_body(model: str, stream: bool) -> dict[str, Any]:
    # Greedy decoding makes the tiny model repeat itself, which ngram drafting feeds on.
    body = {"model": model, "prompt": REPETITIVE, "max_tokens": 32, "temperature": 0, "stream": stream}
    body |= EXACT
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@pytest.fixture(scope="module")
def workload(gateway: str) -> Seen:
    """The known workload, run once; what the client saw."""
    seen = Seen()
    client = httpx.Client(base_url=gateway, timeout=120)

    def send(path: str, body: dict[str, Any], key: str, **headers: str) -> httpx.Response:
        response = client.post(path, json=body, headers=auth(key) | headers)
        model = body["model"] if body["model"] in ("tiny-chat", "tiny-ngram") else "-"
        seen.record(model, key, response, body.get("stream", False))
        return response

    for stream in (False, False, True, True):
        send("/v1/chat/completions", chat_body("tiny-chat", stream), "team-a")
    for stream in (False, True, True):
        send("/v1/completions", completion_body("tiny-ngram", stream), "team-a")
    send("/v1/chat/completions", chat_body("tiny-chat", system_prompt="support"), "team-a")
    for _ in range(3):  # 2 a minute: the third is refused
        send("/v1/chat/completions", chat_body("tiny-chat"), "team-b")
    send("/v1/chat/completions", chat_body("gpt-9"), "team-a")  # 404, not a label
    send("/v1/chat/completions", chat_body("tiny-chat", n=99), "team-a")  # 400
    for _ in range(2):
        volatile = chat_body("tiny-chat", messages=[{"role": "system", "content": VOLATILE_SYSTEM}, USER])
        send("/v1/chat/completions", volatile, "team-a")
    client.close()
    # One in flight, one waiting, the third turned away: long answers keep the slot busy.
    long = chat_body("tiny-chat", max_tokens=300)
    for response in asyncio.run(post_concurrently(gateway, [long] * 3, "team-a")):
        seen.record("tiny-chat", "team-a", response, stream=False)
    return seen


async def post_concurrently(gateway: str, bodies: list[dict], key: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as client:
        return await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body, headers=auth(key)) for body in bodies)
        )


# --- reading the scrape -----------------------------------------------------------------------


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape() -> Samples:
    samples: Samples = {}
    text = httpx.get(METRICS_URL, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def summed(samples: Samples, name: str, *by: str, **where: str) -> Counter[tuple[str, ...]]:
    """`sum by (by) (name{where})`, as PromQL would, over every worker's series."""
    totals: Counter[tuple[str, ...]] = Counter()
    for labels, value in samples.get(name, []):
        if all(labels.get(k) == v for k, v in where.items()):
            totals[tuple(labels.get(label, "") for label in by)] += value
    return Counter({k: int(v) if float(v).is_integer() else v for k, v in totals.items() if v})


def eventually(check: Callable[[Samples], None], timeout_s: float = 30.0) -> Samples:
    """Scrape until `check` passes (Ray's agent exports what replicas record every 0.5 s here);
    the last failure if it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape()
        try:
            check(samples)
            return samples
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


@pytest.fixture(scope="module")
def samples(workload: Seen) -> Samples:
    def all_recorded(samples: Samples) -> None:
        assert summed(samples, "ray_gateway_requests_total", "model", "key", "status") == workload.statuses
        assert summed(samples, "ray_gateway_generation_tokens_total", "model", "key") == (
            workload.completion_tokens
        )

    return eventually(all_recorded)


# --- the tests --------------------------------------------------------------------------------


def test_the_workload_saw_every_kind_of_outcome(workload):
    """The workload is what the other tests claim it is (else they would test less)."""
    codes = {reason for (_, _, reason) in workload.reasons}
    assert {"rate_limit_exceeded", "model_not_found", "queue_full"} <= codes, workload.reasons
    assert workload.streams[("tiny-ngram", "team-a")] == 2


def test_requests_are_counted_by_final_status(workload, samples):
    assert summed(samples, "ray_gateway_requests_total", "model", "key", "status") == workload.statuses


def test_rejections_are_counted_by_the_code_the_client_saw(workload, samples):
    assert summed(samples, "ray_gateway_rejections_total", "model", "key", "reason") == workload.reasons


def test_token_counters_equal_the_usage_returned(workload, samples):
    assert summed(samples, "ray_gateway_prompt_tokens_total", "model", "key") == workload.prompt_tokens
    assert summed(samples, "ray_gateway_generation_tokens_total", "model", "key") == (
        workload.completion_tokens
    )


def test_latency_histograms_have_one_observation_per_answer(workload, samples):
    def count(name: str) -> Counter[tuple[str, ...]]:
        return summed(samples, f"ray_gateway_{name}_count", "model", "key")

    assert count("time_to_last_token_seconds") == workload.successes
    assert count("time_to_first_token_seconds") == workload.streams
    assert count("inter_token_latency_seconds") == workload.streams
    assert count("queue_wait_seconds") == workload.reached_gate
    # Buckets are cumulative: the +Inf bucket holds every observation.
    inf = summed(samples, "ray_gateway_time_to_last_token_seconds_bucket", "model", "key", le="+Inf")
    assert inf == workload.successes


def test_queue_and_in_flight_gauges_are_exported_and_drained(samples):
    def drained(samples: Samples) -> None:  # gauges are exported every second
        depth_series = {labels["model"] for labels, _ in samples["ray_gateway_queue_depth"]}
        assert depth_series == {"tiny-chat", "tiny-ngram"}, "every model's queue depth is exported"
        assert not summed(samples, "ray_gateway_queue_depth", "model"), "nothing waits now"
        in_flight = {(labels["model"], labels["key"]) for labels, _ in samples["ray_gateway_requests_in_flight"]}
        assert in_flight == {("tiny-chat", "team-a"), ("tiny-chat", "team-b"), ("tiny-ngram", "team-a")}
        assert not summed(samples, "ray_gateway_requests_in_flight", "model", "key"), "nothing in flight"

    eventually(drained, timeout_s=10)


def test_engine_metrics_are_exported_for_both_models(samples):
    for name in (
        "ray_vllm_num_requests_running",
        "ray_vllm_num_requests_waiting",
        "ray_vllm_kv_cache_usage_perc",
        "ray_vllm_prefix_cache_queries_total",
        "ray_vllm_prefix_cache_hits_total",
    ):
        models = {labels.get("model_name") for labels, _ in samples.get(name, [])}
        assert models == {"tiny-chat", "tiny-ngram"}, (name, models)
    drafted = summed(samples, "ray_vllm_spec_decode_num_draft_tokens_total", "model_name")
    accepted = summed(samples, "ray_vllm_spec_decode_num_accepted_tokens_total", "model_name")
    assert drafted[("tiny-ngram",)] > 0, drafted
    assert 0 <= accepted[("tiny-ngram",)] <= drafted[("tiny-ngram",)]
    hits = summed(samples, "ray_vllm_prefix_cache_hits_total", "model_name")
    assert hits[("tiny-chat",)] > 0, "the warmed named system prompt and the repeated prompts hit"


def test_volatile_system_prompts_are_counted_and_warned_about_once(workload, samples):
    counted = summed(samples, "ray_gateway_volatile_prefixes_total", "model", "kind")
    assert counted == Counter({("tiny-chat", "timestamp"): 2}), counted
    warnings = [line for line in ingress_log_lines() if "per-request content" in line]
    assert len(warnings) == 1, warnings
    assert "Model tiny-chat" in warnings[0] and "timestamp" in warnings[0]


def test_the_request_id_is_returned_and_in_the_access_log(gateway, workload):
    response = httpx.post(
        f"{gateway}/v1/chat/completions",
        json=chat_body("tiny-chat"),
        headers=auth("team-a") | {"x-request-id": "metrics-test-42"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "metrics-test-42"
    usage = response.json()["usage"]
    generated = httpx.post(f"{gateway}/v1/chat/completions", json={}, timeout=30)
    assert generated.status_code == 401
    assert re.fullmatch(r"[0-9a-f-]{36}", generated.headers["x-request-id"]), "a UUID when none is given"

    def access_line(request_id: str) -> dict[str, str]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in ingress_log_lines():
                if f"access request_id={request_id} " in line:
                    text = line[line.index("access request_id=") + len("access ") :]
                    return dict(pair.split("=", 1) for pair in text.split())
            time.sleep(0.2)
        raise AssertionError(f"no access line for {request_id}")

    line = access_line("metrics-test-42")
    assert {k: line[k] for k in ("model", "key", "status", "stream", "prompt_tokens", "completion_tokens")} == {
        "model": "tiny-chat",
        "key": "team-a",
        "status": "200",
        "stream": "false",
        "prompt_tokens": str(usage["prompt_tokens"]),
        "completion_tokens": str(usage["completion_tokens"]),
    }
    assert 0 < float(line["ttft_ms"]) <= float(line["total_ms"])
    refused = access_line(generated.headers["x-request-id"])
    assert (refused["status"], refused["reason"], refused["key"]) == ("401", "missing_api_key", "-")


def test_every_metric_the_dashboard_queries_is_exported(samples):
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"\bray_[a-z0-9_]+", target["expr"])
    }
    assert len(queried) >= 10, queried
    missing = sorted(queried - set(samples))
    assert not missing, f"the dashboard queries metrics the app does not export: {missing}"


def test_each_model_replica_logs_its_warm_up_and_its_first_requests_ttft(workload):
    for model in ("tiny-chat", "tiny-ngram"):
        (lines,) = replica_log_lines(f"model-{model}").values()
        _, first = warm_up_and_first_request(lines, model)
        assert re.search(r"first bytes after \d+ ms", first), first


def ingress_log_lines() -> list[str]:
    return [line for lines in replica_log_lines("ingress").values() for line in lines]
