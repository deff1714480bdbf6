"""Token metering at the engine, without an engine: `MeteredEngine` over a stand-in whose
`generate` yields vLLM-shaped outputs, in both output kinds the serving layer uses."""

from __future__ import annotations

import asyncio
import contextvars
from types import SimpleNamespace

import pytest
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind

from apps.engine.usage import MeteredEngine, start_usage


class FakeEngine:
    """Yields `steps`: per step, each choice's token ids (deltas or cumulative, as given)."""

    def __init__(self, steps: list[list[list[int]]], finish: bool = True, cached: int = 0) -> None:
        self.steps = steps
        self.finish = finish
        self.cached = cached
        self.model_config = "passed through"
        self.kwargs: dict = {}

    async def generate(self, prompt, sampling_params, request_id, **kwargs):
        self.kwargs = kwargs
        for i, step in enumerate(self.steps):
            finished = self.finish and i == len(self.steps) - 1
            yield SimpleNamespace(
                outputs=[
                    SimpleNamespace(index=j, token_ids=ids, finish_reason="length" if finished else None)
                    for j, ids in enumerate(step)
                ],
                finished=finished,
                num_cached_tokens=self.cached,  # vLLM's: set from the request's prefill
            )


def params(kind: RequestOutputKind) -> SimpleNamespace:
    return SimpleNamespace(output_kind=kind)


def run(
    engine: MeteredEngine,
    kind: RequestOutputKind,
    prompt_len: int = 5,
    stop_after: int | None = None,
    trace_headers: dict[str, str] | None = None,
):
    async def go():
        usage = start_usage(trace_headers=trace_headers)
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


def test_the_engines_report_is_kept_for_the_trace_and_the_trace_context_reaches_the_engine():
    fake = FakeEngine([[[1]], [[2]]], cached=3)
    traceparent = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    usage = run(MeteredEngine(fake, "m"), RequestOutputKind.DELTA, trace_headers=traceparent)
    assert (usage.cached_tokens, usage.finish_reason) == (3, "length")
    assert usage.first_token_at is not None
    assert fake.kwargs == {"trace_headers": traceparent}


def test_without_a_trace_the_engine_gets_no_trace_headers():
    fake = FakeEngine([[[1]]])
    run(MeteredEngine(fake, "m"), RequestOutputKind.DELTA)
    assert fake.kwargs == {}


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
