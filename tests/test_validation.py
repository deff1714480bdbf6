"""Request shaping at the ingress: body parsing, the max_tokens default, cap and clamp, the caps on
`n`, `best_of` and `stop`, and the token estimate the rate limiter reserves."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from apps.config import RequestLimits
from apps.errors import BodyTimeout, ClientClosed, InvalidRequest, error_body
from apps.shaping.validation import parse_body, prompt_estimate, read_body, requested_model, shape_request

LIMITS = RequestLimits(default_max_tokens=100, max_tokens_cap=200, max_n=3, max_stop_sequences=2)


def chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_missing_max_tokens_gets_the_model_default():
    shaped = shape_request(chat(), "chat", "tiny", LIMITS)
    assert shaped.max_tokens == 100 and shaped.body["max_tokens"] == 100


def test_null_max_tokens_gets_the_model_default():
    assert shape_request(chat(max_tokens=None), "completion", "tiny", LIMITS).max_tokens == 100


def test_max_tokens_at_cap_is_kept():
    assert shape_request(chat(max_tokens=200), "chat", "tiny", LIMITS).max_tokens == 200


def test_max_tokens_over_cap_names_the_cap_and_value():
    with pytest.raises(InvalidRequest) as raised:
        shape_request(chat(max_tokens=4096), "chat", "tiny", LIMITS)
    assert error_body(raised.value)["error"] == {
        "message": "`max_tokens` must be <= 200 for model tiny. Given: 4096",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "max_tokens_too_large",
    }


def test_max_completion_tokens_is_capped_and_normalised():
    shaped = shape_request(chat(max_completion_tokens=150), "chat", "tiny", LIMITS)
    assert shaped.body["max_tokens"] == 150 and "max_completion_tokens" not in shaped.body
    with pytest.raises(InvalidRequest, match="max_completion_tokens` must be <= 200"):
        shape_request(chat(max_completion_tokens=201), "chat", "tiny", LIMITS)


def test_conflicting_token_limits_are_rejected():
    with pytest.raises(InvalidRequest, match="disagree"):
        shape_request(chat(max_tokens=10, max_completion_tokens=20), "chat", "tiny", LIMITS)


@pytest.mark.parametrize("value", [0, -5, 1.5, "10", True])
def test_max_tokens_must_be_a_positive_integer(value):
    with pytest.raises(InvalidRequest) as raised:
        shape_request(chat(max_tokens=value), "chat", "tiny", LIMITS)
    assert raised.value.param == "max_tokens" and raised.value.status == 400


@pytest.mark.parametrize("body", [{}, {"model": 3}, {"model": ""}])
def test_model_is_required(body):
    with pytest.raises(InvalidRequest) as raised:
        requested_model(body)
    assert raised.value.param == "model"
    assert requested_model({"model": "tiny"}) == "tiny"


def test_clamp_mode_lowers_max_tokens_to_the_cap():
    clamping = LIMITS.model_copy(update={"over_cap": "clamp"})
    shaped = shape_request(chat(max_tokens=4096), "chat", "tiny", clamping)
    assert (shaped.max_tokens, shaped.clamped, shaped.body["max_tokens"]) == (200, True, 200)
    assert shape_request(chat(max_tokens=150), "chat", "tiny", clamping).clamped is False


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [("n", 4, "n_too_large"), ("n", 0, "invalid_request"), ("n", "2", "invalid_request")],
)
def test_choice_count_is_capped(field, value, code):
    with pytest.raises(InvalidRequest) as raised:
        shape_request(chat(**{field: value}), "completion", "tiny", LIMITS)
    assert (raised.value.param, raised.value.code) == (field, code)


@pytest.mark.parametrize(
    ("stop", "code"),
    [(["a", "b", "c"], "too_many_stop_sequences"), ([1], "invalid_stop"), ({"a": 1}, "invalid_stop")],
)
def test_stop_sequences_are_capped(stop, code):
    with pytest.raises(InvalidRequest) as raised:
        shape_request(chat(stop=stop), "chat", "tiny", LIMITS)
    assert (raised.value.param, raised.value.code) == ("stop", code)
    assert shape_request(chat(stop=["a", "b"]), "chat", "tiny", LIMITS).body["stop"] == ["a", "b"]


def test_reservation_is_prompt_estimate_plus_every_choice_at_max_tokens():
    body = chat(max_tokens=50, n=3, messages=[{"role": "user", "content": "x" * 400}])
    assert shape_request(body, "chat", "tiny", LIMITS).reserved_tokens == 100 + 4 + 3 * 50


def test_prompt_estimate_reads_text_parts_and_token_ids():
    parts = [{"type": "text", "text": "y" * 40}, {"type": "image_url", "image_url": {"url": "u"}}]
    assert prompt_estimate({"messages": [{"role": "user", "content": parts}]}, "chat") == 10 + 4
    assert prompt_estimate({"prompt": "z" * 9}, "completion") == 3
    assert prompt_estimate({"prompt": [1, 2, 3]}, "completion") == 3
    assert prompt_estimate({"prompt": [[1, 2], "abcd"]}, "completion") == 3
    assert prompt_estimate({"messages": "not a list"}, "chat") == 0


def test_stream_must_be_boolean():
    with pytest.raises(InvalidRequest) as raised:
        shape_request(chat(stream="yes"), "chat", "tiny", LIMITS)
    assert raised.value.param == "stream"
    assert shape_request(chat(stream=True), "chat", "tiny", LIMITS).body["stream"] is True


@pytest.mark.parametrize(
    "raw",
    [
        b"{bad",
        b"[1, 2]",
        b"\xff\xfe",
        b"",
        b"null",
        b'{"temperature": NaN}',
        b'{"n": Infinity}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"max_tokens": ' + b"9" * 5000 + b"}",
    ],
    ids=["syntax", "array", "not_utf8", "empty", "null", "nan", "infinity", "deep_nesting", "huge_int"],
)
def test_body_must_be_a_json_object(raw):
    with pytest.raises(InvalidRequest) as raised:
        parse_body(raw)
    assert raised.value.code == "invalid_json" and raised.value.status == 400


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hi", "messages"),
        (["hi"], "messages.0"),
        ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}], "messages.1.role"),
        ([{"content": "no role"}], "messages.0.role"),
    ],
)
def test_messages_must_be_a_list_of_objects_with_openai_roles(messages, param):
    with pytest.raises(InvalidRequest) as raised:
        shape_request(chat(messages=messages), "chat", "tiny", LIMITS)
    assert raised.value.param == param


def test_a_completion_with_several_prompts_reserves_for_each():
    body = {"model": "tiny", "prompt": ["a" * 40, "b" * 40, [1, 2, 3]], "max_tokens": 10, "n": 2}
    assert shape_request(body, "completion", "tiny", LIMITS).reserved_tokens == 10 + 10 + 3 + 3 * 2 * 10


def test_beam_search_is_refused():
    with pytest.raises(InvalidRequest) as raised:
        shape_request(chat(use_beam_search=True), "chat", "tiny", LIMITS)
    assert (raised.value.param, raised.value.code) == ("use_beam_search", "unsupported_parameter")


def body_request(*messages: dict) -> Request:
    """A request whose body arrives as `messages`, then never again (a stalled sender)."""
    pending = list(messages)

    async def receive() -> dict:
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()  # the rest of the body never comes
        raise AssertionError("unreachable")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"100")]}
    return Request(scope, receive)


def test_a_body_that_stops_arriving_gets_408_and_a_closed_connection():
    request = body_request({"type": "http.request", "body": b'{"model":', "more_body": True})
    with pytest.raises(BodyTimeout, match=r"did not arrive within 0.05s \(9 bytes received\)") as caught:
        asyncio.run(read_body(request, 1000, timeout_s=0.05))
    assert caught.value.status == 408 and caught.value.headers == {"connection": "close"}


def test_a_client_leaving_mid_body_is_499_not_an_internal_error():
    request = body_request({"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"})
    with pytest.raises(ClientClosed) as caught:
        asyncio.run(read_body(request, 1000, timeout_s=5))
    assert caught.value.status == 499


def test_a_body_that_arrives_in_time_is_read_whole():
    request = body_request(
        {"type": "http.request", "body": b'{"a":', "more_body": True},
        {"type": "http.request", "body": b"1}", "more_body": False},
    )
    assert asyncio.run(read_body(request, 1000, timeout_s=5)) == b'{"a":1}'


# --- the endpoints beyond chat and completions (apps.endpoints) --------------------------------

POOLING_LIMITS = RequestLimits(max_inputs=3)


def test_responses_and_messages_cap_their_own_output_field():
    shaped = shape_request({"model": "tiny", "input": "hi"}, "responses", "tiny", LIMITS)
    assert shaped.body["max_output_tokens"] == 100 and shaped.body["store"] is False
    with pytest.raises(InvalidRequest) as raised:
        shape_request({"model": "tiny", "input": "hi", "max_output_tokens": 201}, "responses", "tiny", LIMITS)
    assert (raised.value.param, raised.value.code) == ("max_output_tokens", "max_tokens_too_large")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
    assert shape_request(body, "messages", "tiny", LIMITS).body["max_tokens"] == 50
    with pytest.raises(InvalidRequest) as raised:
        shape_request(body | {"stop_sequences": ["a", "b", "c"]}, "messages", "tiny", LIMITS)
    assert raised.value.param == "stop_sequences"


@pytest.mark.parametrize("field", ["store", "previous_response_id", "background"])
def test_stored_responses_are_refused_naming_the_field(field):
    value = "resp_1" if field == "previous_response_id" else True
    with pytest.raises(InvalidRequest) as raised:
        shape_request({"model": "tiny", "input": "hi", field: value}, "responses", "tiny", LIMITS)
    assert (raised.value.param, raised.value.code) == (field, "unsupported_parameter")


@pytest.mark.parametrize(
    ("fields", "code"),
    [({"best_of": 1}, None), ({"n": 2, "best_of": 2}, None), ({"best_of": 2}, "unsupported_parameter"),
     ({"best_of": 0}, "invalid_request"), ({"best_of": True}, "invalid_request")],
)  # fmt: skip
def test_best_of_is_accepted_only_when_it_changes_nothing(fields, code):
    body = {"model": "tiny", "prompt": "p", **fields}
    if code is None:
        shaped = shape_request(body, "completion", "tiny", LIMITS)
        assert "best_of" not in shaped.body
        assert shaped.reserved_tokens == 1 + fields.get("n", 1) * 100
    else:
        with pytest.raises(InvalidRequest) as raised:
            shape_request(body, "completion", "tiny", LIMITS)
        assert (raised.value.param, raised.value.code) == ("best_of", code)


def test_every_conversation_is_estimated_like_a_chat():
    text = "x" * 40  # 10 tokens
    chat_body = {"messages": [{"role": "system", "content": text}, {"role": "user", "content": text}]}
    responses = {"instructions": text, "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}]}
    messages = {"system": text, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    estimates = {prompt_estimate(b, e) for e, b in (("chat", chat_body), ("responses", responses), ("messages", messages))}
    assert estimates == {2 * 10 + 2 * 4}
    assert prompt_estimate({"input": "x" * 40}, "responses") == 10 + 4


def test_pooling_inputs_are_counted_capped_and_reserved_without_output():
    shaped = shape_request({"model": "e", "input": ["x" * 40, [1, 2, 3]]}, "embeddings", "e", POOLING_LIMITS)
    assert (shaped.max_tokens, shaped.reserved_tokens) == (0, 10 + 3)
    rerank = {"model": "e", "query": "x" * 4, "documents": ["y" * 4, "z" * 4]}
    assert shape_request(rerank, "rerank", "e", POOLING_LIMITS).reserved_tokens == 3
    for endpoint, body in (("embeddings", {"input": ["a"] * 4}), ("rerank", {"query": "q", "documents": ["d"] * 3})):
        with pytest.raises(InvalidRequest) as raised:
            shape_request(body, endpoint, "e", POOLING_LIMITS)
        assert raised.value.code == "too_many_inputs"
    with pytest.raises(InvalidRequest) as raised:
        shape_request({"input": "a", "encoding_format": "bytes"}, "embeddings", "e", POOLING_LIMITS)
    assert raised.value.param == "encoding_format"


def test_tokenize_reserves_nothing():
    shaped = shape_request({"model": "t", "prompt": "x" * 400}, "tokenize", "t", LIMITS)
    assert (shaped.max_tokens, shaped.reserved_tokens) == (0, 0)
