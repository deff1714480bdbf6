"""Request shaping at the ingress: body parsing, model lookup and the max_tokens default and cap."""

from __future__ import annotations

import pytest

from apps.config import RequestLimits
from apps.errors import InvalidRequest, ModelNotFound, error_body
from apps.validation import parse_body, shape_request

LIMITS = {"tiny": RequestLimits(default_max_tokens=100, max_tokens_cap=200)}


def chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_missing_max_tokens_gets_the_model_default():
    shaped = shape_request(chat(), "chat", LIMITS)
    assert shaped.max_tokens == 100 and shaped.body["max_tokens"] == 100


def test_null_max_tokens_gets_the_model_default():
    assert shape_request(chat(max_tokens=None), "completion", LIMITS).max_tokens == 100


def test_max_tokens_at_cap_is_kept():
    assert shape_request(chat(max_tokens=200), "chat", LIMITS).max_tokens == 200


def test_max_tokens_over_cap_names_the_cap_and_value():
    with pytest.raises(InvalidRequest) as raised:
        shape_request(chat(max_tokens=4096), "chat", LIMITS)
    assert error_body(raised.value)["error"] == {
        "message": "`max_tokens` must be <= 200 for model tiny. Given: 4096",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "max_tokens_too_large",
    }


def test_max_completion_tokens_is_capped_and_normalised():
    shaped = shape_request(chat(max_completion_tokens=150), "chat", LIMITS)
    assert shaped.body["max_tokens"] == 150 and "max_completion_tokens" not in shaped.body
    with pytest.raises(InvalidRequest, match="max_completion_tokens` must be <= 200"):
        shape_request(chat(max_completion_tokens=201), "chat", LIMITS)


def test_conflicting_token_limits_are_rejected():
    with pytest.raises(InvalidRequest, match="disagree"):
        shape_request(chat(max_tokens=10, max_completion_tokens=20), "chat", LIMITS)


@pytest.mark.parametrize("value", [0, -5, 1.5, "10", True])
def test_max_tokens_must_be_a_positive_integer(value):
    with pytest.raises(InvalidRequest) as raised:
        shape_request(chat(max_tokens=value), "chat", LIMITS)
    assert raised.value.param == "max_tokens" and raised.value.status == 400


def test_unknown_model_is_404_listing_served_ids():
    with pytest.raises(ModelNotFound) as raised:
        shape_request({"model": "gpt-9"}, "chat", LIMITS)
    assert raised.value.status == 404
    assert "['tiny']" in raised.value.message and raised.value.param == "model"


@pytest.mark.parametrize("body", [{}, {"model": 3}, {"model": ""}])
def test_model_is_required(body):
    with pytest.raises(InvalidRequest) as raised:
        shape_request(body, "chat", LIMITS)
    assert raised.value.param == "model"


def test_stream_must_be_boolean():
    with pytest.raises(InvalidRequest) as raised:
        shape_request(chat(stream="yes"), "chat", LIMITS)
    assert raised.value.param == "stream"
    assert shape_request(chat(stream=True), "chat", LIMITS).body["stream"] is True


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
