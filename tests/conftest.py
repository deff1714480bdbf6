"""Shared test helpers: loading the committed Serve configs, running a real Serve app, and making
stand-in checkpoints."""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TINY_CHAT = ROOT / "models" / "tiny-chat"
CONFIGS = ROOT / "configs"


def ray_serve_env() -> dict[str, str]:
    """configs/ray-serve.env: how Ray Serve runs the gateway (HAProxy in front, throughput mode)."""
    lines = (CONFIGS / "ray-serve.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


# The tests run Serve as it is shipped. Set before Ray is imported: Serve reads it at import, and
# every Ray process the tests start inherits it.
for _name, _value in ray_serve_env().items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("RAY_SERVE_HAPROXY_BINARY_PATH", str(Path(sys.executable).parent / "llm-gateway-haproxy"))
# An ingress replica serving HTTP itself keeps serving 30 s after its shutdown starts, so a load
# balancer can notice; a test app's shutdown has nobody to wait for.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")

import pytest  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve._private.api import serve_start  # noqa: E402
from ray.serve.handle import DeploymentHandle  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from apps.applications import GATEWAY_APP, compose_file, split_args  # noqa: E402

APP_START_TIMEOUT_S = 600


def app_args(config_file: str, *, local_paths: bool = False) -> dict[str, Any]:
    """The whole config (`AppConfig`'s fields) the applications of a committed Serve config file
    make together. `local_paths`: model paths made absolute (configs name them relative to the
    project root)."""
    serve_config = yaml.safe_load((CONFIGS / config_file).read_text())
    args = compose_file(serve_config)
    if local_paths:
        for model in args["models"]:
            model["path"] = str(ROOT / model["path"])
    return args


def serve_config(args: dict[str, Any], port: int) -> dict[str, Any]:
    """A Serve config file's content for a whole config: its applications (`split_args`)."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": split_args(args),
    }


def deploy(args: dict[str, Any], port: int) -> None:
    """What `serve deploy` of the file for `args` does, from the test process; waits until
    every application runs."""
    config = ServeDeploySchema.model_validate(serve_config(args, port))
    client = serve_start(http_options={"host": "127.0.0.1", "port": port})
    client.deploy_apps(config)
    for application in config.applications:
        client._wait_for_application_running(application.name, timeout_s=APP_START_TIMEOUT_S)


# Ray's metrics agent pushes to its endpoint every 10 s by default; tests wait less.
TEST_METRICS_REPORT_INTERVAL_MS = 500


@contextmanager
def serve_app(
    args: dict[str, Any], port: int, *, dashboard: bool = False, metrics_port: int | None = None
) -> Iterator[str]:
    """A real Serve app built from `args` on a fresh 2-CPU Ray instance; yields its base URL.
    `dashboard`: also start the dashboard, which serves the state API. `metrics_port`: where
    Ray's metrics agent exports the node's Prometheus metrics (quickly refreshed)."""
    ray.init(
        num_cpus=2,
        include_dashboard=dashboard,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config=(
            {"metrics_report_interval_ms": TEST_METRICS_REPORT_INTERVAL_MS} if metrics_port else None
        ),
    )
    try:
        deploy(args, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def driver_handle(handle: DeploymentHandle) -> DeploymentHandle:
    """`handle`, usable from the tests' synchronous code. Serve's throughput mode runs a handle's
    router on the caller's event loop, and the test process has none: this handle gets its own."""
    if not handle.is_initialized:  # serve.run may return the handle an earlier test set up
        handle._init(_run_router_in_separate_loop=True)
    return handle


def replica_log_lines(deployment: str) -> dict[str, list[str]]:
    """Each replica's log lines of a deployment (a model's, or the gateway's ingress), by log
    file (Serve writes one per replica under the current Ray session, and keeps it after the
    replica stops)."""
    application = deployment if deployment.startswith("model-") else GATEWAY_APP
    pattern = f"/tmp/ray/session_latest/logs/serve/replica_{application}_{deployment}_*.log"
    return {path: Path(path).read_text(errors="replace").splitlines() for path in sorted(glob.glob(pattern))}


def ingress_log_line(text: str, timeout_s: float = 10) -> str:
    """The first ingress log line containing `text`, waited for: the access line is written after
    the answer's last byte has left, so a client can hold its answer before the line exists."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in (line for lines in replica_log_lines("ingress").values() for line in lines):
            if text in line:
                return line
        assert time.monotonic() < deadline, f"no ingress log line with {text!r} within {timeout_s} s"
        time.sleep(0.2)


def warm_up_and_first_request(lines: list[str], model_id: str) -> tuple[str, str]:
    """A model replica's log lines saying it warmed up and when its first client request got its
    first bytes; fails unless there is one of each, in that order."""
    warmed = [i for i, line in enumerate(lines) if f"Model {model_id} warmed up:" in line]
    first = [i for i, line in enumerate(lines) if f"Model {model_id}: first client request's" in line]
    assert len(warmed) == 1 and len(first) == 1, (model_id, warmed, first)
    assert warmed[0] < first[0], f"a replica of {model_id} served before it was warm"
    return lines[warmed[0]], lines[first[0]]


@pytest.fixture
def make_checkpoint(tmp_path: Path):
    """A directory with just a config.json: enough for config validation, no weights."""

    def make(name: str = "ckpt", heads: int = 4, kv_heads: int = 2) -> str:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(
            json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv_heads})
        )
        return str(path)

    return make


# The suite's exit status, kept for `pytest_unconfigure`.
_exit_status = 0


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with the suite's status as soon as pytest is done. The test process has imported
    Ray, torch and vLLM, whose background threads outlive the tests: once, on CI, the
    interpreter's own shutdown crashed (SIGSEGV, exit 139) after all 585 tests had passed.
    Nothing is left to run once pytest has written its report (and its cache)."""
    ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
