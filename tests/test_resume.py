"""Resume stitching, without Ray: which streams may continue on another replica, and how a
resumed call's events are rewritten so that the client sees one stream (same id and created, no
second role event, usage counted once from the original prompt)."""

from __future__ import annotations

import asyncio
import json

import pytest

from apps.engine.usage import Usage, _continued, _counted
from apps.routing.resume import ResumedEvents, StreamIdentity, resume_refusal, stream_identity

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
IDENTITY = StreamIdentity("chatcmpl-original", 1700000000)


def event(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def chunk(delta: dict, *, finish: str | None = None, usage: dict | None = None) -> dict:
    body = {
        "id": "chatcmpl-other",
        "object": "chat.completion.chunk",
        "created": 1700000099,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def test_a_plain_chat_or_completion_stream_may_resume():
    assert resume_refusal("chat", CHAT) is None
    assert resume_refusal("chat", CHAT | {"logprobs": True, "top_logprobs": 2, "temperature": 0.7}) is None
    assert resume_refusal("completion", {"model": "m", "prompt": "hi", "stream": True}) is None
    assert resume_refusal("chat", CHAT | {"response_format": {"type": "text"}, "n": 1}) is None


@pytest.mark.parametrize(
    ("endpoint", "extra", "reason"),
    [
        ("chat", {"stream": False}, "not a stream"),
        ("chat", {"n": 2}, "several choices"),
        ("completion", {"prompt": ["a", "b"]}, "several prompts"),
        ("chat", {"seed": 7}, "a fixed seed"),
        ("chat", {"frequency_penalty": 0.5}, "frequency or presence penalties"),
        ("chat", {"presence_penalty": -1}, "frequency or presence penalties"),
        ("chat", {"response_format": {"type": "json_object"}}, "structured outputs"),
        ("chat", {"structured_outputs": {"regex": "a+"}}, "structured outputs"),
        ("chat", {"stop": ["\n"]}, "stop strings"),
        ("completion", {"echo": True}, "echo or prompt log-probabilities"),
    ],
)
def test_streams_that_cannot_continue_exactly_are_refused(endpoint, extra, reason):
    body = (CHAT if endpoint == "chat" else {"model": "m", "prompt": "hi", "stream": True}) | extra
    assert resume_refusal(endpoint, body) == reason


def test_the_identity_comes_from_the_first_chunk():
    first = (event(chunk({"role": "assistant", "content": ""})) + event(chunk({"content": "a"}))).encode()
    assert stream_identity(first) == StreamIdentity("chatcmpl-other", 1700000099)
    assert stream_identity(b"data: [DONE]\n\n") is None


def test_a_resumed_stream_drops_its_role_event_and_keeps_the_original_identity():
    rewriter = ResumedEvents(IDENTITY, prompt_tokens=10, resumed_tokens=5)
    assert rewriter.rewrite(event(chunk({"role": "assistant", "content": ""}))) is None
    continued = json.loads(rewriter.rewrite(event(chunk({"content": "x"})))[len("data: ") :])
    assert (continued["id"], continued["created"]) == (IDENTITY.id, IDENTITY.created)
    assert continued["choices"][0]["delta"] == {"content": "x"}
    assert rewriter.rewrite("data: [DONE]\n\n") == "data: [DONE]\n\n"


def test_a_resumed_streams_usage_counts_from_the_original_prompt_and_every_token_once():
    # The resumed call's engine saw prompt 10 + 5 received tokens and generated 3 more.
    rewriter = ResumedEvents(IDENTITY, prompt_tokens=10, resumed_tokens=5)
    last = chunk({}, usage={"prompt_tokens": 15, "completion_tokens": 3, "total_tokens": 18})
    usage = json.loads(rewriter.rewrite(event(last))[len("data: ") :])["usage"]
    assert usage == {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}


def test_a_finish_event_with_a_role_is_not_dropped():
    rewriter = ResumedEvents(IDENTITY, 1, 1)
    assert rewriter.rewrite(event(chunk({"role": "assistant"}, finish="length"))) is not None


def test_error_events_pass_unchanged():
    error = 'data: {"error": {"message": "x", "type": "t", "param": null, "code": 500}}\n\n'
    assert ResumedEvents(IDENTITY, 1, 1).rewrite(error) == error


class Params:
    """The two fields of vLLM's SamplingParams that a continuation changes."""

    def __init__(self, max_tokens: int, min_tokens: int) -> None:
        self.max_tokens, self.min_tokens = max_tokens, min_tokens

    def clone(self) -> Params:
        return Params(self.max_tokens, self.min_tokens)


def test_a_continuation_appends_the_received_ids_and_lowers_the_token_budget():
    prompt = {"prompt_token_ids": [1, 2, 3], "prompt": "rendered text"}
    params = Params(max_tokens=64, min_tokens=10)
    continued, new_params = _continued(prompt, params, (7, 8, 9, 10))
    assert continued == {"prompt_token_ids": [1, 2, 3, 7, 8, 9, 10]}
    assert (new_params.max_tokens, new_params.min_tokens) == (60, 6)
    assert (params.max_tokens, prompt["prompt_token_ids"]) == (64, [1, 2, 3]), "inputs untouched"


class Output:
    """What vLLM's RequestOutput has that `_counted` reads."""

    def __init__(self, token_ids: list[int], finished: bool = False) -> None:
        reason = "length" if finished else None
        self.outputs = [type("Choice", (), {"index": 0, "token_ids": token_ids, "finish_reason": reason})()]
        self.finished = finished
        self.num_cached_tokens = 0


def test_generated_ids_are_kept_in_order_for_delta_and_cumulative_outputs():
    async def run(outputs: list[Output], delta: bool) -> Usage:
        async def source():
            for output in outputs:
                yield output

        usage = Usage(output_token_ids=[])
        async for _ in _counted(source(), usage, delta):
            pass
        return usage

    deltas = asyncio.run(run([Output([5]), Output([6, 7]), Output([8], True)], delta=True))
    assert (deltas.output_token_ids, deltas.completion_tokens) == ([5, 6, 7, 8], 4)
    cumulative = asyncio.run(run([Output([5]), Output([5, 6, 7]), Output([5, 6, 7, 8], True)], delta=False))
    assert (cumulative.output_token_ids, cumulative.completion_tokens) == ([5, 6, 7, 8], 4)
