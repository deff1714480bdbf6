"""GPU placement on a real multi-node Ray cluster with logical GPUs (no CUDA needed): a model
replica's placement group lands all its tensor-parallel bundles on one node, and a replica that
no node can hold is reported, not left pending silently.

The deployments carry the real options derived from the schema (bundles, strategy, actor
resources); only the class is a probe instead of the vLLM model server, which needs real GPUs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from apps.builder import deployment_name, model_deployment_options, unplaceable_models
from apps.config import AppConfig
from tests.conftest import driver_handle

GPUS_PER_NODE = 4
# Serve reports slow scheduling in the deployment status after this many seconds (default 30).
SLOW_STARTUP_WARNING_S = "2"


def gpu_config(*tensor_parallel_sizes: int) -> AppConfig:
    models = [
        {
            "id": f"tp{tp}",
            "path": f"/models/tp{tp}",
            "parallelism": {"accelerator": "gpu", "tensor_parallel_size": tp, "cpus_per_worker": 1},
        }
        for tp in tensor_parallel_sizes
    ]
    return AppConfig.model_validate({"models": models}, context={"check_model_files": False})


class PlacementProbe:
    """Stands in for the model server: reports where Ray put it."""

    def placement_group_id(self) -> str:
        return ray.get_runtime_context().get_placement_group_id()

    def group_and_gpus(self) -> tuple[str, list[tuple[str, str]]]:
        """Both from one replica: two calls may reach two replicas."""
        return self.placement_group_id(), self.bundle_gpus()

    def bundle_gpus(self) -> list[tuple[str, str]]:
        """(node, GPU id) that a one-GPU task in each bundle of this replica's group is given,
        as vLLM's tensor-parallel workers are."""
        group = ray.util.get_current_placement_group()
        tasks = [
            _gpu_of_bundle.options(
                num_gpus=1,
                num_cpus=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            ).remote()
            for i in range(len(group.bundle_specs))
        ]
        return ray.get(tasks)


@ray.remote
def _gpu_of_bundle() -> tuple[str, str]:
    (gpu,) = ray.get_gpu_ids()
    return ray.get_runtime_context().get_node_id(), str(gpu)


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[Cluster]:
    """A CPU head and two worker nodes of 4 logical GPUs each."""
    previous = os.environ.get("RAY_SERVE_SLOW_STARTUP_WARNING_S")
    os.environ["RAY_SERVE_SLOW_STARTUP_WARNING_S"] = SLOW_STARTUP_WARNING_S
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=4, num_gpus=GPUS_PER_NODE)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 18100})
        yield cluster
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        if previous is None:
            os.environ.pop("RAY_SERVE_SLOW_STARTUP_WARNING_S", None)
        else:
            os.environ["RAY_SERVE_SLOW_STARTUP_WARNING_S"] = previous


def probe_app(config: AppConfig, model_id: str, num_replicas: int = 1) -> serve.Application:
    options = model_deployment_options(next(m for m in config.models if m.id == model_id))
    options.pop("autoscaling_config")  # a fixed count: the probe has no live sizing
    options["num_replicas"] = num_replicas
    # The probe is its own app's ingress, where HAProxy forbids a custom request router; the
    # router picks among replicas and has nothing to do with where they are placed.
    options.pop("request_router_config", None)
    return serve.deployment(PlacementProbe).options(**options).bind()


def test_tp4_replica_lands_all_bundles_on_one_gpu_node(gpu_cluster):
    config = gpu_config(4)
    handle = driver_handle(serve.run(probe_app(config, "tp4"), name="tp4", route_prefix=None))
    try:
        group_id = handle.placement_group_id.remote().result(timeout_s=60)
        group = ray.util.placement_group_table()[group_id]
    finally:
        serve.delete("tp4")
    assert group["strategy"] == "STRICT_PACK"
    assert [bundle.get("GPU") for bundle in group["bundles"].values()] == [1, 1, 1, 1]
    nodes = set(group["bundles_to_node_id"].values())
    assert len(nodes) == 1, f"TP 4 bundles spread over nodes {nodes}"
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
    assert nodes <= gpu_nodes
    assert unplaceable_models(config) == {}


def test_models_sharing_nodes_get_their_own_gpus(gpu_cluster):
    """TP 4, TP 2 and two TP 1 replicas fill the two 4-GPU nodes: every bundle holds a GPU no
    other replica holds, and at least one node serves more than one model."""
    config = gpu_config(4, 2, 1)
    handles = {}
    for model_id, replicas in (("tp4", 1), ("tp2", 1), ("tp1", 2)):
        app = probe_app(config, model_id, num_replicas=replicas)
        handles[model_id] = driver_handle(serve.run(app, name=model_id, route_prefix=None))
    try:
        held: dict[tuple[str, str], str] = {}
        models_per_node: dict[str, set[str]] = {}
        for model_id, handle in handles.items():
            replicas = 2 if model_id == "tp1" else 1
            seen_groups: set[str] = set()
            for _ in range(100):  # ask until every replica has answered
                if len(seen_groups) == replicas:
                    break
                group, gpus = handle.group_and_gpus.remote().result(timeout_s=60)
                if group in seen_groups:
                    continue
                seen_groups.add(group)
                for node_gpu in gpus:
                    assert node_gpu not in held, f"{model_id} shares GPU {node_gpu} with {held[node_gpu]}"
                    held[node_gpu] = model_id
                    models_per_node.setdefault(node_gpu[0], set()).add(model_id)
    finally:
        for model_id in handles:
            serve.delete(model_id)
    assert len(held) == 4 + 2 + 1 + 1, f"not every replica answered: {held}"
    assert any(len(models) > 1 for models in models_per_node.values()), models_per_node


def test_tp8_replica_is_reported_unplaceable_not_pending_silently(gpu_cluster):
    config = gpu_config(8)
    reasons = unplaceable_models(config)
    assert "'GPU': 8" in reasons["tp8"] and "'GPU': 4" in reasons["tp8"], reasons

    serve._run(probe_app(config, "tp8"), name="tp8", route_prefix=None, _blocking=False)
    try:
        message, status = wait_for_scheduling_message("tp8", deployment_name("tp8"))
    finally:
        serve.delete("tp8", _blocking=False)
    assert "to be scheduled" in message, f"no scheduling message, got: {message!r}"
    # Serve names the bundles the replica waits for: eight one-GPU bundles.
    assert message.count('{"GPU": 1.0') == 8, message
    assert status != "HEALTHY"


def wait_for_scheduling_message(app_name: str, deployment: str, timeout_s: float = 60) -> tuple[str, str]:
    """The deployment's status message once Serve says a replica waits to be scheduled."""
    deadline = time.monotonic() + timeout_s
    message, status = "", ""
    while time.monotonic() < deadline:
        application = serve.status().applications.get(app_name)
        details = application.deployments.get(deployment) if application else None
        if details is not None:
            message, status = details.message, details.status
            if "to be scheduled" in message:
                break
        time.sleep(1)
    return message, status
