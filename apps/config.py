"""The application's configuration: one pydantic schema, `AppConfig`, for the whole gateway.

A Serve config file splits it over several applications, so that an edit restarts only what it
must (`apps.applications`): the gateway (`ingress` replica options), the live settings (`auth`,
the ingress's request settings, and per model `limits`, `admission`, `system_prompts`: applied
to the running gateway within seconds, nothing restarts; also `routing`) and one application per model (`id`,
`path`, `engine`, `parallelism`, `replicas`, `warmup`: an edit rolls that model's replicas). Each
field's description says "Live." where an edit applies without a restart.

Everything else (placement bundles, engine arguments, deployment options, request limits) is
derived from a validated `AppConfig` in `apps.builder` and `apps.engine.placement`; nothing re-reads the
YAML. An invalid config fails here, before Ray starts anything, with one message per problem that
names the field path.

Validation reads only the files it names (each model's `config.json`). Pass the validation
context `{"check_model_files": False}` to validate a config for another machine (the GPU config
in CI), which skips the path and attention-head checks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from apps.engine.replica_policy import REPLICA_CEILING

logger = logging.getLogger("ray.serve")
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_TOKENS_CAP = 512
# Inputs per embeddings/score/rerank request (OpenAI allows 2048 per embeddings request; a replica
# embeds them in one engine batch, so a smaller bound keeps one request from filling it).
DEFAULT_MAX_INPUTS = 256
# What a model's engine does (`ModelConfig.task`), and the endpoints it serves (`apps.endpoints`).
ModelTask = Literal["generate", "embed", "score"]
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
DEFAULT_MAX_NUM_SEQS = 64
# Stream messages a model replica sends per engine step before tokens start to travel in groups.
DEFAULT_STREAM_MESSAGES_PER_STEP = 8
# A request counts as ongoing at the ingress while its body is still arriving. With more slots
# than HAProxy holds connections (RAY_SERVE_HAPROXY_MAXCONN, 4096), stalled senders can never
# take them all; what reaches the engines is bounded by each model's admission gate instead.
DEFAULT_INGRESS_MAX_ONGOING_REQUESTS = 8192
DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
# A rolling update starts every new replica before it stops an old one (where the cluster has room).
DEFAULT_MAX_SURGE_PERCENT = 100
DEFAULT_REQUEST_TIMEOUT_S = 600.0
# A stopping replica finishes the requests it holds: the default request timeout and a margin.
DEFAULT_DRAIN_TIMEOUT_S = DEFAULT_REQUEST_TIMEOUT_S + 10.0
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SYSTEM_PROMPT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Priority classes, best first: a freed slot goes to the best class waiting.
Priority = Literal["high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")
# ngram looks up the prompt and mtp uses the target's own heads; the others need a draft model.
SPECULATIVE_METHODS_WITH_DRAFT = ("draft_model", "eagle", "eagle3")


class StrictModel(BaseModel):
    """Unknown fields are errors: a misspelt knob must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SpeculativeSettings(StrictModel):
    """vLLM speculative decoding; see vLLM's `SpeculativeConfig` for the methods."""

    method: Literal["ngram", "draft_model", "eagle", "eagle3", "mtp"] = Field(
        description="Proposer: `ngram` (prompt lookup), `mtp` (the model's own heads) or a draft/EAGLE model."
    )
    num_speculative_tokens: int = Field(ge=1, le=16, description="Tokens proposed per step.")
    model: str | None = Field(
        default=None, description="Draft or EAGLE model path; required unless method is ngram."
    )
    prompt_lookup_max: int | None = Field(
        default=None, ge=1, description="ngram: longest n-gram to match in the prompt."
    )
    prompt_lookup_min: int | None = Field(
        default=None, ge=1, description="ngram: shortest n-gram to match in the prompt."
    )

    @model_validator(mode="after")
    def _draft_model_given(self) -> SpeculativeSettings:
        needs_model = self.method in SPECULATIVE_METHODS_WITH_DRAFT
        if needs_model and self.model is None:
            raise ValueError(f"method {self.method!r} needs `model`: set the draft model's path.")
        if not needs_model and self.model is not None:
            raise ValueError(f"method {self.method!r} uses no separate model: remove `model`.")
        return self


class EngineSettings(StrictModel):
    """The vLLM engine arguments this platform exposes (a deliberate subset, all typed)."""

    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length; None takes the model's own."
    )
    max_num_seqs: int = Field(
        default=DEFAULT_MAX_NUM_SEQS,
        ge=1,
        le=4096,
        description="Most sequences the engine batches at once: the replica's batch capacity.",
    )
    max_num_batched_tokens: int | None = Field(
        default=None, ge=16, description="Token budget of one scheduler step; None: vLLM's default."
    )
    gpu_memory_utilization: float = Field(
        default=DEFAULT_GPU_MEMORY_UTILIZATION,
        gt=0.0,
        le=1.0,
        description="Share of each GPU's memory vLLM may use (weights + KV cache). GPU only.",
    )
    cpu_kvcache_space_gib: int | None = Field(
        default=None,
        ge=1,
        description="KV-cache size in GiB on the CPU backend (VLLM_CPU_KVCACHE_SPACE). CPU only.",
    )
    stream_interval: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Tokens per streamed chunk after the first (which is sent at once). Above 1 the "
            "engine, the model server and every hop handle that many times fewer messages, at the "
            "cost of tokens arriving in small groups. See docs/BENCHMARKS.md."
        ),
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV blocks of shared prefixes.")
    kv_cache_events: bool = Field(
        default=False,
        description="Publish the engine's KV-cache events (blocks cached and evicted, over ZMQ on a "
        "free port of the replica's node) for the `precise_prefix` routing policy.",
    )
    kv_cache_blocks: int | None = Field(
        default=None,
        ge=1,
        description="Cap the engine's KV cache at this many blocks (vLLM's num_gpu_blocks_override; "
        "the CPU backend's blocks hold 128 tokens): a small cache for tests and benchmarks that "
        "need eviction. None: sized from memory.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weight and activation dtype."
    )
    enforce_eager: bool = Field(
        default=False, description="Skip graph capture / torch.compile: faster start, slower steps."
    )
    quantization: str | None = Field(
        default=None, description="Quantization method known to vLLM (awq, gptq, fp8, ...)."
    )
    speculative: SpeculativeSettings | None = Field(
        default=None, description="Speculative decoding; None disables it."
    )


class ParallelismSettings(StrictModel):
    """How one replica's engine is split over devices; derived placement is in `apps.engine.placement`."""

    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="TP ranks (one node).")
    pipeline_parallel_size: int = Field(default=1, ge=1, le=64, description="PP stages.")
    accelerator: Literal["cpu", "gpu"] = Field(
        default="cpu", description="Device each worker gets: a GPU, or CPU cores."
    )
    accelerator_type: str | None = Field(
        default=None,
        description="GPU type Ray schedules on (e.g. A100-80G, L4, H100); GPU only.",
    )
    cpus_per_worker: float = Field(
        default=1.0,
        gt=0.0,
        description="Logical Ray CPUs reserved per worker bundle (fractions allowed).",
    )
    cpu_threads_bind: str | None = Field(
        default=None,
        description=(
            "CPU only: core ids per rank for VLLM_CPU_OMP_THREADS_BIND, e.g. '0|1'. None splits "
            "the replica's allowed cores evenly across ranks (vLLM's own 'auto' for one rank)."
        ),
    )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @model_validator(mode="after")
    def _accelerator_fields_match(self) -> ParallelismSettings:
        if self.accelerator == "cpu" and self.accelerator_type is not None:
            raise ValueError("accelerator_type is for GPUs: remove it or set accelerator: gpu.")
        if self.accelerator == "gpu" and self.cpu_threads_bind is not None:
            raise ValueError("cpu_threads_bind is for the CPU backend: remove it on GPU models.")
        if self.cpu_threads_bind is not None and len(self.cpu_threads_bind.split("|")) != self.world_size:
            raise ValueError(
                f"cpu_threads_bind needs one core list per rank ({self.world_size}), "
                f"separated by '|'. Given: {self.cpu_threads_bind!r}"
            )
        return self


class AutoscalingSettings(StrictModel):
    """Ray Serve autoscaling on ongoing requests per replica. The delays are long by default
    because a replica is expensive to start (an engine loads its weights for tens of seconds to
    minutes): a short burst should not start one, a short lull should not stop one."""

    min_replicas: int = Field(
        default=1, ge=0, description="Fewest replicas; 0 scales to zero (the first request waits "
        "for a replica to start)."
    )
    max_replicas: int = Field(default=1, ge=1, le=REPLICA_CEILING, description="Most replicas.")
    target_ongoing_requests: float | None = Field(
        default=None,
        gt=0,
        description="Ongoing requests per replica to aim for; None: 0.75 x engine.max_num_seqs, "
        "so a new replica starts before the engine's batch is full.",
    )
    upscale_delay_s: float = Field(
        default=30.0, ge=0, description="How long demand must stay above target before scaling up."
    )
    downscale_delay_s: float = Field(
        default=600.0, ge=0, description="How long demand must stay below target before scaling down."
    )
    look_back_period_s: float = Field(
        default=30.0,
        gt=10,
        description="Window over which ongoing requests are averaged; longer than Serve's 10 s "
        "metrics interval (Serve warns otherwise, and will refuse it). Not live: Serve reads it "
        "when the model's application is built, so it applies from the model's next roll.",
    )

    @model_validator(mode="after")
    def _bounds_ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})."
            )
        return self


class RoutingSettings(StrictModel):
    """How the ingress picks one of the model's replicas for a request (`apps.routing.router`)."""

    policy: Literal["prefix_affinity", "precise_prefix", "power_of_two"] = Field(
        default="prefix_affinity",
        description="prefix_affinity: prompts that start alike go to the same replica (its prefix "
        "cache holds them) unless it is much busier; precise_prefix: the replica whose engine "
        "holds the longest prefix of the prompt's tokens, from the engines' KV-cache events (the "
        "model's `engine.kv_cache_events`), else as prefix_affinity; power_of_two: Serve's "
        "default, the less loaded of two random replicas.",
    )
    prefix_chars: int = Field(
        default=512,
        ge=16,
        description="Leading prompt characters that must be identical to share a replica "
        "(about 128 tokens: shorter shared starts save little prefill).",
    )
    max_imbalance: float = Field(
        default=0.25,
        ge=0,
        description="The preferred replica is passed over when it has this share of "
        "max_ongoing_requests more requests than the least loaded one.",
    )


class ReplicaSettings(StrictModel):
    """How many copies of the model's engine run, and how much each may take on."""

    num_replicas: int = Field(
        default=1, ge=1, le=REPLICA_CEILING, description="Live. Fixed replica count (no autoscaling)."
    )
    autoscaling: AutoscalingSettings | None = Field(
        default=None,
        description="Live (but look_back_period_s). Autoscaling instead of a fixed count.",
    )
    max_ongoing_requests: int | None = Field(
        default=None,
        ge=1,
        description="Requests Serve sends one replica at once; None: derived from max_num_seqs.",
    )
    max_queued_requests: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Requests each ingress replica may queue for this model while every replica is full "
            "or none is running; more get 503. None: twice max_ongoing_requests."
        ),
    )
    max_surge_percent: int = Field(
        default=DEFAULT_MAX_SURGE_PERCENT,
        ge=0,
        le=100,
        description=(
            "Extra replicas (share of the replica count) a rolling update may start before it "
            "stops old ones: 100 starts every replacement first and stops an old replica only "
            "once its replacement is warm, so capacity never drops (the cluster needs room for "
            "them; where it has none, the new replica stays pending and the old keeps serving). "
            "0 stops first: the model has less capacity for a whole engine start."
        ),
    )
    drain_timeout_s: float = Field(
        default=DEFAULT_DRAIN_TIMEOUT_S,
        gt=0,
        description=(
            "How long a stopping replica (rolling update, scale-down, shutdown) keeps serving the "
            "requests it holds before it is killed; takes no new ones meanwhile. At least the "
            "model's admission.request_timeout_s, or an update cuts the longest streams."
        ),
    )
    stream_messages_per_step: int | None = Field(
        default=DEFAULT_STREAM_MESSAGES_PER_STEP,
        ge=1,
        description=(
            "Under load, about how many stream messages a replica sends per engine step. With more "
            "streams open than this, tokens after a stream's first travel in groups of "
            "ceil(streams / this), one token per engine step, so the gateway's per-message work "
            "does not starve the engine. None: every token is its own message. See "
            "docs/BENCHMARKS.md."
        ),
    )

    @property
    def max_replicas(self) -> int:
        """The most replicas the model may run: its fixed count, or its autoscaling bound."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas

    @model_validator(mode="after")
    def _one_way_to_size(self) -> ReplicaSettings:
        if self.autoscaling is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("Set either num_replicas or autoscaling, not both.")
        return self


class RequestLimits(StrictModel):
    """Per-model request shaping applied at the ingress."""

    default_max_tokens: int = Field(
        default=DEFAULT_MAX_TOKENS, ge=1, description="max_tokens given to requests without one."
    )
    max_tokens_cap: int = Field(
        default=DEFAULT_MAX_TOKENS_CAP,
        ge=1,
        description="Largest max_tokens a request may ask for; more is rejected with 400.",
    )
    over_cap: Literal["reject", "clamp"] = Field(
        default="reject",
        description=(
            "A max_tokens above the cap: `reject` answers 400 naming the cap; `clamp` lowers it to "
            "the cap and says so in the `x-max-tokens-clamped` response header."
        ),
    )
    max_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Longest prompt in tokens; longer is rejected with 400. The model server checks the "
            "exact token count (after the chat template) before the engine sees the request."
        ),
    )
    max_n: int = Field(default=4, ge=1, le=128, description="Largest `n`: choices per request.")
    max_inputs: int = Field(
        default=DEFAULT_MAX_INPUTS,
        ge=1,
        description=(
            "Most inputs in one embeddings, score or rerank request (texts or token lists; a "
            "rerank's query and documents). `max_prompt_tokens` caps each input's tokens."
        ),
    )
    max_stop_sequences: int = Field(
        default=4, ge=0, le=64, description="Most `stop` strings per request (OpenAI allows 4)."
    )

    @model_validator(mode="after")
    def _default_within_cap(self) -> RequestLimits:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens_cap "
                f"({self.max_tokens_cap}): lower the default or raise the cap."
            )
        return self


class AdmissionSettings(StrictModel):
    """Backpressure at the ingress: how many requests reach the engines, how many may wait, how long.

    The bounds are for the whole application; each ingress replica enforces its even share.
    """

    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Requests of this model at its engines at once. None: max_ongoing_requests (or what "
            "the KV cache holds, `typical_request_tokens`) times the replica count (max_replicas "
            "when autoscaling), i.e. what the replicas can batch."
        ),
    )
    max_queued: int | None = Field(
        default=None,
        ge=0,
        description="Requests waiting at the ingress for a slot; more get 503. None: max_in_flight.",
    )
    typical_request_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Prompt + output tokens of a typical request. Set, each replica takes on as many "
            "requests as its engine's KV cache holds of this length (at most max_num_seqs), "
            "times 1.25, read from the engine once it has started (`apps.admission.capacity`): the "
            "admission bound follows the real KV capacity (an fp8 KV cache, more memory) unless "
            "max_in_flight or replicas.max_ongoing_requests is set, and the autoscaling target "
            "shrinks in proportion unless target_ongoing_requests or "
            "replicas.max_ongoing_requests is set. None: max_num_seqs alone."
        ),
    )
    queue_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest wait for a slot; then 503 `queue_timeout`."
    )
    shed_low_at: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Queue fill (share of max_queued) from which `low` priority arrivals get 503.",
    )
    shed_normal_at: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        description=(
            "Queue fill from which `normal` arrivals get 503. `high` waits while there is room, "
            "and takes the place of the newest lower-priority waiter when the queue is full."
        ),
    )
    fair_share: bool = Field(
        default=True,
        description=(
            "Within a priority class, a freed slot goes to the key served least (tokens / its "
            "`fair_share_weight`), at the ingress and in the engine's own queue; false: first "
            "come first served."
        ),
    )
    first_token_timeout_s: float | None = Field(
        default=60.0,
        gt=0,
        description="Streams: longest time to the first token (queue wait included); then 504.",
    )
    request_timeout_s: float | None = Field(
        default=DEFAULT_REQUEST_TIMEOUT_S,
        gt=0,
        description=(
            "Longest time for the whole request; then 504, or an error event ending a stream. "
            "The engine request is aborted either way."
        ),
    )

    @model_validator(mode="after")
    def _shedding_ordered(self) -> AdmissionSettings:
        if self.shed_low_at > self.shed_normal_at:
            raise ValueError(
                f"shed_low_at ({self.shed_low_at}) must be <= shed_normal_at "
                f"({self.shed_normal_at}): low priority is shed first."
            )
        return self


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class WarmupPrompt(StrictModel):
    """One hot prompt: chat messages (rendered with the model's template) or raw text."""

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> WarmupPrompt:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either `messages` or `prompt`.")
        return self


class WarmupSettings(StrictModel):
    """Requests each replica runs through its own engine before it reports ready, so Serve sends
    it no traffic while it is cold: the hot prompts land in the prefix cache, and the engine's
    first-request costs are paid here, not by a client."""

    enabled: bool = Field(
        default=True, description="False skips warm-up entirely (the built-in request too)."
    )
    prompts: list[WarmupPrompt] = Field(
        default_factory=list,
        description="Hot prompts: stable system prompts and templates clients will send.",
    )
    repeat: int = Field(default=3, ge=1, le=100, description="Times each prompt is run.")


class LoraAdapter(StrictModel):
    """A LoRA adapter of a model: clients send its name as `model`."""

    name: Annotated[str, Field(pattern=MODEL_ID_PATTERN)] = Field(
        description="The name clients send as `model` (unique among models and adapters)."
    )
    path: str = Field(description="Local PEFT adapter directory (relative paths: to the working dir).")

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, path: str, info: ValidationInfo) -> str:
        return _local_directory(path, info, "adapter_config.json", "LoRA adapter")


class LoraSettings(StrictModel):
    """Multi-LoRA: one engine serves its base model and adapters of it (vLLM loads an adapter
    at runtime, on its first request at a replica)."""

    adapters: list[LoraAdapter] = Field(
        default_factory=list,
        description="Live. The adapters served; adding or removing one restarts no engine.",
    )
    max_loras: int = Field(
        default=1, ge=1, le=64, description="Adapters in one engine batch (vLLM `max_loras`)."
    )
    max_lora_rank: int = Field(
        default=16, ge=1, le=512, description="Largest adapter rank the engine accepts (vLLM `max_lora_rank`)."
    )
    max_cpu_loras: int | None = Field(
        default=None,
        ge=1,
        description="Adapters a replica keeps loaded (vLLM `max_cpu_loras`; least recently used "
        "leave first). None: max_loras.",
    )

    @model_validator(mode="after")
    def _ranks_fit(self, info: ValidationInfo) -> LoraSettings:
        # Where the adapters' files are checked (a model's build), so is their rank: vLLM would
        # refuse a larger one at its first request.
        if not _checks_model_files(info):
            return self
        for adapter in self.adapters:
            rank = json.loads((Path(adapter.path) / "adapter_config.json").read_text()).get("r")
            if isinstance(rank, int) and rank > self.max_lora_rank:
                raise ValueError(
                    f"adapter {adapter.name} has rank {rank}, above max_lora_rank "
                    f"({self.max_lora_rank}): raise max_lora_rank."
                )
        return self


class ModelConfig(StrictModel):
    """One served model: one Serve deployment of vLLM engine replicas."""

    id: Annotated[str, Field(pattern=MODEL_ID_PATTERN)] = Field(
        description="The name clients send as `model`."
    )
    path: str = Field(description="Local checkpoint directory (relative paths: to the working dir).")
    task: ModelTask = Field(
        default="generate",
        description=(
            "What the engine does. `generate`: chat, completions, Responses, Messages. `embed`: "
            "embeddings, and score/rerank by their cosine similarity (a causal checkpoint is "
            "converted: vLLM's pooling runner). `score`: a cross-encoder (a sequence classifier "
            "with one label) serving score/rerank. All serve tokenize/detokenize. Shapes the "
            "engine: a change restarts the model's replicas."
        ),
    )
    engine: EngineSettings = Field(default_factory=EngineSettings, description="vLLM engine settings.")
    lora: LoraSettings | None = Field(
        default=None,
        description="LoRA adapters of this model. `adapters` is live; the rest shapes the engine "
        "(a change restarts the model's replicas), as does switching LoRA on or off.",
    )
    parallelism: ParallelismSettings = Field(
        default_factory=ParallelismSettings, description="Tensor/pipeline parallelism and devices."
    )
    replicas: ReplicaSettings = Field(
        default_factory=ReplicaSettings, description="Replica count or autoscaling."
    )
    routing: RoutingSettings = Field(
        default_factory=RoutingSettings, description="Live. How a request picks a replica."
    )
    limits: RequestLimits = Field(default_factory=RequestLimits, description="Live. Request shaping.")
    admission: AdmissionSettings = Field(
        default_factory=AdmissionSettings, description="Live. In-flight bound, wait queue, deadlines."
    )
    warmup: WarmupSettings = Field(
        default_factory=WarmupSettings, description="Hot prompts run before the replica is ready."
    )
    system_prompts: dict[
        Annotated[str, Field(pattern=SYSTEM_PROMPT_NAME_PATTERN)], Annotated[str, Field(min_length=1)]
    ] = Field(
        default_factory=dict,
        description="Live. Named system prompts: a chat request's `system_prompt: NAME` puts the "
        "text first, byte-identical in every request (so the prefix cache reuses it). A model's "
        "replicas warm up the prompts named when its application was last built; one added "
        "later warms on its first use.",
    )

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, path: str, info: ValidationInfo) -> str:
        hint = " For the embedded default run `python scripts/make_tiny_models.py`."
        return _local_directory(path, info, "config.json", "model checkpoint", hint)

    @property
    def lora_adapters(self) -> list[LoraAdapter]:
        return self.lora.adapters if self.lora is not None else []

    @model_validator(mode="after")
    def _lora_on_a_generative_model(self) -> ModelConfig:
        if self.lora is not None and self.task != "generate":
            raise ValueError(f"lora: LoRA adapters need a `generate` model; this one's task is `{self.task}`.")
        return self

    @model_validator(mode="after")
    def _parallelism_fits_model(self, info: ValidationInfo) -> ModelConfig:
        context = self.engine.max_model_len
        if context is not None:
            if self.limits.max_tokens_cap >= context:
                raise ValueError(
                    f"limits.max_tokens_cap ({self.limits.max_tokens_cap}) must be below "
                    f"engine.max_model_len ({context}) to leave room for a prompt."
                )
            prompt_cap = self.limits.max_prompt_tokens
            if prompt_cap is not None and prompt_cap + self.limits.max_tokens_cap > context:
                raise ValueError(
                    f"limits.max_prompt_tokens ({prompt_cap}) + limits.max_tokens_cap "
                    f"({self.limits.max_tokens_cap}) exceed engine.max_model_len ({context}): "
                    "a request within both limits would not fit the context; lower one of them."
                )
        if not _checks_model_files(info):
            return self
        heads = _attention_heads(Path(self.path))
        tp = self.parallelism.tensor_parallel_size
        if "num_attention_heads" in heads and heads["num_attention_heads"] % tp != 0:
            count = heads["num_attention_heads"]
            raise ValueError(
                f"parallelism.tensor_parallel_size {tp} does not divide the model's "
                f"num_attention_heads ({count}): choose a divisor of {count}."
            )
        # vLLM splits KV heads across ranks, or replicates them when there are fewer than ranks.
        kv = heads.get("num_key_value_heads")
        if kv is not None and kv % tp != 0 and tp % kv != 0:
            raise ValueError(
                f"parallelism.tensor_parallel_size {tp} and the model's num_key_value_heads "
                f"({kv}) must divide one another."
            )
        return self


class IngressSettings(StrictModel):
    """The OpenAI-compatible HTTP ingress deployment."""

    num_replicas: int = Field(default=1, ge=1, description="Ingress replicas.")
    num_cpus: float = Field(default=0.1, ge=0.0, description="Logical CPUs per ingress replica.")
    max_ongoing_requests: int = Field(
        default=DEFAULT_INGRESS_MAX_ONGOING_REQUESTS,
        ge=1,
        description=(
            "Requests one ingress replica holds at once, those still sending their body "
            "included: keep it above HAProxy's connection cap, so slow senders cannot take "
            "every slot (the engines' load is bounded by each model's admission)."
        ),
    )
    drain_timeout_s: float = Field(
        default=DEFAULT_DRAIN_TIMEOUT_S,
        gt=0,
        description=(
            "How long a stopping ingress replica keeps relaying the streams it holds: at least "
            "the longest admission.request_timeout_s of any model."
        ),
    )
    health_timeout_s: float = Field(
        default=2.0, gt=0, description="Live. How long GET /health waits for Serve's status."
    )
    max_body_bytes: int = Field(
        default=DEFAULT_MAX_BODY_BYTES, ge=1024, description="Live. Largest request body; more gets 413."
    )
    body_timeout_s: float = Field(
        default=DEFAULT_BODY_TIMEOUT_S,
        gt=0,
        description=(
            "Live. How long a request's body may take to arrive once its headers have; then 408 "
            "and the connection is closed. A body of max_body_bytes (2 MiB) needs about 200 KB/s "
            "to arrive in 10 s: raise it for large prompts over slow links. (Headers are "
            "HAProxy's: RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S in configs/ray-serve.env.)"
        ),
    )


class ApiKey(StrictModel):
    """One API key: only its SHA-256 is stored; its name is what logs and metrics show."""

    name: Annotated[str, Field(pattern=KEY_NAME_PATTERN)] = Field(
        description="Who holds the key; used in logs and metric labels, never the key itself."
    )
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="Hex SHA-256 of the key (`python -m apps.edge.auth new NAME` makes a key and its entry)."
    )
    models: list[str] | None = Field(
        default=None, description="Model ids this key may use; None: all of them."
    )
    requests_per_minute: int | None = Field(default=None, ge=1, description="None: unlimited.")
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Prompt + generated tokens per minute; None: unlimited.",
    )
    max_concurrent_requests: int | None = Field(default=None, ge=1, description="None: unlimited.")
    priority: Priority = Field(
        default="normal", description="Queue class: high is served first and shed last."
    )
    fair_share_weight: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description=(
            "This key's share of a busy model against the other keys of its priority class: a "
            "freed slot goes to the waiting key with the fewest tokens served divided by this "
            "weight (a key of weight 2 gets twice the tokens of a key of weight 1)."
        ),
    )

    @property
    def rate_limited(self) -> bool:
        """Whether the shared limiter must see this key's requests."""
        limits = (self.requests_per_minute, self.tokens_per_minute, self.max_concurrent_requests)
        return any(limit is not None for limit in limits)


class AuthSettings(StrictModel):
    """Live: keys are added, removed and changed on the running gateway; a key whose limits did
    not change keeps its rate-limit state. API keys are off by default so the embedded default runs without any; a gateway facing users
    turns it on."""

    enabled: bool = Field(default=False, description="Require `Authorization: Bearer KEY`.")
    keys: list[ApiKey] = Field(default_factory=list, description="The accepted keys.")
    keys_file: str | None = Field(
        default=None,
        description=(
            "A YAML file with a list of more keys (same fields), read whenever the settings are "
            "validated: by the builders and by every ingress replica (when the deployed args "
            "change, and when it starts), so it must be readable on every node that runs one. "
            "An edit of the file alone is not noticed: change the settings' args with it (rename "
            "the file, say), or replicas that restart will read it while the others do not."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _read_keys_file(cls, data: object) -> object:
        if not isinstance(data, dict) or not data.get("keys_file"):
            return data
        path = Path(str(data["keys_file"])).expanduser()
        try:
            entries = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read keys_file {path}: {exc}") from exc
        if not isinstance(entries, list):
            raise ValueError(f"keys_file {path} must hold a YAML list of keys.")
        return data | {"keys": list(data.get("keys") or []) + entries}

    @model_validator(mode="after")
    def _keys_usable(self) -> AuthSettings:
        if self.enabled and not self.keys:
            raise ValueError("auth is enabled but no keys are configured: add `keys` or `keys_file`.")
        for field in ("name", "sha256"):
            values = [getattr(key, field) for key in self.keys]
            duplicates = sorted({v for v in values if values.count(v) > 1})
            if duplicates:
                shown = duplicates if field == "name" else [d[:8] + "..." for d in duplicates]
                raise ValueError(f"Duplicate key {field}s {shown}: each key must be distinct.")
        return self


class AppConfig(StrictModel):
    """The whole gateway: the `args:` of all its applications in `configs/*.yaml`, put together
    (`apps.applications.compose_args`)."""

    models: list[ModelConfig] = Field(min_length=1, description="The models to serve.")
    ingress: IngressSettings = Field(default_factory=IngressSettings, description="HTTP ingress.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys and their limits.")

    @model_validator(mode="after")
    def _unique_ids(self) -> AppConfig:
        ids = [m.id for m in self.models] + [a.name for m in self.models for a in m.lora_adapters]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(
                f"Duplicate model ids {duplicates} (models and LoRA adapters): make each id unique."
            )
        return self

    @model_validator(mode="after")
    def _drains_outlast_requests(self) -> AppConfig:
        for model in self.models:
            timeout = model.admission.request_timeout_s
            if timeout is None:
                continue
            if model.replicas.drain_timeout_s < timeout:
                raise ValueError(
                    f"Model {model.id}: replicas.drain_timeout_s ({model.replicas.drain_timeout_s}) "
                    f"is below admission.request_timeout_s ({timeout}): a rolling update would cut "
                    "its longest requests."
                )
            if self.ingress.drain_timeout_s < timeout:
                raise ValueError(
                    f"ingress.drain_timeout_s ({self.ingress.drain_timeout_s}) is below model "
                    f"{model.id}'s admission.request_timeout_s ({timeout}): an ingress update would "
                    "cut its longest requests."
                )
        return self

    @model_validator(mode="after")
    def _key_models_served(self) -> AppConfig:
        # A warning, not an error: Serve deletes a model's application left out of the file even
        # when another application's build fails, so refusing the settings of a key that still
        # names a removed model would leave the gateway routing to it.
        served = {m.id for m in self.models} | {a.name for m in self.models for a in m.lora_adapters}
        for key in self.auth.keys:
            unknown = sorted(set(key.models or ()) - served)
            if unknown:
                logger.warning("Key %r names models that are not served: %s", key.name, unknown)
        return self


def _local_directory(path: str, info: ValidationInfo, marker: str, what: str, hint: str = "") -> str:
    """`path` made absolute, when the validation checks files (`check_model_files`): refused
    unless it holds `marker` (a `what`; `hint` says how to make it)."""
    if not _checks_model_files(info):
        return path
    resolved = Path(path).expanduser().resolve()
    if not (resolved / marker).is_file():
        raise ValueError(f"no {what} at {resolved} ({marker} missing).{hint}")
    return str(resolved)


class ConfigError(ValueError):
    """The application config is invalid; the message lists every problem with its field path."""


def load_config(args: dict, *, check_model_files: bool = True) -> AppConfig:
    """Validate a Serve config's `args`, raising one readable `ConfigError` for all problems."""
    try:
        return AppConfig.model_validate(args, context={"check_model_files": check_model_files})
    except ValidationError as exc:
        problems = [f"  {_field_path(err['loc'], args)}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("Invalid application config:\n" + "\n".join(problems)) from None


def _field_path(loc: tuple[int | str, ...], args: dict) -> str:
    """`models.0.limits` as `models[tiny-chat].limits`: a model's place in the whole config is
    not where its sections sit in the config file (`apps.applications`); its id is."""
    parts = [str(part) for part in loc]
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        models = args.get("models") if isinstance(args, dict) else None
        model = models[loc[1]] if isinstance(models, list) and loc[1] < len(models) else None
        if isinstance(model, dict) and isinstance(model.get("id"), str):
            parts[:2] = [f"models[{model['id']}]"]
    return ".".join(parts) or "(top level)"


def _checks_model_files(info: ValidationInfo) -> bool:
    return not (info.context or {}).get("check_model_files") is False


def _attention_heads(path: Path) -> dict[str, int]:
    """The head counts tensor parallelism must divide, from the checkpoint's config.json."""
    try:
        hf_config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path / 'config.json'}: {exc}") from exc
    # Multimodal checkpoints nest the language model's settings.
    if isinstance(hf_config, dict) and isinstance(hf_config.get("text_config"), dict):
        hf_config = hf_config["text_config"]
    if not isinstance(hf_config, dict):
        raise ValueError(f"{path / 'config.json'} is not a JSON object.")
    heads = {}
    for key in ("num_attention_heads", "num_key_value_heads"):
        if isinstance(hf_config.get(key), int):
            heads[key] = hf_config[key]
    return heads
