"""CPU cost of the gateway's own per-request code, in microseconds per request.

Times what the ingress does to every request before handing it to a model (parse the body,
shape it: model lookup, max_tokens default and cap) and the error path of a rejected request,
with `time.process_time` (CPU, not wall time) over many repetitions, best of several rounds.
Future changes (admission, routing) add their stages here so their cost stays visible.

    python -m scripts.ingress_cost            # prints a table and the JSON
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from apps.config import RequestLimits
from apps.errors import GatewayError, error_json
from apps.validation import parse_body, shape_request
from scripts.workloads import make_workload

REPETITIONS = 20_000
ROUNDS = 5
LIMITS = {"tiny-chat": RequestLimits()}


def cpu_us_per_call(function: Callable[[], object], repetitions: int = REPETITIONS) -> float:
    """Best-of-rounds CPU microseconds per call (the minimum is the least disturbed round)."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.process_time()
        for _ in range(repetitions):
            function()
        best = min(best, (time.process_time() - start) / repetitions)
    return best * 1e6


def measure(repetitions: int = REPETITIONS) -> dict[str, float]:
    chat = make_workload("chat", 1, seed=0)[0].body("tiny-chat")
    raw = json.dumps(chat).encode()
    too_many = json.dumps(chat | {"max_tokens": 10_000}).encode()

    def accepted() -> object:
        return shape_request(parse_body(raw), "chat", LIMITS)

    def rejected() -> object:
        try:
            shape_request(parse_body(too_many), "chat", LIMITS)
        except GatewayError as error:
            return error_json(error)
        raise AssertionError("expected a rejection")

    return {
        "request_bytes": len(raw),
        "parse_body_us": cpu_us_per_call(lambda: parse_body(raw), repetitions),
        "parse_and_shape_us": cpu_us_per_call(accepted, repetitions),
        "rejected_with_error_body_us": cpu_us_per_call(rejected, repetitions),
    }


if __name__ == "__main__":
    results = measure()
    for name, value in results.items():
        print(f"{name:30s} {value:10.2f}")
    print(json.dumps(results))
