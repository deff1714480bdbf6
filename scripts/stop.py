"""Stop the gateway without cutting a stream: `python scripts/stop.py` instead of `serve shutdown`.

`serve shutdown` stops Serve's HTTP proxy at once, which cuts every open connection, however long
the replicas' graceful shutdown is. So this first deletes the gateway's `llm` application alone:
its ingress replicas take no new requests and finish the ones they hold (for up to
`ingress.drain_timeout_s`), while the proxy and the engines keep serving them. Only then does it
shut Serve down. Needs what the `serve` CLI needs (README, "Operating it": `RAY_AUTH_MODE=token`
when Ray's token authentication is on).
"""

from __future__ import annotations

import argparse
import sys
import time

import ray
from ray import serve

from apps.applications import GATEWAY_APP


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    parser.add_argument(
        "--keep-serve",
        action="store_true",
        help="drain and delete the ingress only; keep Serve and the engines",
    )
    args = parser.parse_args(argv)
    ray.init(address=args.address, log_to_driver=False)
    started = time.monotonic()
    if GATEWAY_APP in serve.status().applications:
        print(f"draining the ingress ({GATEWAY_APP}): open requests finish, new ones are refused", flush=True)
        serve.delete(GATEWAY_APP)  # returns once its replicas have stopped
        print(f"ingress drained in {time.monotonic() - started:.1f}s", flush=True)
    if not args.keep_serve:
        serve.shutdown()
        print("Serve shut down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
