"""The drill's accounting (scripts/drill.py): every stream ends as exactly one outcome, and a
stream only counts as complete with every token it asked for, usage that agrees, one id and one
finish reason, `length`."""

from __future__ import annotations

import json

from scripts.drill import COMPLETE, DrillReport, Outcome, classify_stream


def event(
    tokens: int, *, chunk_id: str = "chatcmpl-1", usage: int | None = None, finish: str | None = None
) -> str:
    choice = {
        "delta": {"content": "x" * tokens},
        "logprobs": {"content": [{}] * tokens},
        "finish_reason": finish,
    }
    chunk: dict = {"id": chunk_id, "choices": [choice]}
    if usage is not None:
        chunk["usage"] = {"completion_tokens": usage}
    return "data: " + json.dumps(chunk)


DONE = "data: [DONE]"


def test_every_token_with_agreeing_usage_is_complete():
    reading = classify_stream(
        [event(2), event(3, finish="length"), event(0, usage=5), DONE], expected_tokens=5
    )
    assert (reading.kind, reading.tokens, reading.text) == (COMPLETE, 5, "xxxxx")


def test_a_stream_without_usage_or_without_its_length_finish_is_short():
    no_usage = classify_stream([event(5, finish="length"), DONE], expected_tokens=5)
    assert (no_usage.kind, no_usage.detail) == ("short", "no usage")
    stopped = classify_stream([event(5, finish="stop"), event(0, usage=5), DONE], expected_tokens=5)
    assert (stopped.kind, stopped.detail) == ("short", "finish reasons ['stop']")
    unfinished = classify_stream([event(5), event(0, usage=5), DONE], expected_tokens=5)
    assert unfinished.kind == "short", "no finish reason at all"


def test_a_missing_or_repeated_token_is_short():
    assert classify_stream([event(2), event(2), DONE], expected_tokens=5).kind == "short"
    assert classify_stream([event(3), event(3), DONE], expected_tokens=5).kind == "short"


def test_usage_that_disagrees_with_what_arrived_is_short():
    reading = classify_stream([event(5, finish="length"), event(0, usage=6), DONE], expected_tokens=5)
    assert (reading.kind, reading.detail) == ("short", "usage says 6")


def test_chunks_with_two_ids_are_not_one_stream():
    reading = classify_stream(
        [event(2), event(3, chunk_id="chatcmpl-2", finish="length"), DONE], expected_tokens=5
    )
    assert reading.kind == "short" and "several ids" in reading.detail


def test_an_error_event_names_its_code_and_a_stream_without_done_is_cut():
    error = 'data: {"error": {"message": "gone", "code": "engine_unavailable"}}'
    assert classify_stream([event(1), error, DONE], 5).kind == "error-event:engine_unavailable"
    assert classify_stream([event(1)], 5).kind == "cut"


def test_the_timeline_buckets_outcomes_by_their_end():
    report = DrillReport([Outcome(COMPLETE, 0.0, 1.0), Outcome("cut", 0.5, 6.0), Outcome(COMPLETE, 2.0, 7.0)])
    assert report.timeline(5.0) == [(0.0, {COMPLETE: 1}), (5.0, {"cut": 1, COMPLETE: 1})]
    assert [o.kind for o in report.failures] == ["cut"]
