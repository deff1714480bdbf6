"""Autoscaling on the real stack: a model at 1 replica under sustained load scales to 2, the new
replica warms up before it serves, and once the load drops it scales back to 1, with no request
failing on the way; a model scaled to zero is woken by a request, which waits for it. Short
delays and a small target stand in for the production defaults (30 s up, 600 s down,
0.75 x max_num_seqs), which tests/test_placement.py checks.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from ray import serve
from ray.serve.schema import ReplicaState

from apps.builder import deployment_name
from tests.conftest import app_args, replica_log_lines, serve_app, warm_up_and_first_request

PORT = 18500
BASE_URL = f"http://127.0.0.1:{PORT}"
MODEL = "tiny-chat"
ZERO_MODEL = "tiny-zero"  # min_replicas 0
# Each replica takes at most 4 requests; above 2 ongoing per replica, Serve adds one (up to 2).
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 5,
    "look_back_period_s": 11,
}
HEAVY_CLIENTS = 8  # about 8 ongoing: 4 per replica at 1 replica, above target
LIGHT_CLIENTS = 1  # below target even at 1 replica: scales back down, still serving
SCALE_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    (tiny,) = [m for m in app_args("app.yaml", local_paths=True)["models"] if m["id"] == MODEL]
    tiny["replicas"] = {"autoscaling": AUTOSCALING, "max_ongoing_requests": 4}
    zero = {
        "id": ZERO_MODEL,
        "path": tiny["path"],
        "engine": tiny["engine"],
        "parallelism": tiny["parallelism"],
        "replicas": {"autoscaling": {"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0}},
    }
    with serve_app({"ingress": {"num_cpus": 0.1}, "models": [tiny, zero]}, PORT) as url:
        yield url


def running_replicas(model: str = MODEL) -> int:
    application = serve.status().applications[deployment_name(model)]
    return application.deployments[deployment_name(model)].replica_states.get(ReplicaState.RUNNING, 0)


class Load:
    """Closed-loop streaming chat clients whose number can change; every answer is kept."""

    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.failures: list[str] = []
        self._clients: list[asyncio.Task[None]] = []

    async def set_clients(self, http: httpx.AsyncClient, count: int) -> None:
        while len(self._clients) < count:
            self._clients.append(asyncio.create_task(self._client(http)))
        while len(self._clients) > count:
            task = self._clients.pop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _client(self, http: httpx.AsyncClient) -> None:
        body = {
            "model": MODEL,
            "system_prompt": "support",
            "messages": [{"role": "user", "content": "Where is my order?"}],
            "max_tokens": 48,
            "ignore_eos": True,
            "stream": True,
        }
        while True:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                text = (await response.aread()).decode()
            ok = response.status_code == 200 and text.endswith("data: [DONE]\n\n") and '"error"' not in text
            self.statuses[str(response.status_code) if ok else f"{response.status_code}-broken"] += 1
            if not ok:
                self.failures.append(text[-300:])


async def wait_for_replicas(count: int) -> float:
    """Seconds until `count` replicas run; fails after SCALE_TIMEOUT_S."""
    started = time.monotonic()
    while await asyncio.to_thread(running_replicas) != count:
        assert time.monotonic() - started < SCALE_TIMEOUT_S, f"never reached {count} replicas"
        await asyncio.sleep(1)
    return time.monotonic() - started


async def scale_up_and_down(gateway: str) -> tuple[Load, float, float]:
    load = Load()
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http:
        await load.set_clients(http, HEAVY_CLIENTS)
        up_s = await wait_for_replicas(2)
        await asyncio.sleep(5)  # the new replica takes its share
        await load.set_clients(http, LIGHT_CLIENTS)
        down_s = await wait_for_replicas(1)
        await asyncio.sleep(2)  # and the remaining replica goes on serving
        await load.set_clients(http, 0)
    return load, up_s, down_s


def test_a_model_scales_up_under_load_and_back_down_without_failing_a_request(gateway):
    assert running_replicas() == 1
    load, up_s, down_s = asyncio.run(scale_up_and_down(gateway))
    assert not load.failures, (load.statuses, load.failures[:3])
    assert load.statuses["200"] > 20, load.statuses
    print(f"scaled up in {up_s:.0f} s, down in {down_s:.0f} s; answers: {dict(load.statuses)}")

    logs = replica_log_lines(deployment_name(MODEL))
    assert len(logs) == 2, f"one log per replica: {list(logs)}"
    for lines in logs.values():  # every replica warmed up, then served
        warm_up_and_first_request(lines, MODEL)


def test_a_model_scaled_to_zero_is_woken_by_a_request(gateway):
    assert running_replicas(ZERO_MODEL) == 0
    health = httpx.get(f"{gateway}/health", timeout=30)
    assert health.status_code == 200, "a model at zero replicas on purpose is not unhealthy"
    started = time.monotonic()
    response = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": ZERO_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        timeout=180,
    )
    waited_s = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] > 0
    assert running_replicas(ZERO_MODEL) == 1
    print(f"woke {ZERO_MODEL} in {waited_s:.0f} s")
