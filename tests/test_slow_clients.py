"""Slow and stalled senders on the real stack, behind HAProxy as shipped (configs/ray-serve.env):
more stalled sockets than the ingress used to have slots do not keep another client from being
served, every one of them is answered within its bound, and a client that leaves while sending
is counted as gone (499), not as a server error.

Measured before these bounds (Ray's defaults: HAProxy's client timeout an hour, 1024 ingress
slots): 1,100 stalled senders held every slot and a normal request waited until they were cut.
"""

from __future__ import annotations

import glob
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from apps.config import DEFAULT_BODY_TIMEOUT_S
from tests.conftest import app_args, ray_serve_env, serve_app

PORT = 18810
STALLED_SENDERS = 1100
HAPROXY_CLIENT_TIMEOUT_S = float(ray_serve_env()["RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S"])
# Time for the answers to come through HAProxy and the test to read 1,100 sockets.
SLACK_S = 5.0
PARTIAL_REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100000\r\n\r\n"
    b'{"model": "tiny-chat", "messages": ['
)


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    args = app_args("app.yaml", local_paths=True)
    args["models"] = [model for model in args["models"] if model["id"] == "tiny-chat"]
    with serve_app(args, PORT) as url:
        yield url


def chat(url: str) -> tuple[int, float]:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    return response.status_code, time.monotonic() - started


def first_line(sock: socket.socket, deadline: float) -> str:
    """The status line the server answered on `sock`, "closed" or "timeout"."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        data = sock.recv(256)
    except TimeoutError:
        return "timeout"
    except OSError:
        return "closed"
    return data.split(b"\r\n", 1)[0].decode(errors="replace") if data else "closed"


def test_stalled_senders_hold_no_one_else_up_and_get_408_within_the_body_timeout(gateway):
    assert chat(gateway)[0] == 200
    senders = []
    try:
        for _ in range(STALLED_SENDERS):
            sock = socket.create_connection(("127.0.0.1", PORT))
            sock.sendall(PARTIAL_REQUEST)  # headers, a few bytes of the body, then nothing
            senders.append(sock)
        stalled_at = time.monotonic()
        time.sleep(1.0)  # every partial request has reached the ingress
        status, waited_s = chat(gateway)
        assert status == 200
        # The failure this guards against waits until the stalled requests are cut.
        assert waited_s < DEFAULT_BODY_TIMEOUT_S / 2, f"a normal request waited {waited_s:.1f}s"
        deadline = stalled_at + DEFAULT_BODY_TIMEOUT_S + SLACK_S
        answers = Counter(first_line(sock, deadline) for sock in senders)
    finally:
        for sock in senders:
            sock.close()
    assert answers == {"HTTP/1.1 408 Request Timeout": STALLED_SENDERS}, answers


def test_a_stalled_header_sender_is_closed_by_haproxy_with_408(gateway):
    with socket.create_connection(("127.0.0.1", PORT)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n")  # no end of headers
        started = time.monotonic()
        line = first_line(sock, started + HAPROXY_CLIENT_TIMEOUT_S + SLACK_S)
        waited_s = time.monotonic() - started
    assert line.startswith("HTTP/1.1 408"), line
    assert waited_s > HAPROXY_CLIENT_TIMEOUT_S - 1, f"closed after {waited_s:.1f}s"


def test_a_sender_that_leaves_mid_body_is_logged_as_499(gateway):
    with socket.create_connection(("127.0.0.1", PORT)) as sock:
        sock.sendall(PARTIAL_REQUEST)
        time.sleep(1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        statuses = Counter(
            part.split("=", 1)[1]
            for path in glob.glob("/tmp/ray/session_latest/logs/serve/replica_llm_ingress_*.log")
            for line in Path(path).read_text(errors="replace").splitlines()
            if " access " in line and "model=-" in line
            for part in line.split()
            if part.startswith("status=")
        )
        if statuses.get("499"):
            break
        time.sleep(0.5)
    assert statuses.get("499"), statuses
    assert not statuses.get("500"), f"a client leaving is not a server error: {statuses}"
