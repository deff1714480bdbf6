"""Metrics, traces, request ids and the access log on the real stack: a known workload against a
real Serve app with two real vLLM CPU engines, then what the node's Prometheus endpoint (Ray's
metrics agent), a real Prometheus scraping it and an OTLP receiver got, checked against what the
client saw.

One app for the module: `tiny-chat` (the embedded default's model, with its named system prompt,
one request in flight and one waiting, so a third is turned away) and `tiny-ngram` (ngram
speculative decoding), auth on with two keys: team-a with a token budget it never reaches (so its
requests take the rate limiter's way), team-b limited to 2 requests a minute. Tracing is on
(OpenTelemetry's environment, inherited by every Ray process), exporting to a receiver here.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families

from apps.edge.auth import key_hash
from scripts.sse import sse_lines
from tests.conftest import ROOT, app_args, replica_log_lines, serve_app, warm_up_and_first_request
from tests.promql import ALERTS, alert_metric_names, dashboard_exprs, dashboard_metric_names

PORT = 18460
METRICS_PORT = 18461
OTLP_PORT = 18462
PROMETHEUS_PORT = 18463
PROMETHEUS_URL = f"http://127.0.0.1:{PROMETHEUS_PORT}"
PROMETHEUS_CONFIG = ROOT / "cluster" / "prometheus.yml"
BASE_URL = f"http://127.0.0.1:{PORT}"
METRICS_URL = f"http://127.0.0.1:{METRICS_PORT}/metrics"
KEYS = {"team-a": {"tokens_per_minute": 10_000_000}, "team-b": {"requests_per_minute": 2}}
EXACT = {"ignore_eos": True}
USER = {"role": "user", "content": "Where is my order?"}
REPETITIVE = "one two three four five six seven eight " * 12
VOLATILE_SYSTEM = "Now: 2026-11-24T10:41:07Z. You are the support assistant."


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer sk-metrics-{name}"}


class Span(dict):
    """One exported span: name, ids (hex), kind, attributes, status."""


class OtlpReceiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver (protobuf): keeps every span it is sent."""

    def __init__(self, port: int) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    receiver.spans.extend(decoded(request))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                return None

        super().__init__(("127.0.0.1", port), Handler)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [span for span in self.spans if span["trace_id"] == trace_id]


def decoded(request: ExportTraceServiceRequest) -> Iterator[Span]:
    for resource_spans in request.resource_spans:
        service = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield Span(
                    name=span.name,
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent=span.parent_span_id.hex() or None,
                    kind=span.kind,
                    attributes={kv.key: any_value(kv.value) for kv in span.attributes},
                    status=(span.status.code, span.status.message),
                    service=service.get("service.name"),
                )


def any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver(OTLP_PORT)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    # OpenTelemetry's standard environment, inherited by every Ray process of the app.
    tracing_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{OTLP_PORT}",
        "OTEL_SERVICE_NAME": "llm-gateway-test",
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # export every 0.2 s (default 5 s)
    }
    with pytest.MonkeyPatch.context() as env:
        for name, value in tracing_env.items():
            env.setenv(name, value)
        yield receiver
    receiver.shutdown()


@pytest.fixture(scope="module")
def gateway(otlp: OtlpReceiver) -> Iterator[str]:
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
                {"name": name, "sha256": key_hash(auth(name)["Authorization"][len("Bearer ") :])} | limits
                for name, limits in KEYS.items()
            ],
        },
    }
    with serve_app(args, PORT, metrics_port=METRICS_PORT) as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(gateway: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """A real Prometheus (Debian's package, installed by the test set-up) with the shipped
    config and alert rules, its scrape pointed at the test app's node and sped up; started
    before the workload, so its rates see the traffic. None where it is not installed (its
    tests then skip, except on CI, where they fail)."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(NO_PROMETHEUS)
        yield None
        return
    directory = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    (ray_job,) = [job for job in config["scrape_configs"] if job["job_name"] == "ray"]
    del ray_job["file_sd_configs"]  # the shipped discovery file, made for a cluster's nodes
    ray_job["static_configs"] = [{"targets": [f"127.0.0.1:{METRICS_PORT}"]}]
    config["scrape_configs"] = [ray_job]
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (directory / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready(f"{PROMETHEUS_URL}/-/ready"):
            assert process.poll() is None, (directory / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.5)
        yield PROMETHEUS_URL
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


NO_PROMETHEUS = "prometheus is not installed (scripts/setup.sh test installs it)"


def require(prometheus: str | None) -> None:
    if prometheus is None:
        pytest.skip(NO_PROMETHEUS)


def ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def promql(query: str) -> list[dict[str, Any]]:
    """An instant query's result through Prometheus's HTTP API."""
    answer = httpx.get(f"{PROMETHEUS_URL}/api/v1/query", params={"query": query}, timeout=10).json()
    assert answer["status"] == "success", (query, answer)
    return answer["data"]["result"]


def promql_sums(query: str, *by: str) -> Counter[tuple[str, ...]]:
    """A `sum by (by)` query's non-zero values, keyed like `summed`'s."""
    values = Counter()
    for series in promql(query):
        value = float(series["value"][1])
        if value:
            values[tuple(series["metric"].get(label, "") for label in by)] = (
                int(value) if value.is_integer() else value
            )
    return values


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
        self.trace_ids: dict[str, str] = {}  # an answer's trace id, by its error code

    def record(self, model: str, key: str, response: httpx.Response, stream: bool) -> None:
        labels = (model, key)
        self.statuses[(*labels, str(response.status_code))] += 1
        if response.status_code != 200:
            code = response.json()["error"]["code"]
            self.reasons[(*labels, code)] += 1
            self.trace_ids[code] = response.headers["x-trace-id"]
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
    events = [line[len("data: ") :] for line in sse_lines(text) if line.startswith("data: ")]
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
def workload(gateway: str, prometheus: str | None) -> Seen:
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


# --- a real Prometheus: the dashboard's queries and the alert rules --------------------------
# (before the tests below that send requests of their own: the counts must be the workload's)


def test_prometheus_scrapes_the_same_requests_tokens_and_ttft_counts_the_client_saw(
    prometheus, workload, samples
):
    require(prometheus)

    def agree() -> bool:
        return (
            promql_sums("sum by (model, key, status) (ray_gateway_requests_total)", "model", "key", "status")
            == workload.statuses
            and promql_sums("sum by (model, key) (ray_gateway_generation_tokens_total)", "model", "key")
            == workload.completion_tokens
            and promql_sums("sum by (model, key) (ray_gateway_prompt_tokens_total)", "model", "key")
            == workload.prompt_tokens
            and promql_sums(
                "sum by (model, key) (ray_gateway_time_to_first_token_seconds_count)", "model", "key"
            )
            == workload.streams
        )

    deadline = time.monotonic() + 30
    while not agree():
        if time.monotonic() > deadline:
            requests = promql_sums(
                "sum by (model, key, status) (ray_gateway_requests_total)", "model", "key", "status"
            )
            assert requests == workload.statuses
            streams = promql_sums(
                "sum by (model, key) (ray_gateway_time_to_first_token_seconds_count)", "model", "key"
            )
            assert streams == workload.streams
            raise AssertionError("token counts differ from the client's")
        time.sleep(1)


def test_every_dashboard_panel_query_returns_data_from_prometheus(prometheus, samples):
    require(prometheus)
    exprs = dashboard_exprs()
    assert len(exprs) >= 20, exprs
    # Grafana's variables, as the dashboard's defaults resolve them.
    empty = [expr.replace("$model", ".*").replace("$__rate_interval", "1m") for expr in exprs]
    # Ray's agent may leave a series out of a scrape now and then (Prometheus marks it stale
    # until the next): each query gets a few scrapes to answer.
    deadline = time.monotonic() + 30
    while empty and time.monotonic() < deadline:
        empty = [query for query in empty if not promql(query)]
        time.sleep(1)
    assert not empty, f"panel queries without data: {empty}"


def test_the_alert_rules_load_and_evaluate_without_error(prometheus, samples):
    require(prometheus)
    deadline = time.monotonic() + 30
    while True:
        groups = httpx.get(f"{PROMETHEUS_URL}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        evaluated = [rule for rule in rules if rule.get("lastEvaluation", "").startswith("20")]
        if rules and len(evaluated) == len(rules):
            break
        assert time.monotonic() < deadline, "the rules were not evaluated"
        time.sleep(1)
    assert {rule["name"] for rule in rules} >= {"GatewayTTFTOverSLO", "GatewayErrorRateHigh"}
    failed = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not failed, failed


def test_queue_and_in_flight_gauges_are_exported_and_drained(samples):
    def drained(samples: Samples) -> None:  # gauges are exported every second
        depth_series = {labels["model"] for labels, _ in samples["ray_gateway_queue_depth"]}
        assert depth_series == {"tiny-chat", "tiny-ngram"}, "every model's queue depth is exported"
        assert not summed(samples, "ray_gateway_queue_depth", "model"), "nothing waits now"
        in_flight = {
            (labels["model"], labels["key"]) for labels, _ in samples["ray_gateway_requests_in_flight"]
        }
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
    assert {
        k: line[k] for k in ("model", "key", "status", "stream", "prompt_tokens", "completion_tokens")
    } == {
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


def test_every_metric_the_dashboard_and_the_alerts_query_is_exported(samples):
    queried = dashboard_metric_names() | alert_metric_names()
    assert len(queried) >= 10, queried
    missing = sorted(queried - set(samples))
    assert not missing, f"the dashboard or the alerts query metrics the app does not export: {missing}"


def test_each_model_replica_logs_its_warm_up_and_its_first_requests_ttft(workload):
    for model in ("tiny-chat", "tiny-ngram"):
        (lines,) = replica_log_lines(f"model-{model}").values()
        _, first = warm_up_and_first_request(lines, model)
        assert re.search(r"first bytes after \d+ ms", first), first


def ingress_log_lines() -> list[str]:
    return [line for lines in replica_log_lines("ingress").values() for line in lines]


# --- traces -------------------------------------------------------------------------------------

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
SERVER_KIND, ERROR_STATUS = 2, 2  # OTLP's SPAN_KIND_SERVER, STATUS_CODE_ERROR
INGRESS_SPANS = {"authenticate", "read", "shape", "rate_limit", "queue", "model_call", "relay"}


def spans_of(otlp: OtlpReceiver, trace_id: str, names: set[str], timeout_s: float = 30) -> dict[str, Span]:
    """The trace's spans by name, once every one of `names` has arrived (spans are exported in
    batches, from every process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = otlp.trace(trace_id)
        by_name = {span["name"]: span for span in spans}
        if names <= by_name.keys():
            return by_name
        assert time.monotonic() < deadline, f"missing spans: {sorted(names - by_name.keys())}"
        time.sleep(0.5)


def test_a_streamed_request_is_one_trace_across_every_hop_continuing_the_clients(gateway, otlp):
    body = chat_body("tiny-chat", stream=True, max_tokens=8)
    traceparent = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
    response = httpx.post(
        f"{gateway}/v1/chat/completions",
        json=body,
        headers=auth("team-a") | {"traceparent": traceparent, "x-request-id": "traced-1"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-trace-id"] == CLIENT_TRACE_ID, "the client's trace is continued"
    usage = stream_usage(response.text)
    root_name = "POST /v1/chat/completions"
    spans = spans_of(
        otlp, CLIENT_TRACE_ID, INGRESS_SPANS | {root_name, "route", "model_server", "llm_request"}
    )

    root = spans[root_name]
    assert (root["parent"], root["kind"]) == (CLIENT_SPAN_ID, SERVER_KIND)
    for name in INGRESS_SPANS:
        assert spans[name]["parent"] == root["span_id"], name
    call = spans["model_call"]
    assert spans["route"]["parent"] == call["span_id"]
    assert spans["model_server"]["parent"] == call["span_id"]
    assert spans["llm_request"]["parent"] == spans["model_server"]["span_id"], "vLLM's span joins the trace"
    assert {span["service"] for name, span in spans.items() if name != "llm_request"} == {"llm-gateway-test"}

    attributes = root["attributes"]
    assert attributes["gen_ai.request.model"] == "tiny-chat"
    assert attributes["gateway.key"] == "team-a"
    assert attributes["http.response.status_code"] == 200
    assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attributes["gateway.request_id"] == "traced-1"
    assert spans["queue"]["attributes"]["gateway.priority"] == "normal"
    route = spans["route"]["attributes"]
    assert route["gateway.route.reason"] in ("prefix_affinity", "least_loaded", "imbalance_fallback")
    assert call["attributes"]["gateway.replica"] == spans["model_server"]["attributes"]["gateway.replica"]
    engine = spans["model_server"]["attributes"]
    assert engine["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert engine["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert 0 <= engine["gen_ai.usage.cached_tokens"] <= usage["prompt_tokens"]
    assert engine["gen_ai.time_to_first_token_s"] > 0
    assert engine["gen_ai.response.finish_reasons"] == ["length"]
    assert spans["llm_request"]["attributes"]["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]
    secret = auth("team-a")["Authorization"].split()[1]
    assert not [s for s in spans.values() if secret in json.dumps(s)], "a span carries the key itself"

    deadline = time.monotonic() + 10
    while not [line for line in ingress_log_lines() if "request_id=traced-1 " in line]:
        assert time.monotonic() < deadline, "no access line"
        time.sleep(0.2)
    (line,) = [line for line in ingress_log_lines() if "request_id=traced-1 " in line]
    assert line.endswith(f"trace_id={CLIENT_TRACE_ID}"), line


@pytest.mark.parametrize(
    ("code", "failed_stage"), [("rate_limit_exceeded", "rate_limit"), ("queue_full", "queue")]
)
def test_a_refused_requests_trace_carries_its_error_code(workload, otlp, code, failed_stage):
    """The workload's 429 (team-b's third request) and 503 (the third long request): a trace of
    their own (no traceparent sent), failed with the code the client saw."""
    trace_id = workload.trace_ids[code]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    spans = spans_of(otlp, trace_id, {"POST /v1/chat/completions", failed_stage})
    root = spans["POST /v1/chat/completions"]
    assert root["parent"] is None, "a new trace"
    for span in (root, spans[failed_stage]):
        assert span["status"][0] == ERROR_STATUS, span
        assert span["attributes"]["error.type"] == code
    assert "model_call" not in spans, "refused before any model call"
