"""Warm a replica's engine before Serve sends it traffic.

Called at the end of `ModelServer.__init__`: Serve marks a replica running (and routes to it)
only once its constructor returns, so every replica, including those autoscaling adds, serves
its first client warm. Two kinds of work:

- one short built-in request, always: a fresh engine's first request pays one-off costs (the
  first request with log-probabilities took ~2 s on the tiny CPU model, against ~30 ms warm;
  the built-in request asks for them, so that path is warm too); and once through each LoRA
  adapter the model's application was built with (loaded by then);
- the model's configured hot prompts and named system prompts (`apps.shaping.prefixes`), `repeat` times
  each, one token each: their prefixes land in the prefix cache, so clients that share them skip
  that part of the prefill.

A warm-up request that fails fails the replica's start, with the model, the prompt's index and
the engine's message; Serve reports it in the deployment's status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from apps.config import LoraAdapter, ModelConfig, WarmupPrompt

logger = logging.getLogger("ray.serve")
BUILT_IN = WarmupPrompt(messages=[{"role": "user", "content": "Hello."}])
BUILT_IN_MAX_TOKENS = 8  # a few decode steps too, not only the prefill
BUILT_IN_EXTRA = {"logprobs": True, "top_logprobs": 1}
HOT_PROMPT_MAX_TOKENS = 1  # the prefill is what fills the prefix cache


class WarmupFailed(RuntimeError):
    """A warm-up request failed; the replica must not serve."""


# A model server's call of one request through vLLM's serving layer (`ModelServer._call_vllm`).
VllmCall = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def warm_up(model: ModelConfig, call: VllmCall, adapters: Sequence[LoraAdapter] = ()) -> None:
    """Run the built-in request (also through each of `adapters`, loaded LoRA adapters), then
    every hot prompt `repeat` times, through vLLM's serving layer (so chat templates are
    exercised as clients will). Raises `WarmupFailed`."""
    if not model.warmup.enabled:
        return
    started = time.monotonic()
    first_s = await _run(model, call, BUILT_IN, BUILT_IN_MAX_TOKENS, "built-in", BUILT_IN_EXTRA)
    for adapter in adapters:  # each adapter (loaded) is a model of its own to its clients
        label = f"built-in (adapter {adapter.name})"
        await _run(model, call, BUILT_IN, BUILT_IN_MAX_TOKENS, label, BUILT_IN_EXTRA, adapter.name)
    hot = {f"#{index}": prompt for index, prompt in enumerate(model.warmup.prompts)}
    for name, text in model.system_prompts.items():
        hot[f"`{name}` (system prompt)"] = WarmupPrompt(messages=[{"role": "system", "content": text}])
    for _ in range(model.warmup.repeat):
        for label, prompt in hot.items():
            await _run(model, call, prompt, HOT_PROMPT_MAX_TOKENS, label)
    count = 1 + len(adapters) + model.warmup.repeat * len(hot)
    logger.info(
        "Model %s warmed up: %d requests in %.2fs; the first (a cold engine's) took %.0f ms.",
        model.id,
        count,
        time.monotonic() - started,
        first_s * 1000,
    )


async def _run(
    model: ModelConfig,
    call: VllmCall,
    prompt: WarmupPrompt,
    max_tokens: int,
    label: str,
    extra: Mapping[str, Any] | None = None,
    served_name: str | None = None,
) -> float:
    """One warm-up request (to `served_name`, an adapter, or the model); its duration in seconds."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    endpoint, body = _request(model, prompt, max_tokens, extra)
    body["model"] = served_name or model.id
    started = time.monotonic()
    try:
        result = await call(endpoint, body)
    except Exception as exc:
        raise WarmupFailed(f"Warm-up prompt {label} of model {model.id} failed: {exc!r}") from exc
    if isinstance(result, ErrorResponse):
        raise WarmupFailed(
            f"Warm-up prompt {label} of model {model.id} was refused by the engine: "
            f"{result.error.message}"
        )
    if getattr(result, "status_code", 200) != 200:  # a pooling answer (a response)
        raise WarmupFailed(f"Warm-up prompt {label} of model {model.id} was answered {result.status_code}.")
    return time.monotonic() - started


def _request(
    model: ModelConfig, prompt: WarmupPrompt, max_tokens: int, extra: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """The endpoint and body that run `prompt` through the model's kind of engine."""
    messages = [m.model_dump() for m in prompt.messages] if prompt.messages is not None else None
    if model.task == "score":  # a cross-encoder scores the prompt against itself
        text = prompt.prompt or "\n".join(str(m["content"]) for m in messages or [])
        return "score", {"text_1": text, "text_2": text}
    if model.task == "embed":  # an embedding model embeds the prompt: nothing is generated
        return "embeddings", {"messages": messages} if messages is not None else {"input": prompt.prompt}
    if messages is not None:
        return "chat", {"messages": messages, "max_tokens": max_tokens, **(extra or {})}
    return "completion", {"prompt": prompt.prompt, "max_tokens": max_tokens, **(extra or {})}
