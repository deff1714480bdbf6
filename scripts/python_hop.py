"""A minimal Python hop: an HTTP relay (uvicorn, one ASGI function, httpx) in front of another
server, for benchmarks. It reads the request, sends it upstream and writes the answer back chunk
by chunk as it arrives: no authentication, no JSON parsing, no admission, no routing.

    python -m scripts.python_hop --upstream http://127.0.0.1:8001 --port 8002

Put in front of bare vLLM and measured with `scripts/vllm_bench.py` next to bare vLLM and the
gateway, it shows what a gateway that keeps a Python ASGI server on the token's way pays on a
machine before its own work begins (docs/BENCHMARKS.md, section 1).
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx
import uvicorn

# Request headers not passed on: httpx sets its own for the upstream connection.
HOP_HEADERS = {b"host", b"content-length", b"connection", b"transfer-encoding"}


def relay_app(upstream: str) -> Any:
    """An ASGI app that relays every HTTP request to `upstream` and streams the answer back."""
    client: httpx.AsyncClient | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal client
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            client = httpx.AsyncClient(
                base_url=upstream, timeout=None, limits=httpx.Limits(max_connections=None)
            )
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert client is not None
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(name, value) for name, value in scope["headers"] if name.lower() not in HOP_HEADERS]
        path = scope["path"] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        request = client.build_request(scope["method"], path, content=bytes(body), headers=headers)
        response = await client.send(request, stream=True)
        try:
            content_type = response.headers.get("content-type", "application/octet-stream")
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(b"content-type", content_type.encode())],
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", required=True, help="base URL of the server relayed to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    uvicorn.run(relay_app(args.upstream), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
