"""Batch limits from the engines' real KV capacity, on the real stack: two models of the same
checkpoint whose CPU KV caches are 1 and 2 GiB, both with `admission.typical_request_tokens`
set, and a batch bound (`max_num_seqs`) above what either cache holds of requests that long.
Each replica reads its engine's KV capacity once it has started and publishes it
(`apps.admission.capacity`); the ingress sizes each model's admission bound from it, logs the numbers and
exports the bound: the 2 GiB model's bound is twice the 1 GiB model's.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apps.admission.gate import ONGOING_REQUESTS_HEADROOM
from tests.conftest import app_args, ingress_log_line, replica_log_lines, serve_app

PORT = 18840
METRICS_PORT = 18841
TYPICAL_TOKENS = 2048
MAX_NUM_SEQS = 1024  # more than 1 GiB of this model's KV cache holds of 2048-token requests
KV_GIB = {"kv-1g": 1, "kv-2g": 2}
CAPACITY_LINE = re.compile(
    r"Model (?P<model>\S+): its engine's KV cache holds (?P<tokens>\d+) tokens, (?P<requests>\d+) requests "
    r"of (?P<typical>\d+) tokens \(max_num_seqs (?P<batch>\d+)\): (?P<bound>\d+) per replica at once\."
)


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    (tiny,) = [m for m in app_args("app.yaml", local_paths=True)["models"] if m["id"] == "tiny-chat"]
    models = []
    for model_id, gib in KV_GIB.items():
        model = {key: value for key, value in tiny.items() if key not in ("lora", "system_prompts")}
        model["id"] = model_id
        model["engine"] = tiny["engine"] | {"max_num_seqs": MAX_NUM_SEQS, "cpu_kvcache_space_gib": gib}
        model["admission"] = {"typical_request_tokens": TYPICAL_TOKENS}
        models.append(model)
    with serve_app({"ingress": {"num_cpus": 0.1}, "models": models}, PORT, metrics_port=METRICS_PORT) as url:
        yield url


def sized(model_id: str) -> dict[str, int]:
    """The ingress's log line saying how it sized `model_id` from its engine's KV capacity."""
    line = ingress_log_line(f"Model {model_id}: its engine's KV cache holds", timeout_s=30)
    match = CAPACITY_LINE.search(line)
    assert match and match["model"] == model_id, line
    return {name: int(value) for name, value in match.groupdict().items() if name != "model"}


def test_doubling_the_kv_cache_doubles_the_admission_bound(gateway):
    small, large = sized("kv-1g"), sized("kv-2g")
    assert large["tokens"] == 2 * small["tokens"], (small, large)
    assert small["requests"] == small["tokens"] // TYPICAL_TOKENS < MAX_NUM_SEQS, "the KV cache binds"
    assert large["requests"] == 2 * small["requests"]
    for numbers in (small, large):
        assert numbers["bound"] == math.ceil(numbers["requests"] * ONGOING_REQUESTS_HEADROOM)
        assert (numbers["typical"], numbers["batch"]) == (TYPICAL_TOKENS, MAX_NUM_SEQS)


def test_each_replica_logs_the_kv_capacity_its_engine_sized_itself_to(gateway):
    for model_id in KV_GIB:
        (lines,) = replica_log_lines(f"model-{model_id}").values()
        (line,) = [line for line in lines if f"Model {model_id}: KV cache of " in line]
        assert f"KV cache of {sized(model_id)['tokens']} tokens" in line, line


def admission_bounds() -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    return {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ray_gateway_admission_max_in_flight"
    }


def test_the_bound_is_exported_and_the_models_serve(gateway):
    expected = {model_id: sized(model_id)["bound"] for model_id in KV_GIB}  # one ingress replica
    deadline = time.monotonic() + 30
    while (exported := admission_bounds()) != expected:
        assert time.monotonic() < deadline, (exported, expected)
        time.sleep(1)
    for model_id in KV_GIB:
        body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        response = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
