"""Placement contract: one bundle per TP x PP worker, STRICT_PACK for single-stage groups, GPU
bundles with the ray executor, CPU bundles with the mp executor and per-rank core binding; the
deployment options derived from the schema, rolling updates included (start the replacement
first, drain past the longest request, room for the extra replica)."""

from __future__ import annotations

from typing import Any

import pytest

from apps.builder import deployment_name, model_deployment_options, models_without_surge_room
from apps.config import AppConfig, ConfigError, ModelConfig, ParallelismSettings, load_config
from apps.engine.placement import omp_threads_bind, placement_for, unplaceable_reason
from apps.engine.replica_policy import REPLICA_CEILING


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_gpu_tensor_parallel_gets_one_gpu_bundle_per_rank_on_one_node(tp):
    placement = placement_for(
        ParallelismSettings(accelerator="gpu", tensor_parallel_size=tp, cpus_per_worker=2)
    )
    assert len(placement.bundles) == tp
    assert all(bundle["GPU"] == 1 for bundle in placement.bundles)
    assert placement.bundles[0]["CPU"] == 2, "the replica actor's CPU lives in bundle 0"
    assert all("CPU" not in bundle for bundle in placement.bundles[1:])
    assert placement.strategy == "STRICT_PACK"
    assert placement.executor_backend == "ray"
    assert (placement.replica_num_cpus, placement.replica_num_gpus) == (2, 0)


def test_gpu_pipeline_parallel_may_span_nodes():
    placement = placement_for(
        ParallelismSettings(accelerator="gpu", tensor_parallel_size=4, pipeline_parallel_size=2)
    )
    assert len(placement.bundles) == 8
    assert placement.strategy == "PACK"


def test_gpu_accelerator_type_is_requested_in_every_bundle():
    placement = placement_for(
        ParallelismSettings(accelerator="gpu", accelerator_type="A100-80G", tensor_parallel_size=2)
    )
    assert all(bundle["accelerator_type:A100-80G"] == 0.001 for bundle in placement.bundles)


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2)])
def test_cpu_workers_get_cpu_bundles_and_the_mp_executor(tp, pp):
    placement = placement_for(
        ParallelismSettings(tensor_parallel_size=tp, pipeline_parallel_size=pp, cpus_per_worker=0.5)
    )
    assert placement.bundles == [{"CPU": 0.5}] * (tp * pp)
    assert placement.executor_backend == "mp"
    assert placement.strategy == ("STRICT_PACK" if pp == 1 else "PACK")
    assert (placement.replica_num_cpus, placement.replica_num_gpus) == (0.5, 0)


def test_cpu_ranks_split_allowed_cores_evenly():
    assert omp_threads_bind(2, [0, 1], None) == "0|1"
    assert omp_threads_bind(2, [3, 2, 1, 0], None) == "0,1|2,3"
    assert omp_threads_bind(4, list(range(8)), None) == "0,1|2,3|4,5|6,7"


def test_cpu_single_rank_uses_vllm_auto_binding_and_config_wins():
    assert omp_threads_bind(1, [0, 1], None) == "auto"
    assert omp_threads_bind(2, [0, 1], "0-3|4-7") == "0-3|4-7"


def test_cpu_ranks_need_a_core_each():
    with pytest.raises(ValueError, match="2 CPU ranks need at least 2 cores"):
        omp_threads_bind(2, [0], None)


def test_strict_pack_group_larger_than_any_node_is_explained():
    nodes = [{"CPU": 8, "GPU": 4}, {"CPU": 8, "GPU": 4}]
    tp8 = placement_for(ParallelismSettings(accelerator="gpu", tensor_parallel_size=8))
    tp4 = placement_for(ParallelismSettings(accelerator="gpu", tensor_parallel_size=4))
    reason = unplaceable_reason(tp8, nodes)
    assert reason is not None and "'GPU': 8" in reason and "'GPU': 4" in reason, reason
    assert unplaceable_reason(tp4, nodes) is None


def sizing_of(options: dict[str, Any]) -> dict[str, float]:
    """The replica sizing a model deployment's autoscaling policy starts from."""
    return options["autoscaling_config"]["policy"]["policy_kwargs"]["sizing"]


def test_deployment_options_derive_from_batch_capacity():
    model = ModelConfig.model_validate(
        {"id": "org/model:v1", "path": "/x", "engine": {"max_num_seqs": 64}},
        context={"check_model_files": False},
    )
    options = model_deployment_options(model)
    assert options["name"] == deployment_name("org/model:v1") == "model-org_model_v1"
    assert options["max_ongoing_requests"] == 80
    assert options["max_queued_requests"] == 160, "a bounded queue: Serve answers 503 beyond it"
    assert options["autoscaling_config"]["initial_replicas"] == 1, "no deployment yet: the minimum"
    assert sizing_of(options) == {
        "min_replicas": 1,
        "max_replicas": 1,
        "target_ongoing_requests": 48.0,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
    }, "a fixed count: the live sizing policy keeps min = max"
    assert options["placement_group_bundles"] == [{"CPU": 1.0}]
    assert options["placement_group_strategy"] == "STRICT_PACK"


def test_deployment_options_autoscaling_and_kv_cache_env():
    model = ModelConfig.model_validate(
        {
            "id": "m",
            "path": "/x",
            "engine": {"max_num_seqs": 32, "cpu_kvcache_space_gib": 2},
            "replicas": {"autoscaling": {"min_replicas": 0, "max_replicas": 3}, "max_ongoing_requests": 40},
        },
        context={"check_model_files": False},
    )
    options = model_deployment_options(model)
    assert "num_replicas" not in options
    assert sizing_of(options) == {
        "min_replicas": 0,
        "max_replicas": 3,
        "target_ongoing_requests": 24.0,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
    }
    scaling = options["autoscaling_config"]
    assert scaling["look_back_period_s"] == 30.0
    assert options["max_ongoing_requests"] == 40
    assert options["ray_actor_options"]["runtime_env"]["env_vars"] == {"VLLM_CPU_KVCACHE_SPACE": "2"}


def test_engine_args_follow_the_config_and_the_placement():
    from apps.engine.engine_args import engine_args

    model = ModelConfig.model_validate(
        {
            "id": "m",
            "path": "/x",
            "engine": {"max_num_seqs": 32, "stream_interval": 4, "enforce_eager": True},
            "parallelism": {"tensor_parallel_size": 2},
        },
        context={"check_model_files": False},
    )
    args = engine_args(model, placement_for(model.parallelism))
    assert args.served_model_name == ["m"], "clients see the id, not the path"
    assert (args.tensor_parallel_size, args.distributed_executor_backend) == (2, "mp")
    assert (args.max_num_seqs, args.stream_interval, args.enforce_eager) == (32, 4, True)
    assert args.enable_prefix_caching is True and args.disable_log_stats is False


def test_autoscaling_defaults_come_from_the_engine_batch_and_serve_accepts_them(make_checkpoint):
    from ray.serve.config import AutoscalingConfig

    model = ModelConfig(
        id="m",
        path=make_checkpoint(),
        engine={"max_num_seqs": 64},
        replicas={"autoscaling": {"min_replicas": 0, "max_replicas": 4}},
    )
    options = model_deployment_options(model)
    assert options["max_ongoing_requests"] == 80, "1.25 x max_num_seqs keeps the next batch ready"
    scaling = AutoscalingConfig(**options["autoscaling_config"])  # Serve's own validation
    # Serve's bounds are never reached and its delays are 0: the policy applies the live sizing.
    assert (scaling.min_replicas, scaling.max_replicas) == (0, REPLICA_CEILING)
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s, scaling.look_back_period_s) == (0, 0, 30)
    assert scaling.policy.policy_function == "apps.engine.replica_policy:LiveSizingPolicy"
    sizing = sizing_of(options)
    assert (sizing["min_replicas"], sizing["max_replicas"]) == (0, 4)
    assert sizing["target_ongoing_requests"] == 48, "0.75 x max_num_seqs: scale before the batch is full"
    assert (sizing["upscale_delay_s"], sizing["downscale_delay_s"]) == (30, 600)


def test_the_sizing_asks_the_policy_to_follow_the_kv_capacity_only_when_nothing_explicit_says_otherwise(
    make_checkpoint,
):
    path = make_checkpoint()
    typical = {"typical_request_tokens": 1000}
    asked = ModelConfig(id="m", path=path, admission=typical, replicas={"autoscaling": {"max_replicas": 4}})
    assert sizing_of(model_deployment_options(asked))["typical_request_tokens"] == 1000
    for replicas in (
        {"autoscaling": {"max_replicas": 4, "target_ongoing_requests": 8}},
        {"max_ongoing_requests": 10},
    ):
        explicit = ModelConfig(id="m", path=path, admission=typical, replicas=replicas)
        assert "typical_request_tokens" not in sizing_of(model_deployment_options(explicit)), replicas
    assert "typical_request_tokens" not in sizing_of(model_deployment_options(ModelConfig(id="m", path=path)))


def test_every_autoscaling_knob_can_be_overridden(make_checkpoint):
    knobs = {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2.5,
        "upscale_delay_s": 1,
        "downscale_delay_s": 5,
        "look_back_period_s": 11,
    }
    model = ModelConfig(id="m", path=make_checkpoint(), replicas={"autoscaling": knobs, "max_ongoing_requests": 4})
    options = model_deployment_options(model)
    look_back_s = knobs.pop("look_back_period_s")
    assert sizing_of(options) == knobs
    assert options["autoscaling_config"]["look_back_period_s"] == look_back_s
    assert options["max_ongoing_requests"] == 4


def test_rolling_updates_start_the_replacement_first_and_drain_for_the_configured_time():
    model = ModelConfig.model_validate(
        {"id": "m", "path": "/x", "replicas": {"drain_timeout_s": 130}},
        context={"check_model_files": False},
    )
    options = model_deployment_options(model)
    assert options["max_surge_percent"] == 100, "a replacement starts before an old replica stops"
    assert options["graceful_shutdown_timeout_s"] == 130


def test_a_drain_shorter_than_the_request_timeout_is_refused():
    model = {"id": "m", "path": "/x", "admission": {"request_timeout_s": 900}}
    with pytest.raises(ConfigError, match=r"replicas.drain_timeout_s \(610.0\) is below admission.request_timeout_s"):
        load_config({"models": [model]}, check_model_files=False)
    model["replicas"] = {"drain_timeout_s": 910}
    with pytest.raises(ConfigError, match=r"ingress.drain_timeout_s \(610.0\) is below model m's"):
        load_config({"models": [model]}, check_model_files=False)
    load_config({"models": [model], "ingress": {"drain_timeout_s": 910}}, check_model_files=False)


def test_a_model_may_stop_first():
    model = ModelConfig.model_validate(
        {"id": "m", "path": "/x", "replicas": {"max_surge_percent": 0}},
        context={"check_model_files": False},
    )
    assert model_deployment_options(model)["max_surge_percent"] == 0


def surge_config(*models: dict) -> AppConfig:
    return AppConfig.model_validate({"models": list(models)}, context={"check_model_files": False})


def test_surge_room_counts_the_steady_replicas_of_every_model_and_the_ingress():
    small = {"id": "small", "path": "/x", "parallelism": {"cpus_per_worker": 0.25}}
    tp2 = {"id": "tp2", "path": "/x", "parallelism": {"cpus_per_worker": 0.25, "tensor_parallel_size": 2}}
    config = surge_config(small, tp2)  # steady: 0.25 + 0.5 + 0.1 (ingress) = 0.85 CPUs
    assert models_without_surge_room(config, {"CPU": 2}) == [], "the embedded default's shape fits"
    assert models_without_surge_room(config, {"CPU": 1.2}) == ["tp2"], "0.85 + 0.5 > 1.2"
    assert models_without_surge_room(config, {"CPU": 1.0}) == ["small", "tp2"]


def test_surge_room_is_not_needed_by_a_model_that_stops_first():
    stop_first = {"id": "m", "path": "/x", "parallelism": {"cpus_per_worker": 1}, "replicas": {"max_surge_percent": 0}}
    assert models_without_surge_room(surge_config(stop_first), {"CPU": 1.1}) == []


def test_the_embedded_default_has_room_for_either_models_surge_on_two_cpus():
    from tests.conftest import app_args

    config = AppConfig.model_validate(app_args("app.yaml"), context={"check_model_files": False})
    assert models_without_surge_room(config, {"CPU": 2.0}) == []
