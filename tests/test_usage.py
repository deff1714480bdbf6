"""Token metering at the engine, without an engine: `MeteredEngine` over a stand-in whose
`generate` yields vLLM-shaped outputs, in both output kinds the serving layer uses."""

from __future__ import annotations

import asyncio
import contextvars
from types import SimpleNamespace

import pytest
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind

from apps.usage import MeteredEngine, start_usage


class FakeEngine:
    """Yields `steps`: per step, each choice's token ids (deltas or cumulative, as given)."""

    def __init__(self, steps: list[list[list[int]]], finish: bool = True) -> None:
        self.steps = steps
        self.finish = finish
        self.model_config = "passed through"

    async def generate(self, prompt, sampling_params, request_id, **kwargs):
        for i, step in enumerate(self.steps):
            yield SimpleNamespace(
                outputs=[SimpleNamespace(index=j, token_ids=ids) for j, ids in enumerate(step)],
                finished=self.finish and i == len(self.steps) - 1,
            )


def params(kind: RequestOutputKind) -> SimpleNamespace:
    return SimpleNamespace(output_kind=kind)


def run(engine: MeteredEngine, kind: RequestOutputKind, prompt_len: int = 5, stop_after: int | None = None):
    async def go():
        usage = start_usage()
        outputs = engine.generate({"prompt_token_ids": list(range(prompt_len))}, params(kind), "r")
        seen = 0
        async for _ in outputs:
            seen += 1
            if seen == stop_after:
                break
        return usage

    return asyncio.run(go())


def test_streamed_deltas_are_counted_per_choice_as_they_come():
    engine = MeteredEngine(FakeEngine([[[1], [2, 3]], [[4], [5]]]), "m")
    usage = run(engine, RequestOutputKind.DELTA)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.settled_tokens()) == (5, 5, 10)


def test_a_stream_cut_short_is_charged_what_it_generated():
    engine = MeteredEngine(FakeEngine([[[1, 2]], [[3]], [[4]]]), "m")
    usage = run(engine, RequestOutputKind.DELTA, stop_after=2)
    assert usage.settled_tokens() == 5 + 3


def test_final_only_output_counts_its_cumulative_tokens_once_finished():
    engine = MeteredEngine(FakeEngine([[[1, 2, 3], [4]]]), "m")
    usage = run(engine, RequestOutputKind.FINAL_ONLY)
    assert usage.settled_tokens() == 5 + 4


def test_final_only_output_that_never_finished_is_settled_as_all_reserved():
    engine = MeteredEngine(FakeEngine([[[1, 2]]], finish=False), "m")
    assert run(engine, RequestOutputKind.FINAL_ONLY).settled_tokens() is None


def test_prompt_over_the_cap_is_refused_before_the_engine_is_called():
    engine = MeteredEngine(FakeEngine([]), "m")

    def generate() -> None:
        start_usage(max_prompt_tokens=4)  # the cap comes with the request (a live setting)
        engine.generate({"prompt_token_ids": [1, 2, 3, 4, 5]}, params(RequestOutputKind.DELTA), "r")

    with pytest.raises(VLLMValidationError, match="5 tokens long; model m accepts at most 4"):
        contextvars.copy_context().run(generate)
    assert engine.model_config == "passed through"
