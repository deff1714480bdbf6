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

from apps.builder import deployment_name, model_deployment_options, unplaceable_models
from apps.config import AppConfig

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


def probe_app(config: AppConfig, model_id: str) -> serve.Application:
    options = model_deployment_options(next(m for m in config.models if m.id == model_id))
    return serve.deployment(PlacementProbe).options(**options).bind()


def test_tp4_replica_lands_all_bundles_on_one_gpu_node(gpu_cluster):
    config = gpu_config(4)
    handle = serve.run(probe_app(config, "tp4"), name="tp4", route_prefix=None)
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
