"""Where one model replica's engine workers run: placement bundles, strategy and executor.

One bundle per tensor-parallel x pipeline-parallel worker; the replica actor itself sits in
bundle 0. Tensor parallelism needs fast links, so a single-stage group is STRICT_PACK (one node);
pipeline stages may span nodes (PACK).

- GPU: `{GPU: 1}` per worker (plus the accelerator-type resource), the `ray` executor, which
  starts the workers as Ray actors inside the replica's placement group (Ray Serve LLM's way).
- CPU: `{CPU: cpus_per_worker}` per worker and the `mp` executor (vLLM refuses `ray` on CPU); the
  workers are processes of the replica, each rank pinned to its own cores through
  VLLM_CPU_OMP_THREADS_BIND, without which vLLM refuses TP > 1 on a one-NUMA-node machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from apps.config import ParallelismSettings

# Ray's custom resource for a GPU type: a tiny amount steers placement without limiting it.
ACCELERATOR_TYPE_RESOURCE_AMOUNT = 0.001
VLLM_AUTO_BIND = "auto"


@dataclass(frozen=True)
class Placement:
    """What Serve and vLLM need to place one replica of a model."""

    bundles: list[dict[str, float]]
    strategy: Literal["STRICT_PACK", "PACK"]
    executor_backend: Literal["mp", "ray"]
    replica_num_cpus: float
    replica_num_gpus: float


def placement_for(parallelism: ParallelismSettings) -> Placement:
    """The placement group and executor of one replica, from the model's parallelism settings."""
    world_size = parallelism.world_size
    strategy: Literal["STRICT_PACK", "PACK"] = (
        "STRICT_PACK" if parallelism.pipeline_parallel_size == 1 else "PACK"
    )
    if parallelism.accelerator == "cpu":
        bundles = [{"CPU": parallelism.cpus_per_worker} for _ in range(world_size)]
        return Placement(bundles, strategy, "mp", parallelism.cpus_per_worker, 0)

    worker_bundle: dict[str, float] = {"GPU": 1}
    if parallelism.accelerator_type:
        worker_bundle[f"accelerator_type:{parallelism.accelerator_type}"] = (
            ACCELERATOR_TYPE_RESOURCE_AMOUNT
        )
    bundles = [dict(worker_bundle) for _ in range(world_size)]
    # The replica actor (the engine's front end) needs CPU but no GPU of its own: its
    # workers take the GPUs. It lives in bundle 0, so that bundle carries its CPU.
    bundles[0]["CPU"] = parallelism.cpus_per_worker
    return Placement(bundles, strategy, "ray", parallelism.cpus_per_worker, 0)


def omp_threads_bind(world_size: int, allowed_cpus: Sequence[int], configured: str | None) -> str:
    """The VLLM_CPU_OMP_THREADS_BIND value for a CPU engine: one core list per rank.

    A configured value wins. One rank uses vLLM's own automatic binding. More ranks split the
    cores this process may run on into equal, contiguous groups ("0|1" for two ranks, two cores).
    """
    if configured is not None:
        return configured
    if world_size == 1:
        return VLLM_AUTO_BIND
    cpus = sorted(allowed_cpus)
    if len(cpus) < world_size:
        raise ValueError(
            f"{world_size} CPU ranks need at least {world_size} cores; this replica may use "
            f"{len(cpus)} ({cpus}). Lower tensor/pipeline parallelism or set cpu_threads_bind."
        )
    per_rank = len(cpus) // world_size
    groups = [cpus[rank * per_rank : (rank + 1) * per_rank] for rank in range(world_size)]
    return "|".join(",".join(str(cpu) for cpu in group) for group in groups)


def unplaceable_reason(placement: Placement, nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why no node of the cluster can ever hold this STRICT_PACK group (None if one can).

    `nodes` are the total resources of each alive node. Only STRICT_PACK is judged: PACK may
    spread over nodes, and a cluster with an autoscaler may still add a bigger node, so callers
    warn rather than fail.
    """
    if placement.strategy != "STRICT_PACK":
        return None
    demand: dict[str, float] = {}
    for bundle in placement.bundles:
        for resource, amount in bundle.items():
            demand[resource] = demand.get(resource, 0.0) + amount
    for node in nodes:
        if all(node.get(resource, 0.0) >= amount for resource, amount in demand.items()):
            return None
    largest = {
        resource: max((node.get(resource, 0.0) for node in nodes), default=0.0)
        for resource in demand
    }
    return (
        f"needs {demand} on one node (STRICT_PACK, one bundle per worker), but the largest "
        f"node offers {largest}; the replica stays pending until such a node joins."
    )
