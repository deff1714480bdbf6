"""CPU time each process of this machine spends per request, while a fixed number of streaming chat
requests run against one or several OpenAI-compatible servers, alternated round by round.

    python -m scripts.cpu_cost --target bare=http://127.0.0.1:8001 \\
        --target gateway=http://127.0.0.1:8000 --requests 600 --concurrency 16 --max-tokens 1

Throughput on a shared, noisy machine drifts by a third between runs of the same server; the CPU
a process spends for the same requests moves less, and the ratio of two servers' front ends
measured in the same run less still: compare those ratios, not rows of different runs. Each
process on the machine is put in a role by its command line (ROLES), so run it where nothing else
runs; each role's CPU milliseconds per request is reported as the median over the rounds. Both
servers stay up, so each column also holds the other server's idle processes and Ray's daemons,
whose CPU grows with the run's length (the slower server's run is longer). Run it once with
`--max-tokens 1` (what a request costs) and once with many tokens (what each streamed token
adds). The engine's own processes poll while they wait for each other, so their CPU follows wall
time more than work: compare the front ends.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import statistics
from collections import defaultdict

from scripts.loadgen import run_load
from scripts.workloads import RequestSpec

# (role, pattern on "comm | cmdline"), first match wins; anything else is "other".
ROLES = [
    ("engine core", r"VLLM::EngineCor"),
    ("engine worker", r"VLLM::Worker"),
    ("vLLM API server", r"vllm\.entrypoints\.openai\.api_server"),
    ("gateway ingress", r"ServeReplica:[^ ]*:ingress"),
    ("gateway model replica", r"ServeReplica:[^: ]*:model-"),  # not the app's idle entrypoint
    ("HAProxy", r"haproxy"),
    (
        "Ray and Serve daemons",
        r"raylet|gcs_server|dashboard|ServeController|ProxyActor|HAProxyMan|ServeReplica",
    ),
]
CLIENT = "client (this script)"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Each live process: its role and the CPU seconds (user + system) it has used."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmd:
                fields, command = stat.read(), cmd.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        comm = fields[fields.index("(") + 1 : fields.rindex(")")]
        times = fields.rsplit(")", 1)[1].split()
        role = next((name for name, pattern in ROLES if re.search(pattern, f"{comm} | {command}")), "other")
        found[int(entry)] = (role, (int(times[11]) + int(times[12])) / TICKS)
    return found


def drive(url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> float:
    """Send `requests` streaming chats, `concurrency` at a time (`scripts.loadgen.run_load`);
    returns the seconds taken. Any failed request fails the run: its CPU would be no request's."""
    spec = RequestSpec(
        [{"role": "user", "content": "Tell me a story. " * 25}], max_tokens, extra={"ignore_eos": True}
    )
    results, elapsed = asyncio.run(
        run_load(url, model, [spec] * requests, rate=math.inf, concurrency=concurrency)
    )
    failed = [result for result in results if result.status != 200]
    if failed:
        raise SystemExit(f"{len(failed)} of {requests} requests to {url} failed: {failed[0].error}")
    return elapsed


def measure(args: argparse.Namespace, url: str) -> tuple[dict[str, float], float]:
    """One run: CPU milliseconds per request of each role, and requests per second."""
    drive(url, args.model, 2 * args.concurrency, args.concurrency, args.max_tokens)  # warm
    before = cpu_seconds()
    elapsed = drive(url, args.model, args.requests, args.concurrency, args.max_tokens)
    after = cpu_seconds()
    per_role: dict[str, float] = defaultdict(float)
    for pid, (role, seconds) in after.items():
        role = CLIENT if pid == os.getpid() else role
        per_role[role] += max(0.0, seconds - before.get(pid, (role, 0.0))[1]) * 1000 / args.requests
    ended = [pid for pid in before if pid not in after]
    if ended:  # their CPU during the run is lost with them
        print(f"{len(ended)} processes ended during the run and are not counted: {ended[:8]}")
    return per_role, args.requests / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", action="append", required=True, help="NAME=URL")
    parser.add_argument("--model", default="tiny-chat")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    targets = dict(target.split("=", 1) for target in args.target)
    runs: dict[str, list[tuple[dict[str, float], float]]] = {name: [] for name in targets}
    for round_ in range(args.rounds):
        order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
        for name in order:
            runs[name].append(measure(args, targets[name]))
    print(
        f"{args.requests} streaming chats of {args.max_tokens} tokens, {args.concurrency} at a time, "
        f"{args.rounds} rounds: CPU ms per request (median over the rounds)"
    )
    roles = [name for name, _ in ROLES] + [CLIENT, "other"]
    print(f"{'':24}" + "".join(f"{name:>12}" for name in targets))
    for role in roles:
        cells = [statistics.median(per_role.get(role, 0.0) for per_role, _ in runs[name]) for name in targets]
        if any(cell >= 0.01 for cell in cells):
            print(f"{role:24}" + "".join(f"{cell:12.3f}" for cell in cells))
    rates = [statistics.median(rate for _, rate in runs[name]) for name in targets]
    print(f"{'requests/s':24}" + "".join(f"{rate:12.1f}" for rate in rates))


if __name__ == "__main__":
    main()
