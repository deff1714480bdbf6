"""Warm-up's sequence and its failure path, against a stand-in for vLLM's serving layer (the real
engine's warm-up, and its prefix-cache effect, are tested in tests/test_serving.py)."""

from __future__ import annotations

import asyncio

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

from apps.config import ModelConfig
from apps.engine.warmup import WarmupFailed, warm_up

REQUEST_TYPES = {"chat": ChatCompletionRequest, "completion": CompletionRequest}


class FakeServing:
    """Stands for `ModelServer._call_vllm`: validates each body with vLLM's protocol model and
    records it; answers with an error from the `fail_at`-th on (1-based)."""

    def __init__(self, seen: list, fail_at: int | None = None) -> None:
        self.seen = seen
        self.fail_at = fail_at

    async def __call__(self, endpoint: str, body: dict):
        self.seen.append(REQUEST_TYPES[endpoint].model_validate(body))
        if self.fail_at is not None and len(self.seen) >= self.fail_at:
            return ErrorResponse(
                error=ErrorInfo(message="The prompt is too long.", type="BadRequestError", code=400)
            )
        return object()


def model(make_checkpoint, **fields) -> ModelConfig:
    return ModelConfig(id="m", path=make_checkpoint(), **fields)


def run(config: ModelConfig, fail_at: int | None = None) -> list:
    seen: list = []
    asyncio.run(warm_up(config, FakeServing(seen, fail_at)))
    return seen


def test_built_in_then_hot_and_named_prompts_repeat_times_each(make_checkpoint):
    config = model(
        make_checkpoint,
        warmup={"repeat": 2, "prompts": [{"prompt": "Template header:"}]},
        system_prompts={"support": "You are the support assistant."},
    )
    seen = run(config)
    assert len(seen) == 1 + 2 * 2
    assert seen[0].logprobs, "the built-in request warms the log-probabilities path"
    assert [type(r).__name__ for r in seen[1:]] == ["CompletionRequest", "ChatCompletionRequest"] * 2
    assert seen[2].messages == [{"role": "system", "content": "You are the support assistant."}]
    assert all(r.max_tokens == 1 for r in seen[1:]), "hot prompts only need their prefill"


def test_each_loaded_adapter_gets_the_built_in_request(make_checkpoint):
    from apps.config import LoraAdapter

    seen: list = []
    adapter = LoraAdapter.model_validate({"name": "m-sql", "path": "/a"}, context={"check_model_files": False})
    asyncio.run(warm_up(model(make_checkpoint), FakeServing(seen), [adapter]))
    assert [request.model for request in seen] == ["m", "m-sql"]
    assert seen[1].logprobs, "the same built-in request, through the adapter"


def test_disabled_warm_up_sends_nothing(make_checkpoint):
    assert run(model(make_checkpoint, warmup={"enabled": False})) == []


def test_a_refused_warm_up_request_fails_the_start_naming_model_and_prompt(make_checkpoint):
    config = model(make_checkpoint, system_prompts={"support": "You are the support assistant."})
    with pytest.raises(WarmupFailed) as failed:
        run(config, fail_at=2)
    message = str(failed.value)
    assert "`support` (system prompt)" in message and "model m" in message
    assert "The prompt is too long." in message
