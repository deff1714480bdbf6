"""Hostile and broken clients on the real stack, behind HAProxy as shipped (configs/ray-serve.env).

Slow and stalled senders: more stalled sockets than the ingress used to have slots do not keep
another client from being served, every one of them is answered within its bound, and a client
that leaves while sending is counted as gone (499), not as a server error.

HTTP-level garbage: each malformed request gets a 4xx or is served as HAProxy normalised it,
never a 5xx or a hang, the connection is closed where the request cannot be trusted, nothing is
smuggled past HAProxy, and the next client is served. HAProxy parses every request once and
sends the ingress its own re-serialised copy, so what it accepts cannot desync the two.

Measured before these bounds (Ray's defaults: HAProxy's client timeout an hour, 1024 ingress
slots): 1,100 stalled senders held every slot and a normal request waited until they were cut.
"""

from __future__ import annotations

import glob
import re
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
CLOSE = b"Connection: close\r\n"
# (case, raw request, the status of each answer, in order). Measured against HAProxy 2.8 as Ray
# 2.60 configures it; its 400s are its own HTML page, the ingress's are OpenAI's JSON.
MALFORMED = [
    ("oversized header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", [400]),
    (
        "too many headers",
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
        [400],
    ),
    ("request line too long", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", [400]),
    ("invalid method token", b"GE T /health HTTP/1.1\r\nHost: x\r\n\r\n", [400]),
    ("non-UTF-8 path", b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", [400]),
    ("NUL in a header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", [400]),
    (
        "unknown transfer-encoding",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: bogus\r\n\r\n{}",
        [400],
    ),
    (
        "two different content-lengths",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        [400],
    ),
    (
        "negative content-length",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        [400],
    ),
    (
        "bad chunk size",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        [400],
    ),
    # Request smuggling: HAProxy reads the chunked body (empty: the ingress's 400 invalid_json),
    # drops the Content-Length, closes the connection after the answer, and never answers the
    # request hidden behind the body.
    (
        "content-length and chunked",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        [400],
    ),
    (
        "pipelined requests",
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n" + CLOSE + b"\r\n",
        [200, 200],
    ),
    ("HTTP/1.0 without Host", b"GET /health HTTP/1.0\r\n\r\n", [200]),
    ("HTTP/1.1 without Host", b"GET /health HTTP/1.1\r\n" + CLOSE + b"\r\n", [200]),
    ("bare LF line endings", b"GET /health HTTP/1.1\nHost: x\nConnection: close\n\n", [200]),
    ("obsolete line folding", b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n" + CLOSE + b"\r\n", [200]),
]
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


def answers_until_closed(raw: bytes, timeout_s: float = 10.0) -> tuple[list[int], bool]:
    """The status of every answer to `raw` sent on a fresh connection, and whether the server
    closed the connection (rather than leaving it hanging) within `timeout_s`."""
    data, closed = b"", False
    with socket.create_connection(("127.0.0.1", PORT)) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it was all sent (its answer may still be there to read)
        try:
            while chunk := sock.recv(65536):
                data += chunk
            closed = True
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    statuses = [int(m.group(1)) for m in re.finditer(rb"HTTP/1\.[01] (\d{3}) ", data)]
    return statuses, closed


@pytest.mark.parametrize(("case", "raw", "expected"), MALFORMED, ids=[case for case, _, _ in MALFORMED])
def test_malformed_http_gets_a_clean_answer_and_the_next_client_is_served(gateway, case, raw, expected):
    statuses, closed = answers_until_closed(raw)
    assert statuses == expected, (case, statuses)
    assert closed, f"{case}: the connection was left open"
    assert chat(gateway)[0] == 200, f"after {case}"
