"""Benchmark workloads are deterministic by seed and shaped as their names say."""

from __future__ import annotations

import random

import pytest

from scripts.loadgen import RequestResult, arrival_gaps, ratio_table, summarize, sustainable_rate
from scripts.workloads import SHAPED_MAX_TOKENS, UNSHAPED_MAX_TOKENS, WORKLOADS, make_workload


@pytest.mark.parametrize("name", WORKLOADS)
def test_same_seed_same_requests(name):
    assert make_workload(name, 20, seed=3) == make_workload(name, 20, seed=3)
    assert make_workload(name, 20, seed=3) != make_workload(name, 20, seed=4)


@pytest.mark.parametrize("name", WORKLOADS)
def test_short_lengths_are_accepted(name):
    specs = make_workload(name, 5, input_len=2, output_len=1)
    assert all(spec.max_tokens is None or spec.max_tokens >= 1 for spec in specs)


def test_faq_requests_share_few_prefixes():
    specs = make_workload("faq", 40, num_prefixes=4)
    assert len({spec.messages[0]["content"] for spec in specs}) <= 4
    assert len({spec.messages[1]["content"] for spec in specs}) > 4


def test_shaped_streams_and_caps_the_natural_lengths_that_unshaped_runs_to():
    shaped = make_workload("shaped", 400)
    unshaped = make_workload("unshaped", 400)
    assert [s.messages for s in shaped] == [s.messages for s in unshaped], "same prompts"
    assert all(s.stream for s in shaped) and not any(s.stream for s in unshaped)
    for capped, natural in zip(shaped, unshaped):
        assert capped.max_tokens == min(natural.max_tokens, SHAPED_MAX_TOKENS)
    lengths = sorted(s.max_tokens for s in unshaped)
    assert 16 <= lengths[0] and lengths[-1] <= UNSHAPED_MAX_TOKENS
    assert 120 < lengths[len(lengths) // 2] < 260, "median near the natural median"
    assert sum(length > SHAPED_MAX_TOKENS for length in lengths) > 40, "a long tail to cut"


def test_sustainable_rate_is_the_last_rate_within_the_slo_before_the_first_miss():
    def run(rate, p95, errors=None):
        return {"rate": rate, "endpoints": {"A": {"errors": errors or {}, "ttft_ms": {"p95": p95}}}}

    runs = [run(1, 100), run(4, 300), run(2, 200), run(8, 900), run(16, 400)]
    assert sustainable_rate(runs, "A", slo_ttft_ms=500) == 4, "16 passes only past saturation"
    assert sustainable_rate([run(1, 100), run(2, 200, {"503": 1})], "A", slo_ttft_ms=500) == 1
    assert sustainable_rate([run(1, 600)], "A", slo_ttft_ms=500) == 0


def test_poisson_gaps_average_to_the_rate_and_bursts_vary_more():
    rng = random.Random(0)
    poisson = arrival_gaps(20000, 10.0, 1.0, rng)
    bursty = arrival_gaps(20000, 10.0, 0.25, rng)
    mean = sum(poisson) / len(poisson)
    assert 0.095 < mean < 0.105
    variance = lambda xs: sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs)  # noqa: E731
    assert variance(bursty) > 2 * variance(poisson)
    assert arrival_gaps(3, float("inf"), 1.0, rng) == [0.0, 0.0, 0.0]


def test_summary_counts_errors_and_goodput_against_slos():
    results = [
        RequestResult(200, ttft_s=0.1, e2e_s=1.1, itl_s=[0.01] * 10, output_tokens=11),
        RequestResult(200, ttft_s=0.9, e2e_s=1.9, itl_s=[0.01] * 10, output_tokens=11),
        RequestResult(429, error="rate limited"),
    ]
    summary = summarize(results, 2.0, slo_ttft_ms=500, slo_tpot_ms=200)
    assert summary["completed"] == 2 and summary["errors"] == {"429": 1}
    assert summary["goodput_requests_per_s"] == 0.5, "only the first meets the TTFT SLO"
    assert summary["tpot_ms"]["p50"] == pytest.approx(100.0)
    ratios = ratio_table(summary, summarize(results[:1], 1.0, slo_ttft_ms=500, slo_tpot_ms=200))
    assert ratios["requests_per_s"] == pytest.approx(1.0)


def test_ingress_cost_benchmark_reports_positive_cpu_times():
    from scripts.ingress_cost import measure

    results = measure(repetitions=200)
    assert results["request_bytes"] > 0
    assert 0 < results["parse_body_us"] <= results["parse_and_shape_us"] * 1.5, results
    assert results["rejected_with_error_body_us"] > 0
