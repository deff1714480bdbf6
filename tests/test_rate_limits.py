"""Per-key rate limits without Ray: token buckets, reservations and their settlement, concurrency
slots and leases, and the 429/400 errors and `x-ratelimit-*` headers built from a decision."""

from __future__ import annotations

import hashlib
import math

import pytest

from apps.admission.rate_limits import (
    CONCURRENCY_RETRY_AFTER_S,
    Decision,
    KeyLimits,
    LimitState,
    TokenBucket,
    duration,
    rate_limit_error,
    ratelimit_headers,
)
from apps.config import ApiKey
from apps.errors import InvalidRequest, RateLimited, error_body


def api_key(name: str = "alice", **limits) -> ApiKey:
    return ApiKey(name=name, sha256=hashlib.sha256(name.encode()).hexdigest(), **limits)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limits_for(*keys: ApiKey, lease_s: float = 600.0) -> tuple[KeyLimits, Clock]:
    clock = Clock()
    return KeyLimits(keys, lease_s=lease_s, clock=clock), clock


# Token bucket


def test_bucket_starts_full_and_refills_at_capacity_per_minute_up_to_capacity():
    bucket = TokenBucket(600, now=0.0)
    assert bucket.level == 600 and bucket.rate_per_s == 10
    bucket.level = 100
    bucket.refill(now=20.0)
    assert bucket.level == 300
    bucket.refill(now=1000.0)
    assert bucket.level == 600


def test_bucket_wait_is_the_exact_refill_time_and_inf_beyond_capacity():
    bucket = TokenBucket(600, now=0.0)
    bucket.level = 150
    assert bucket.wait_s(100) == 0.0
    assert bucket.wait_s(250) == 10.0
    assert bucket.wait_s(600) == 45.0
    assert bucket.wait_s(601) == math.inf


def test_bucket_state_floors_remaining_and_never_reports_debt():
    bucket = TokenBucket(60, now=0.0)
    bucket.level = 12.9
    assert bucket.state() == LimitState(limit=60, remaining=12, reset_s=pytest.approx(47.1))
    bucket.level = -30
    assert bucket.state() == LimitState(limit=60, remaining=0, reset_s=90.0)


# Requests per minute


def test_ten_requests_per_minute_admit_ten_of_thirty_back_to_back():
    limits, clock = limits_for(api_key(requests_per_minute=10))
    decisions = [limits.reserve("alice", 0) for _ in range(30)]
    admitted = [d.admitted for d in decisions]
    assert admitted == [True] * 10 + [False] * 20
    refused = decisions[10]
    assert refused.kind == "requests" and refused.retry_after_s == pytest.approx(6.0)
    assert "10 requests per minute" in refused.message


def test_one_more_request_is_admitted_after_six_seconds_and_not_before():
    limits, clock = limits_for(api_key(requests_per_minute=10))
    for _ in range(10):
        assert limits.reserve("alice", 0).admitted
    clock.advance(5.9)
    assert not limits.reserve("alice", 0).admitted
    clock.advance(0.1)
    assert limits.reserve("alice", 0).admitted
    assert not limits.reserve("alice", 0).admitted


def test_refused_reservation_charges_nothing():
    limits, clock = limits_for(api_key(requests_per_minute=60, tokens_per_minute=600))
    assert limits.reserve("alice", 500).admitted
    assert not limits.reserve("alice", 200).admitted  # tokens refuse; no request is spent
    decision = limits.reserve("alice", 100)
    assert decision.admitted
    assert decision.requests.remaining == 58 and decision.tokens.remaining == 0
    assert limits.in_flight("alice") == 2


def test_keys_have_separate_buckets():
    limits, clock = limits_for(api_key("alice", requests_per_minute=1), api_key("bob", requests_per_minute=1))
    assert limits.reserve("alice", 0).admitted
    assert not limits.reserve("alice", 0).admitted
    assert limits.reserve("bob", 0).admitted


# Tokens per minute


def test_tokens_beyond_remaining_are_refused_until_the_exact_refill_time():
    limits, clock = limits_for(api_key(tokens_per_minute=600))  # 10 tokens/s
    assert limits.reserve("alice", 400).admitted
    refused = limits.reserve("alice", 300)
    assert not refused.admitted and refused.reservation is None
    assert refused.kind == "tokens"
    assert refused.retry_after_s == (300 - 200) / 10.0
    assert refused.tokens == LimitState(limit=600, remaining=200, reset_s=40.0)
    assert "600 tokens per minute" in refused.message
    clock.advance(9.0)
    assert not limits.reserve("alice", 300).admitted
    clock.advance(1.0)
    assert limits.reserve("alice", 300).admitted


def test_reservation_over_the_whole_token_limit_is_never_admitted_and_gives_400():
    limits, clock = limits_for(api_key(tokens_per_minute=600))
    refused = limits.reserve("alice", 601)
    assert not refused.admitted and refused.kind == "tokens"
    assert refused.retry_after_s == math.inf
    error = rate_limit_error(refused)
    assert isinstance(error, InvalidRequest) and not isinstance(error, RateLimited)
    assert error.status == 400 and error.code == "exceeds_token_limit" and error.param == "max_tokens"
    assert "601" in error.message and "600 tokens per minute" in error.message
    assert "retry-after" not in error.headers
    # The bucket was full: waiting cannot help, and nothing was charged.
    assert limits.reserve("alice", 600).admitted


def test_slower_limit_decides_kind_and_wait_when_both_refuse():
    limits, clock = limits_for(api_key(requests_per_minute=1, tokens_per_minute=600))
    assert limits.reserve("alice", 600).admitted
    refused = limits.reserve("alice", 600)  # requests: 60 s, tokens: 60 s -> tie
    assert refused.retry_after_s == pytest.approx(60.0)
    clock.advance(1.0)
    refused = limits.reserve("alice", 10)  # requests: 59 s, tokens: 0 s
    assert refused.kind == "requests" and refused.retry_after_s == pytest.approx(59.0)


# Settling


def test_settle_with_fewer_tokens_refunds_the_difference():
    limits, clock = limits_for(api_key(tokens_per_minute=600))
    first = limits.reserve("alice", 600)
    assert not limits.reserve("alice", 100).admitted
    limits.settle(first.reservation, 100)
    assert limits.in_flight("alice") == 0
    assert limits.reserve("alice", 500).admitted
    assert not limits.reserve("alice", 1).admitted


def test_settle_with_none_charges_the_reservation_in_full():
    limits, clock = limits_for(api_key(tokens_per_minute=600))
    first = limits.reserve("alice", 600)
    limits.settle(first.reservation, None)
    assert limits.in_flight("alice") == 0
    refused = limits.reserve("alice", 1)
    assert not refused.admitted and refused.retry_after_s == pytest.approx(0.1)


def test_settle_with_more_than_reserved_puts_the_bucket_in_debt():
    limits, clock = limits_for(api_key(tokens_per_minute=600))
    first = limits.reserve("alice", 100)  # level 500
    limits.settle(first.reservation, 700)  # level 500 + 100 - 700 = -100
    refused = limits.reserve("alice", 100)
    assert not refused.admitted and refused.kind == "tokens"
    assert refused.retry_after_s == pytest.approx((100 - -100) / 10.0)
    assert refused.tokens.remaining == 0 and refused.tokens.reset_s == pytest.approx(70.0)
    clock.advance(19.9)
    assert not limits.reserve("alice", 100).admitted
    clock.advance(0.2)
    assert limits.reserve("alice", 100).admitted


def test_second_settle_of_the_same_reservation_changes_nothing():
    limits, clock = limits_for(api_key(tokens_per_minute=600, max_concurrent_requests=5))
    first = limits.reserve("alice", 600)
    limits.settle(first.reservation, 0)  # full refund
    second = limits.reserve("alice", 600)
    assert second.admitted
    limits.settle(first.reservation, 0)  # again: no refund, no freed slot
    assert limits.in_flight("alice") == 1
    assert not limits.reserve("alice", 1).admitted


def test_settle_of_unknown_reservation_is_harmless():
    limits, clock = limits_for(api_key(tokens_per_minute=600))
    limits.settle("no-such-reservation", 0)
    decision = limits.reserve("alice", 600)
    assert decision.admitted and decision.tokens.remaining == 0


def test_refund_never_fills_the_bucket_past_capacity():
    limits, clock = limits_for(api_key(tokens_per_minute=600))
    first = limits.reserve("alice", 300)
    clock.advance(60.0)
    limits.settle(first.reservation, 0)
    decision = limits.reserve("alice", 600)
    assert decision.admitted
    assert not limits.reserve("alice", 1).admitted


# Concurrency and leases


def test_concurrent_reservation_over_the_limit_is_refused_until_one_settles():
    limits, clock = limits_for(api_key(max_concurrent_requests=2))
    first, second = limits.reserve("alice", 10), limits.reserve("alice", 10)
    assert first.admitted and second.admitted
    refused = limits.reserve("alice", 10)
    assert not refused.admitted and refused.kind == "requests"
    assert refused.retry_after_s == CONCURRENCY_RETRY_AFTER_S
    assert "concurrent" in refused.message and "limit 2" in refused.message
    assert limits.in_flight("alice") == 2
    limits.settle(first.reservation, 5)
    assert limits.in_flight("alice") == 1
    assert limits.reserve("alice", 10).admitted
    assert not limits.reserve("alice", 10).admitted


def test_concurrency_refusal_does_not_spend_a_request():
    limits, clock = limits_for(api_key(requests_per_minute=2, max_concurrent_requests=1))
    first = limits.reserve("alice", 0)
    assert not limits.reserve("alice", 0).admitted
    limits.settle(first.reservation, None)
    assert limits.reserve("alice", 0).admitted  # the second of two requests per minute


def test_unsettled_reservation_expires_after_lease_freeing_its_slot_charged_in_full():
    limits, clock = limits_for(api_key(tokens_per_minute=600, max_concurrent_requests=1), lease_s=30.0)
    lost = limits.reserve("alice", 600)
    clock.advance(29.0)
    held = limits.reserve("alice", 1)
    assert not held.admitted and held.kind == "requests"  # the slot is still leased
    clock.advance(1.0)
    # The lease ran out: the slot is free, and no token was refunded (30 s refilled 300).
    refused = limits.reserve("alice", 301)
    assert limits.in_flight("alice") == 0
    assert refused.kind == "tokens" and refused.retry_after_s == pytest.approx(0.1)
    assert limits.reserve("alice", 300).admitted
    # A settle arriving after the lease ran out changes nothing.
    limits.settle(lost.reservation, 0)
    assert limits.in_flight("alice") == 1
    clock.advance(1.0)
    assert not limits.reserve("alice", 1).admitted  # still the concurrency slot of the new one


def test_settle_also_expires_old_leases():
    limits, clock = limits_for(api_key(max_concurrent_requests=2), lease_s=10.0)
    old = limits.reserve("alice", 0)
    clock.advance(5.0)
    new = limits.reserve("alice", 0)
    assert limits.in_flight("alice") == 2
    clock.advance(5.0)
    limits.settle(new.reservation, 0)
    assert limits.in_flight("alice") == 0
    assert old.admitted


# Headers


def test_ratelimit_headers_report_limit_remaining_and_reset_for_both_limits():
    limits, clock = limits_for(api_key(requests_per_minute=10, tokens_per_minute=600))
    decision = limits.reserve("alice", 100)
    assert ratelimit_headers(decision) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "500",
        "x-ratelimit-reset-tokens": "10s",
    }
    clock.advance(3.0)
    decision = limits.reserve("alice", 550)  # tokens: 530 left -> refused
    headers = ratelimit_headers(decision)
    assert not decision.admitted
    assert headers["x-ratelimit-remaining-requests"] == "9"  # 9 + 0.5, floored
    assert headers["x-ratelimit-reset-requests"] == "3s"
    assert headers["x-ratelimit-remaining-tokens"] == "530"
    assert headers["x-ratelimit-reset-tokens"] == "7s"


def test_key_without_token_limit_gets_no_token_headers():
    limits, clock = limits_for(api_key(requests_per_minute=60))
    headers = ratelimit_headers(limits.reserve("alice", 100))
    assert headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
    }


def test_key_with_only_a_concurrency_limit_gets_no_ratelimit_headers():
    limits, clock = limits_for(api_key(max_concurrent_requests=1))
    assert ratelimit_headers(limits.reserve("alice", 100)) == {}


# Errors


def test_requests_refusal_is_a_429_of_type_requests_with_retry_after():
    limits, clock = limits_for(api_key(requests_per_minute=10))
    for _ in range(10):
        limits.reserve("alice", 0)
    error = rate_limit_error(limits.reserve("alice", 0))
    assert isinstance(error, RateLimited)
    assert error.status == 429 and error.type == "requests" and error.code == "rate_limit_exceeded"
    assert error.headers == {"retry-after": "6", "retry-after-ms": "6000"}
    assert error_body(error)["error"]["type"] == "requests"


def test_tokens_refusal_is_a_429_of_type_tokens_with_retry_after_rounded_up():
    limits, clock = limits_for(api_key(tokens_per_minute=600))
    limits.reserve("alice", 600)
    decision = limits.reserve("alice", 25)  # 2.5 s
    error = rate_limit_error(decision)
    assert isinstance(error, RateLimited)
    assert error.status == 429 and error.type == "tokens" and error.code == "rate_limit_exceeded"
    assert error.headers == {"retry-after": "3", "retry-after-ms": "2500"}


def test_concurrency_refusal_is_a_429_of_type_requests_retrying_in_one_second():
    limits, clock = limits_for(api_key(max_concurrent_requests=1))
    limits.reserve("alice", 0)
    error = rate_limit_error(limits.reserve("alice", 0))
    assert error.status == 429 and error.type == "requests"
    assert error.headers == {"retry-after": "1", "retry-after-ms": "1000"}


@pytest.mark.parametrize(
    ("retry_after_s", "seconds", "ms"),
    [(0.0001, "1", "1"), (0.25, "1", "250"), (1.0, "1", "1000"), (1.001, "2", "1001"), (59.5, "60", "59500")],
)
def test_retry_after_header_is_whole_seconds_rounded_up(retry_after_s, seconds, ms):
    decision = Decision(None, kind="tokens", message="slow down", retry_after_s=retry_after_s)
    error = rate_limit_error(decision)
    assert error.headers == {"retry-after": seconds, "retry-after-ms": ms}
    assert error.message == "slow down"


def test_decision_is_admitted_only_with_a_reservation():
    assert Decision("r0").admitted
    assert not Decision(None, kind="requests").admitted


# Durations


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.12, "120ms"),
        (1.5, "1.5s"),
        (360, "6m0s"),
        (0, "0ms"),
        (-3, "0ms"),
        (0.9996, "1s"),
        (6.0, "6s"),
        (59.9999, "1m0s"),
        (70, "1m10s"),
        (90.5, "1m30.5s"),
        (3660, "1h1m0s"),
    ],
)
def test_duration_is_written_the_openai_way(seconds, text):
    assert duration(seconds) == text


@pytest.mark.parametrize("per_minute", [600, 7, 13, 1000])
@pytest.mark.parametrize("start", [0.0, 500000.1, 12345.678])
def test_retrying_exactly_when_told_is_admitted(per_minute, start):
    now = [start]
    limits = KeyLimits(
        [ApiKey(name="k", sha256="c" * 64, requests_per_minute=per_minute)],
        lease_s=3600,
        clock=lambda: now[0],
    )
    while limits.reserve("k", 1).admitted:
        pass
    refused = limits.reserve("k", 1)
    now[0] += refused.retry_after_s
    assert limits.reserve("k", 1).admitted
