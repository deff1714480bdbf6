"""Benchmark workloads: deterministic lists of OpenAI requests (same seed, same requests).

- `random`: prompts of a given input length, outputs of a given length.
- `faq`: N shared prefixes x M suffixes (vLLM's prefix_repetition idea): prefix caching's case.
- `chat`: a mix of short and long conversations behind one fixed system prompt.
- `repetitive`: prompts that ask to repeat text already in them: ngram speculation's case.
- `shaped` / `unshaped`: the same chat mix and the same "natural" answer lengths (long-tailed:
  median about 180 tokens, one in ten above 600, at most 1024). Unshaped: no streaming, and each
  answer runs to its natural length, as when a client sets no max_tokens. Shaped: streaming, and
  max_tokens 256 cuts the long tail. The tiny models never stop on their own, so the natural
  length is sent as an exact max_tokens (`ignore_eos`): the stand-in for a model reaching EOS.

Lengths are in words of a fixed synthetic vocabulary; with the tiny models' tokenizer a word is
one to three tokens. Output lengths are exact when the server honours `ignore_eos` (vLLM does).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and precisely."
UNSHAPED_MAX_TOKENS = 1024
SHAPED_MAX_TOKENS = 256
# Natural answer lengths: lognormal around this median, clipped to [16, UNSHAPED_MAX_TOKENS].
NATURAL_MEDIAN_TOKENS = 180
NATURAL_SIGMA = 0.9
WORKLOADS = ("random", "faq", "chat", "repetitive", "shaped", "unshaped")


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload, endpoint-independent (the model id is added when sent)."""

    messages: list[dict[str, str]]
    max_tokens: int | None
    stream: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": self.messages, "stream": self.stream}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body | self.extra


def words(rng: random.Random, count: int) -> str:
    return " ".join("".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(count))


def natural_length(rng: random.Random) -> int:
    """An answer's length when nothing caps it: long-tailed, as real chat answers are."""
    length = round(rng.lognormvariate(math.log(NATURAL_MEDIAN_TOKENS), NATURAL_SIGMA))
    return max(16, min(UNSHAPED_MAX_TOKENS, length))


def make_workload(
    name: str,
    num_requests: int,
    *,
    seed: int = 0,
    input_len: int = 128,
    output_len: int = 128,
    num_prefixes: int = 4,
    prefix_len: int = 256,
) -> list[RequestSpec]:
    """`num_requests` requests of workload `name`, in a seed-determined order."""
    rng = random.Random(seed)
    exact = {"ignore_eos": True}
    if name == "random":
        return [
            RequestSpec([{"role": "user", "content": words(rng, input_len)}], output_len, extra=exact)
            for _ in range(num_requests)
        ]
    if name == "faq":
        prefixes = [words(rng, prefix_len) for _ in range(num_prefixes)]
        return [
            RequestSpec(
                [
                    {"role": "system", "content": rng.choice(prefixes)},
                    {"role": "user", "content": words(rng, max(1, input_len // 8))},
                ],
                output_len,
                extra=exact,
            )
            for _ in range(num_requests)
        ]
    if name == "repetitive":
        specs = []
        for _ in range(num_requests):
            text = words(rng, max(8, input_len // 4))
            prompt = f"Repeat this text four times: {text} {text} {text}"
            specs.append(RequestSpec([{"role": "user", "content": prompt}], output_len, extra=exact))
        return specs
    if name in ("chat", "shaped", "unshaped"):
        specs = []
        for _ in range(num_requests):
            turns = rng.choice([1, 1, 2, 3])
            messages = [{"role": "system", "content": SYSTEM_PROMPT}]
            for turn in range(turns):
                messages.append({"role": "user", "content": words(rng, rng.randint(min(8, input_len), input_len))})
                if turn < turns - 1:
                    messages.append({"role": "assistant", "content": words(rng, rng.randint(8, 64))})
            natural = natural_length(rng)  # drawn for every workload, so the seeds stay aligned
            if name == "unshaped":
                specs.append(RequestSpec(messages, natural, stream=False, extra=exact))
            elif name == "shaped":
                specs.append(RequestSpec(messages, min(natural, SHAPED_MAX_TOKENS), extra=exact))
            else:
                specs.append(RequestSpec(messages, rng.randint(min(16, output_len), output_len), extra=exact))
        return specs
    raise ValueError(f"Unknown workload {name!r}; choose one of {WORKLOADS}")
