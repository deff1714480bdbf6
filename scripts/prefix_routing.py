"""Cache-aware routing, measured on a multi-tenant shared-context workload (llm-d's shape, scaled
to the CPU testbed): every prompt starts with one platform preamble, then its tenant's long
context, then a short question; questions arrive in random order, at Poisson arrivals.

    python -m scripts.prefix_routing --url http://127.0.0.1:8000 \\
        --models tiny-p2c,tiny-prefix,tiny-precise --replicas 2 --rate 4

Each named model is the same checkpoint behind a different `routing.policy` (Serve's default
`power_of_two`, the prefix-hash `prefix_affinity`, the KV-event `precise_prefix`); the script
sends every request to each model, interleaved, so all see the same load at the same time. It
reports, per model: the prefix-cache hits (cached prompt tokens, from each answer's usage) as a
share of the workload's ideal, TTFT p50/p90 and requests/s.

The ideal counts every shared block computed once: a tenant's context on one replica only, the
preamble once per replica. It is computed from the prompts' token ids (the model's own tokenizer,
`--tokenizer`) in whole KV blocks (`--block-size`; 128 on the CPU backend). With caches too small
for the workload, no router reaches it. The tests drive `run` (tests/test_routing_cache.py);
docs/BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import httpx

from scripts.fairness import percentile
from scripts.sse import aiter_sse_lines

WORDS = (
    "order shipping refund parcel invoice account address delivery return warranty policy customer "
    "payment balance contract clause region quarter revenue forecast supplier inventory"
).split()


@dataclass(frozen=True)
class Workload:
    tenants: int = 12
    questions: int = 4  # per tenant
    # tiny-chat's tokenizer makes about 4.7 tokens of a word: about 920 tokens a prompt, whose
    # first 3 KV blocks of 128 tokens are the preamble's, the next 4 the tenant's. The preamble
    # (814 characters) is longer than the prefix hash's 512 characters, as a platform's system
    # prompt often is.
    preamble_words: int = 100
    context_words: int = 90
    seed: int = 0

    def requests(self) -> list[tuple[int, list[dict]]]:
        """(tenant, chat messages) of every request, in a fixed shuffled order."""
        rng = random.Random(self.seed)
        preamble = "Platform rules: " + " ".join(rng.choice(WORDS) for _ in range(self.preamble_words))
        contexts = [
            f"Tenant {tenant} documents: " + " ".join(rng.choice(WORDS) for _ in range(self.context_words))
            for tenant in range(self.tenants)
        ]
        requests = [
            (
                tenant,
                [
                    {"role": "system", "content": f"{preamble}\n\n{contexts[tenant]}"},
                    {"role": "user", "content": f"Question {question}: {rng.random()}?"},
                ],
            )
            for tenant in range(self.tenants)
            for question in range(self.questions)
        ]
        rng.shuffle(requests)
        return requests


def ideal_cached_tokens(
    requests: list[tuple[int, list[dict]]], tokenizer_path: str, block_size: int, replicas: int
) -> int:
    """Cached prompt tokens if every shared block were computed once: a tenant's context blocks
    on one replica, the preamble's blocks once per replica."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    prompts: dict[int, list[list[int]]] = {}
    for tenant, messages in requests:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.setdefault(tenant, []).append(list(getattr(ids, "input_ids", ids)))
    firsts = [prompts[tenant][0] for tenant in sorted(prompts)]
    preamble_blocks = common_prefix(firsts) // block_size
    ideal_blocks = -replicas * preamble_blocks
    for tenant_prompts in prompts.values():
        tenant_blocks = common_prefix(tenant_prompts) // block_size
        ideal_blocks += (len(tenant_prompts) - 1) * tenant_blocks + preamble_blocks
    return ideal_blocks * block_size


def common_prefix(sequences: list[list[int]]) -> int:
    """The length of the sequences' longest common prefix."""
    first = sequences[0]
    length = len(first)
    for other in sequences[1:]:
        length = min(length, len(other))
        for index in range(length):
            if other[index] != first[index]:
                length = index
                break
    return length


@dataclass
class ModelReport:
    model: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttfts_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def ttft_s(self, q: float) -> float:
        return percentile(self.ttfts_s, q) if self.ttfts_s else float("nan")

    def summary(self, ideal_cached: int) -> dict:
        return {
            "model": self.model,
            "requests": self.requests,
            "errors": self.errors,
            "cached_share_of_prompt": round(self.cached_tokens / max(1, self.prompt_tokens), 3),
            "cached_share_of_ideal": round(self.cached_tokens / max(1, ideal_cached), 3),
            "ttft_p50_ms": round(1000 * self.ttft_s(0.5), 1),
            "ttft_p90_ms": round(1000 * self.ttft_s(0.9), 1),
            "requests_per_s": round(self.requests / max(self.elapsed_s, 1e-9), 2),
        }


async def ask(client: httpx.AsyncClient, model: str, messages: list[dict], report: ModelReport) -> None:
    """One streaming request: its TTFT and its usage."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.monotonic()
    first = None
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            report.errors += 1
            return
        async for line in aiter_sse_lines(response):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.monotonic() - started
            usage = chunk.get("usage") or usage
    report.requests += 1
    if first is not None:
        report.ttfts_s.append(first)
    if usage:
        report.prompt_tokens += usage["prompt_tokens"]
        report.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


async def run(url: str, models: list[str], workload: Workload, rate: float | None) -> list[ModelReport]:
    """Send the workload to every model, interleaved: at Poisson arrivals of `rate` requests/s per
    model, or one request at a time (each model's answer before the next) when `rate` is None."""
    reports = [ModelReport(model) for model in models]
    rng = random.Random(workload.seed + 1)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        started = time.monotonic()
        tasks = []
        for _, messages in workload.requests():
            for model, report in zip(models, reports):
                if rate is None:
                    await ask(client, model, messages, report)
                else:
                    tasks.append(asyncio.create_task(ask(client, model, messages, report)))
            if rate is not None:
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        for report in reports:
            report.elapsed_s = time.monotonic() - started
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--models", required=True, help="comma-separated model ids, one per routing policy")
    parser.add_argument("--replicas", type=int, default=2, help="replicas of each model (for the ideal)")
    parser.add_argument("--rate", type=float, default=None, help="requests/s per model; none: one at a time")
    parser.add_argument("--tenants", type=int, default=Workload.tenants)
    parser.add_argument("--questions", type=int, default=Workload.questions)
    parser.add_argument("--tokenizer", default="models/tiny-chat")
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    workload = Workload(tenants=args.tenants, questions=args.questions)
    ideal = ideal_cached_tokens(workload.requests(), args.tokenizer, args.block_size, args.replicas)
    reports = asyncio.run(run(args.url, args.models.split(","), workload, args.rate))
    print(json.dumps({"workload": asdict(workload), "rate": args.rate, "ideal_cached_tokens": ideal}))
    for report in reports:
        print(json.dumps(report.summary(ideal)))


if __name__ == "__main__":
    main()
