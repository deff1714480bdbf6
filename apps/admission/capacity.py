"""How many requests an engine's KV cache holds, read from the engine once it has started.

vLLM sizes its KV cache as it starts (from `gpu_memory_utilization` and what the weights left on a
GPU, `VLLM_CPU_KVCACHE_SPACE` on CPU, the KV cache's dtype), so how many sequences of a typical
length fit is known only then: an fp8 KV cache doubles it, a quantized model leaves a GPU more
memory for it, a bigger context window does not change it. Each model replica publishes its
engine's capacity to Ray's internal KV store when it has started (one key per model: replicas of
one model have the same engine arguments and, on like hardware, the same capacity); the ingress
reads it and sizes the model's admission bound from it when the model's
`admission.typical_request_tokens` is set (`apps.admission.gate.replica_concurrency`), and the
autoscaling policy its target (`apps.engine.replica_policy`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

CAPACITY_NAMESPACE = "llm-gateway"


@dataclass(frozen=True)
class EngineCapacity:
    kv_cache_tokens: int  # KV blocks x block size
    max_num_seqs: int  # the engine's batch bound

    def sequences(self, typical_tokens: int) -> int:
        """Sequences of `typical_tokens` (prompt + output) that run at once: as many as the KV
        cache holds, at most the batch bound, at least one."""
        return max(1, min(self.max_num_seqs, self.kv_cache_tokens // typical_tokens))


def capacity_key(model_id: str) -> bytes:
    return f"engine-capacity/{model_id}".encode()


def publish_capacity(model_id: str, capacity: EngineCapacity) -> None:
    """Make `capacity` what the ingress reads for `model_id` (a replica, once its engine started)."""
    from ray.experimental.internal_kv import _internal_kv_put

    value = {"kv_cache_tokens": capacity.kv_cache_tokens, "max_num_seqs": capacity.max_num_seqs}
    value["published_at"] = time.time()
    _internal_kv_put(
        capacity_key(model_id), json.dumps(value).encode(), overwrite=True, namespace=CAPACITY_NAMESPACE
    )


def read_capacity(model_id: str) -> EngineCapacity | None:
    """What a replica of `model_id` last published; None before any has started. Blocks on the
    GCS: call it off the event loop."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(capacity_key(model_id), namespace=CAPACITY_NAMESPACE)
    if not raw:
        return None
    value = json.loads(raw)
    return EngineCapacity(int(value["kv_cache_tokens"]), int(value["max_num_seqs"]))
