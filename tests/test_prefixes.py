"""Prefix hygiene, pure logic: named system prompts and volatile-content detection."""

from __future__ import annotations

import logging

import pytest

from apps.errors import InvalidRequest
from apps.shaping.prefixes import (
    COMPLETION_SCAN_CHARS,
    VolatilePrefixWatch,
    apply_system_prompt,
    prompt_start,
    volatile_content,
)

PROMPTS = {"support": "You are the support assistant."}
USER = {"role": "user", "content": "Where is my order?"}


def test_a_named_system_prompt_becomes_the_first_message():
    body = {"model": "m", "system_prompt": "support", "messages": [USER], "max_tokens": 3}
    shaped = apply_system_prompt(body, "chat", "m", PROMPTS)
    assert shaped == {
        "model": "m",
        "messages": [{"role": "system", "content": PROMPTS["support"]}, USER],
        "max_tokens": 3,
    }
    assert body["system_prompt"] == "support", "the caller's body is not modified"


def test_a_body_without_a_reference_is_returned_as_it_is():
    body = {"model": "m", "messages": [USER]}
    assert apply_system_prompt(body, "chat", "m", PROMPTS) is body


@pytest.mark.parametrize(
    ("endpoint", "body", "code", "says"),
    [
        ("chat", {"system_prompt": "other", "messages": [USER]}, "unknown_system_prompt", "['support']"),
        ("chat", {"system_prompt": None, "messages": [USER]}, "unknown_system_prompt", "None"),
        ("chat", {"system_prompt": "support", "messages": [{"role": "developer", "content": "x"}]},
         "invalid_request", "not both"),
        ("completion", {"system_prompt": "support", "prompt": "hi"}, "invalid_request", "chat"),
    ],
)  # fmt: skip
def test_a_bad_reference_is_a_400_naming_the_field(endpoint, body, code, says):
    with pytest.raises(InvalidRequest) as caught:
        apply_system_prompt(body, endpoint, "m", PROMPTS)
    assert (caught.value.code, caught.value.param) == (code, "system_prompt")
    assert says in caught.value.message


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Session 3f2b8c1e-9a4d-4e2f-8b1a-0c9d8e7f6a5b. You are helpful.", "uuid"),
        ("Now: 2026-11-24T10:41:07Z. You are helpful.", "timestamp"),
        ("Now: 2026-11-24 10:41. You are helpful.", "timestamp"),
        ("The time is 10:41:07.", "timestamp"),
        ("request at 1795512067 epoch", "timestamp"),
        ("request at 1795512067123 epoch-ms", "timestamp"),
        ("Today is 2026-11-24.", "date"),
        ("Today is 11/24/2026.", "date"),
        ("Today is November 24, 2026.", "date"),
        ("Today is Nov. 24th 2026.", "date"),
        ("Today is 24 November 2026.", "date"),
    ],
)
def test_volatile_content_is_recognised(text, kind):
    found = volatile_content(text)
    assert found is not None and found[0] == kind, found


@pytest.mark.parametrize(
    "text",
    [
        "You are the support assistant of Example Corp. Refunds take 5 to 7 business days.",
        "Version 2.60.0 of the API; call 555-1234; order 12345678.",
        "Meeting at 10:30 every Monday.",  # a fixed clock time without seconds is stable text
        "",
    ],
)
def test_stable_text_is_not_flagged(text):
    assert volatile_content(text) is None


def test_the_prompt_start_of_a_chat_is_its_leading_system_messages():
    body = {
        "messages": [
            {"role": "system", "content": "A"},
            {"role": "developer", "content": [{"type": "text", "text": "B"}, {"type": "image_url"}]},
            {"role": "user", "content": "today is 2026-11-24"},
            {"role": "system", "content": "C"},
        ]
    }
    assert prompt_start(body, "chat") == "A\nB"


def test_the_prompt_start_of_a_completion_is_its_first_characters():
    prompt = "x" * COMPLETION_SCAN_CHARS + "2026-11-24"
    assert volatile_content(prompt_start({"prompt": prompt}, "completion")) is None
    assert prompt_start({"prompt": ["first", "second"]}, "completion") == "first"
    assert prompt_start({"prompt": [1, 2, 3]}, "completion") == ""


def test_malformed_bodies_have_an_empty_start():
    assert prompt_start({"messages": "not a list"}, "chat") == ""
    assert prompt_start({"messages": [["not", "a", "dict"]]}, "chat") == ""
    assert prompt_start({}, "completion") == ""


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_every_hit_is_counted_and_warned_about_at_most_once_a_minute(caplog):
    counted: list[str] = []
    clock = FakeClock()
    watch = VolatilePrefixWatch("m", counted.append, interval_s=60, clock=clock)
    volatile = {"messages": [{"role": "system", "content": "Now: 2026-11-24T10:41:07Z"}, USER]}
    stable = {"messages": [{"role": "system", "content": "You are helpful."}, USER]}
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert watch.check(volatile, "chat") == "timestamp"
        assert watch.check(stable, "chat") is None
        clock.now = 59
        watch.check(volatile, "chat")
        watch.check(volatile, "chat")
        clock.now = 61
        watch.check(volatile, "chat")
    assert counted == ["timestamp"] * 4
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("Model m: 1 request(s)")
    assert warnings[1].startswith("Model m: 3 request(s)"), "the second warning counts the silent hits"
    assert "'2026-11-24T10:41'" in warnings[1]
