"""The gateway's Prometheus metrics, exported through Ray's metrics agent.

Why Ray's export and not prometheus-client's own HTTP server: an app is many processes per node
(ingress replicas, model replicas, each engine's core), and a scrape of one process sees only its
own series. Ray's agent on every node gathers the metrics of all of them into one endpoint
(`ray start --metrics-export-port=8080`, then `http://NODE:8080/metrics`), labels each series with
its worker, and the head writes a Prometheus service-discovery file for all nodes. vLLM ships a
stat logger that exports its engine metrics the same way (`RayPrometheusStatLogger`), and Serve
exports its own (replicas, autoscaling), so one scrape config covers the whole stack. Ray adds the
prefix `ray_` to every name (`gateway_requests` is scraped as `ray_gateway_requests_total`).

Labels stay bounded whatever clients send: `model` is a served model id (or `-`), `key` an API
key's configured name (`anonymous` when auth is off, `-` before authentication).

Recording is about 2 us a call (measured in a replica), so every request records directly.
"""

from __future__ import annotations

import functools

from ray.util import metrics

# Request latencies, 5 ms to 2 min, about 1.5x apart: histogram_quantile interpolates within a
# bucket, so a quantile is off by at most a third of it; p50/p95/p99 stay readable across the range.
LATENCY_BUCKETS_S = (
    0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0,
)  # fmt: skip
# Time between two tokens of a stream: 1 ms (a fast GPU) to 5 s (an overloaded CPU).
INTER_TOKEN_BUCKETS_S = (
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0,
)  # fmt: skip
# Time waiting in the ingress queue: most requests wait not at all, the rest up to the timeout.
QUEUE_WAIT_BUCKETS_S = (0.001, 0.0025) + LATENCY_BUCKETS_S
NO_MODEL = "-"
UNAUTHENTICATED = "-"
MODEL_KEY = ("model", "key")


class IngressMetrics:
    """What the ingress records: each request's outcome and timings as the client saw them,
    and its queue."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "gateway_requests",
            "Requests by final status (499: the client left; a stream ended by an error event "
            "counts as that error's status), by endpoint (`apps.endpoints`; `-`: other paths).",
            tag_keys=(*MODEL_KEY, "status", "endpoint"),
        )
        self.rejections = metrics.Counter(
            "gateway_rejections",
            "Requests answered with an error, by its OpenAI error code "
            "(queue_full, priority_shed, rate_limit_exceeded, invalid_request, ...).",
            tag_keys=(*MODEL_KEY, "reason"),
        )
        self.time_to_first_token = metrics.Histogram(
            "gateway_time_to_first_token_seconds",
            "Streams: from the request's arrival to the first byte of its first chunk.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=MODEL_KEY,
        )
        self.time_to_last_token = metrics.Histogram(
            "gateway_time_to_last_token_seconds",
            "Successful requests: from arrival to the last byte of the answer.",
            boundaries=list(LATENCY_BUCKETS_S),
            tag_keys=MODEL_KEY,
        )
        self.inter_token_latency = metrics.Histogram(
            "gateway_inter_token_latency_seconds",
            "Streams: mean time between two output tokens of one request "
            "(first to last byte over completion tokens - 1).",
            boundaries=list(INTER_TOKEN_BUCKETS_S),
            tag_keys=MODEL_KEY,
        )
        self.queue_wait = metrics.Histogram(
            "gateway_queue_wait_seconds",
            "Time a request waited in the ingress queue for a slot of its model (0: none).",
            boundaries=list(QUEUE_WAIT_BUCKETS_S),
            tag_keys=MODEL_KEY,
        )
        self.in_flight = metrics.Gauge(
            "gateway_requests_in_flight",
            "Requests admitted to a model's engines and not yet answered, per ingress replica.",
            tag_keys=MODEL_KEY,
        )
        self.fair_share_overtakes = metrics.Counter(
            "gateway_fair_share_overtakes",
            "Requests given a freed slot ahead of an earlier waiter of another key of their "
            "priority class, because their key had been served less (`apps.admission.gate`).",
            tag_keys=MODEL_KEY,
        )
        self.queue_depth = metrics.Gauge(
            "gateway_queue_depth",
            "Requests waiting in the ingress queue of a model, per ingress replica.",
            tag_keys=("model",),
        )
        self.max_in_flight = metrics.Gauge(
            "gateway_admission_max_in_flight",
            "Requests of a model this ingress replica lets reach the engines at once: its share "
            "of the admission bound, live (sized by the engines' KV capacity where "
            "`admission.typical_request_tokens` says so).",
            tag_keys=("model",),
        )
        self.replicas_max = metrics.Gauge(
            "gateway_model_replicas_max",
            "The most replicas a model may run (its autoscaling `max_replicas`, or its fixed "
            "count), live; `deployment` is its Serve deployment, to compare with Serve's "
            "replica counts (the replicas-at-max alert).",
            tag_keys=("model", "deployment"),
        )
        self.failovers = metrics.Counter(
            "gateway_failovers",
            "Model calls sent again because their replica was lost: `retry` before the first "
            "token (the client sees nothing), `resume` a stream continued on another replica.",
            tag_keys=("model", "kind"),
        )
        self.volatile_prefixes = metrics.Counter(
            "gateway_volatile_prefixes",
            "Requests whose prompt starts with content that changes per request (a timestamp, "
            "date or UUID in the system prompt), which defeats prefix caching.",
            tag_keys=("model", "kind"),
        )


class ModelServerMetrics:
    """What a model server records: tokens, counted at the engine, so that a stream a client
    left or that failed counts what it generated (a non-streaming request's output tokens are
    known only when it finishes: cut short, only its prompt counts)."""

    def __init__(self) -> None:
        self.prompt_tokens = metrics.Counter(
            "gateway_prompt_tokens",
            "Prompt tokens sent to the engine (after the chat template).",
            tag_keys=MODEL_KEY,
        )
        self.generation_tokens = metrics.Counter(
            "gateway_generation_tokens",
            "Tokens the engine generated, all choices.",
            tag_keys=MODEL_KEY,
        )


@functools.cache
def ingress_metrics() -> IngressMetrics:
    """This process's ingress metrics (created on first use, inside the replica)."""
    return IngressMetrics()


@functools.cache
def model_server_metrics() -> ModelServerMetrics:
    """This process's model-server metrics (created on first use, inside the replica)."""
    return ModelServerMetrics()
