"""vLLM engine arguments for one model, derived from its validated config and placement."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apps.config import ModelConfig
from apps.engine.placement import Placement
from apps.observability import tracing

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs


def engine_args(
    model: ModelConfig, placement: Placement, kv_events: dict[str, Any] | None = None
) -> AsyncEngineArgs:
    """The AsyncEngineArgs of `model`'s engine; served under the model's id, not its path.
    `kv_events`: vLLM's KVEventsConfig fields, when the engine publishes its KV-cache events."""
    from vllm.config import KVEventsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    engine = model.engine
    speculative = None
    if engine.speculative is not None:
        speculative = engine.speculative.model_dump(exclude_none=True)
    # An embedding model or a cross-encoder: vLLM's pooling runner. Its `convert: auto` keeps a
    # native architecture as it is (a sequence classifier scores) and turns a causal checkpoint
    # into an embedding model.
    pooling = {"runner": "pooling", "convert": "auto"} if model.task != "generate" else {}
    lora = {}
    if model.lora is not None:  # its adapters are loaded at runtime (`apps.engine.model_server`)
        lora = {
            "enable_lora": True,
            "max_loras": model.lora.max_loras,
            "max_lora_rank": model.lora.max_lora_rank,
            "max_cpu_loras": model.lora.max_cpu_loras,
        }
    return AsyncEngineArgs(
        model=model.path,
        served_model_name=[model.id],
        **pooling,
        **lora,
        tensor_parallel_size=model.parallelism.tensor_parallel_size,
        pipeline_parallel_size=model.parallelism.pipeline_parallel_size,
        distributed_executor_backend=placement.executor_backend,
        max_model_len=engine.max_model_len,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        enable_prefix_caching=engine.enable_prefix_caching,
        num_gpu_blocks_override=engine.kv_cache_blocks,
        kv_events_config=KVEventsConfig(**kv_events) if kv_events is not None else None,
        stream_interval=engine.stream_interval,
        dtype=engine.dtype,
        enforce_eager=engine.enforce_eager,
        quantization=engine.quantization,
        speculative_config=speculative,
        # The ingress orders the engine's own queue (`apps.admission.gate`: class, then the key's
        # backlog at the engines); under KV pressure vLLM preempts the worst-ranked request.
        scheduling_policy="priority",
        # Keep the engine's stats on: vLLM's Prometheus metrics (queue length, KV use, prefix
        # hits) are built from them. Exporting them from the replica is the metrics issue's job.
        disable_log_stats=False,
        # With tracing on (`apps.observability.tracing`), the engine's own request spans join each trace.
        otlp_traces_endpoint=tracing.traces_endpoint(),
    )


def engine_env_vars(model: ModelConfig) -> dict[str, str]:
    """Environment the replica process needs before vLLM is imported (CPU backend knobs)."""
    env: dict[str, str] = {}
    if model.parallelism.accelerator == "cpu" and model.engine.cpu_kvcache_space_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(model.engine.cpu_kvcache_space_gib)
    return env
