"""The cluster files run configs/gpu.yaml as it is, on AWS (`ray up cluster/cluster.yaml`) and on
Kubernetes (cluster/rayservice.yaml). Ray accepts both; every GPU model has a node type that holds
a replica (all its tensor-parallel GPUs on one node, with the accelerator type it asks for) up to
its largest replica count; every GPU node type is there for a model; no GPU work can land on the
head; every node exports metrics on 8080; the nodes get the project and the checkpoints at the
paths the config names; and the RayService serves exactly configs/gpu.yaml.

Nothing here contacts a cloud or a Kubernetes cluster: both files become node types the way Ray's
own autoscaler reads them (`prepare_config` for `ray up`, the KubeRay translation for the
RayService), and a replica's needs come from the project's own placement code.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from collections.abc import Iterable
from importlib.metadata import metadata, requires
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.util import prepare_config, validate_config

from apps.config import ModelConfig, load_config
from apps.engine.placement import placement_for, unplaceable_reason
from tests.conftest import CONFIGS, ROOT, app_args, ray_serve_env

CLUSTER = ROOT / "cluster"
METRICS_EXPORT_PORT = "8080"
DISTRIBUTION = "llm-gateway"

GPU_MODELS = [
    model
    for model in load_config(app_args("gpu.yaml"), check_model_files=False).models
    if model.parallelism.accelerator == "gpu"
]
BY_MODEL = pytest.mark.parametrize("model", GPU_MODELS, ids=[model.id for model in GPU_MODELS])


def serves(resources: dict[str, float], model: ModelConfig) -> bool:
    """Whether a node type is meant for the model: it has GPUs of the type the model asks for."""
    accelerator_type = model.parallelism.accelerator_type
    has_type = accelerator_type is None or f"accelerator_type:{accelerator_type}" in resources
    return resources.get("GPU", 0) > 0 and has_type


def replicas_per_node(model: ModelConfig, resources: dict[str, float]) -> int:
    """How many replicas of the model (its whole placement group) one such node holds."""
    demand: dict[str, float] = {}
    for bundle in placement_for(model.parallelism).bundles:
        for resource, amount in bundle.items():
            demand[resource] = demand.get(resource, 0.0) + amount
    # The epsilon absorbs float sums of the tiny accelerator-type amounts (4 x 0.001).
    return min(math.floor(resources.get(r, 0) / amount + 1e-9) for r, amount in demand.items())


def max_replicas(model: ModelConfig) -> int:
    autoscaling = model.replicas.autoscaling
    return autoscaling.max_replicas if autoscaling else model.replicas.num_replicas


def checkpoint_paths(model: ModelConfig) -> set[str]:
    """Every directory the model's engine loads: the model and its draft model, if any."""
    speculative = model.engine.speculative
    draft = {speculative.model} if speculative and speculative.model else set()
    return {model.path} | draft


def worker_types(autoscaler_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = autoscaler_config["head_node_type"]
    return {
        name: node_type
        for name, node_type in autoscaler_config["available_node_types"].items()
        if name != head
    }


def ray_start_options(commands: Iterable[str]) -> list[dict[str, str]]:
    """The options of each `ray start` in the commands (`--name=value` or `--name value`)."""
    starts = []
    for command in commands:
        tokens = shlex.split(command)
        for i, token in enumerate(tokens[:-1]):
            if Path(token).name == "ray" and tokens[i + 1] == "start":
                options: dict[str, str] = {}
                rest = tokens[i + 2 :]
                for j, option in enumerate(rest):
                    if option.startswith("--"):
                        name, has_value, value = option[2:].partition("=")
                        if not has_value and j + 1 < len(rest) and not rest[j + 1].startswith("-"):
                            value = rest[j + 1]
                        options[name] = value
                starts.append(options)
    return starts


def s3_syncs(commands: Iterable[str]) -> dict[str, list[str]]:
    """Each `aws s3 sync SRC DST ...` in the commands: its destination and its options."""
    syncs = {}
    for command in commands:
        tokens = shlex.split(command)
        for i in range(len(tokens) - 4):
            if tokens[i : i + 3] == ["aws", "s3", "sync"]:
                syncs[tokens[i + 4]] = tokens[i + 5 :]
    return syncs


def editable_installs(commands: Iterable[str]) -> set[tuple[str, str]]:
    """(directory, extra) of each `cd DIR && ... -e '.[EXTRA]'` in the commands."""
    installs = set()
    for command in commands:
        tokens = shlex.split(command)
        directories = [tokens[i + 1] for i, token in enumerate(tokens[:-1]) if token == "cd"]
        targets = [tokens[i + 1] for i, token in enumerate(tokens[:-1]) if token == "-e"]
        for target in targets:
            extra = re.fullmatch(r"\.\[([\w,-]+)\]", target)
            if extra and directories:
                installs.add((directories[-1], extra.group(1)))
    return installs


def has_option(options: list[str], name: str, value: str) -> bool:
    return any(options[i : i + 2] == [name, value] for i in range(len(options) - 1))


@pytest.fixture(scope="module")
def cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def ray_up_config(cluster_yaml) -> dict[str, Any]:
    """cluster.yaml as `ray up` sees it before it asks the cloud anything: merged with the
    provider's defaults, setup commands merged, per-type worker bounds filled in."""
    return prepare_config(copy.deepcopy(cluster_yaml))


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())


@pytest.fixture(scope="module")
def kuberay_config(rayservice) -> dict[str, Any]:
    """The RayService's cluster as the Ray autoscaler on KubeRay sees it (Ray's own translation
    of the group specs, which also validates the result against Ray's cluster schema)."""
    ray_cr = {
        "metadata": {"name": rayservice["metadata"]["name"], "namespace": "default"},
        "spec": rayservice["spec"]["rayClusterConfig"],
    }
    return _derive_autoscaling_config_from_ray_cr(ray_cr)


@pytest.fixture(scope="module", params=["ray_up_config", "kuberay_config"])
def autoscaler_config(request) -> dict[str, Any]:
    """Each cluster definition, as node types with their Ray resources."""
    return request.getfixturevalue(request.param)


# Both cluster definitions


def test_head_node_has_no_gpus(autoscaler_config):
    head = autoscaler_config["available_node_types"][autoscaler_config["head_node_type"]]
    resources = head["resources"]
    assert resources.get("GPU") == 0, f"the head must declare GPU: 0 explicitly: {resources}"
    assert not [name for name in resources if name.startswith("accelerator_type:")], resources


@BY_MODEL
def test_every_gpu_model_fits_a_node_type_meant_for_it(autoscaler_config, model):
    placement = placement_for(model.parallelism)
    types = {
        name: node_type["resources"]
        for name, node_type in worker_types(autoscaler_config).items()
        if serves(node_type["resources"], model)
    }
    assert types, f"no GPU node type has accelerator_type:{model.parallelism.accelerator_type}"
    for name, resources in types.items():
        reason = unplaceable_reason(placement, [resources])
        assert reason is None, f"{model.id} on node type {name}: {reason}"


@BY_MODEL
def test_node_types_reach_each_models_max_replicas(autoscaler_config, model):
    capacity = sum(
        node_type["max_workers"] * replicas_per_node(model, node_type["resources"])
        for node_type in worker_types(autoscaler_config).values()
        if serves(node_type["resources"], model)
    )
    assert capacity >= max_replicas(model), (
        f"{model.id} may scale to {max_replicas(model)} replicas; its node types hold {capacity}"
    )


def test_max_workers_covers_every_models_max_replicas(autoscaler_config):
    types = worker_types(autoscaler_config).values()
    needed = 0
    for model in GPU_MODELS:
        holds = [
            replicas_per_node(model, t["resources"]) for t in types if serves(t["resources"], model)
        ]
        assert holds and max(holds) > 0, f"no node type holds a replica of {model.id}"
        needed += math.ceil(max_replicas(model) / max(holds))
    assert autoscaler_config["max_workers"] >= needed, autoscaler_config["max_workers"]


def test_every_gpu_node_type_serves_a_model(autoscaler_config):
    idle = [
        name
        for name, node_type in worker_types(autoscaler_config).items()
        if node_type["resources"].get("GPU", 0) > 0
        and not any(serves(node_type["resources"], model) for model in GPU_MODELS)
    ]
    assert not idle, f"GPU node types no model in configs/gpu.yaml can use: {idle}"


# ray up: cluster/cluster.yaml


def test_cluster_yaml_passes_rays_cluster_schema(ray_up_config):
    validate_config(ray_up_config)


def test_every_node_starts_ray_with_the_metrics_export_port(ray_up_config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = ray_start_options(ray_up_config[key])
        assert len(starts) == 1, f"{key}: expected one `ray start`, found {starts}"
        assert starts[0].get("metrics-export-port") == METRICS_EXPORT_PORT, f"{key}: {starts[0]}"
    assert "head" in ray_start_options(ray_up_config["head_start_ray_commands"])[0]


def test_every_node_starts_ray_with_configs_ray_serve_env(ray_up_config):
    """`ray start` and thus every Ray process of the node inherits how Serve runs."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (command,) = [c for c in ray_up_config[key] if "ray start" in c]
        sourced = command.split("ray start")[0]
        assert "set -a; . ~/llm-gateway/configs/ray-serve.env; set +a;" in sourced, f"{key}: {command}"
        haproxy = "export RAY_SERVE_HAPROXY_BINARY_PATH=$HOME/llm-gateway/.venv/bin/llm-gateway-haproxy;"
        assert haproxy in sourced, f"{key}: the connection cap's HAProxy wrapper is not set: {command}"
    assert ray_up_config["file_mounts"].get("~/llm-gateway/configs") == "./configs", "mount configs/"


def test_the_image_sets_configs_ray_serve_env():
    dockerfile = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    (env_line,) = [line for line in dockerfile.splitlines() if line.startswith("ENV ")]
    image_env = dict(pair.split("=", 1) for pair in shlex.split(env_line[len("ENV ") :]))
    wrapper = image_env.pop("RAY_SERVE_HAPROXY_BINARY_PATH")
    assert wrapper.endswith("/bin/llm-gateway-haproxy"), wrapper
    assert image_env == ray_serve_env()


def test_every_node_installs_the_mounted_project(ray_up_config):
    mounts = ray_up_config["file_mounts"]
    for remote, local in mounts.items():
        assert (ROOT / local).exists(), f"file mount {remote}: {local} is not in the project"
    (pyproject,) = [remote for remote, local in mounts.items() if local.endswith("pyproject.toml")]
    project_dir = pyproject.rsplit("/", 1)[0]
    assert mounts.get(f"{project_dir}/apps") in ("./apps", "apps"), mounts

    extras = set(metadata(DISTRIBUTION).get_all("Provides-Extra") or [])
    nodes = {"head": ray_up_config["head_setup_commands"]} | {
        name: node_type.get("worker_setup_commands", ray_up_config["worker_setup_commands"])
        for name, node_type in worker_types(ray_up_config).items()
    }
    for name, commands in nodes.items():
        installs = editable_installs(commands)
        assert installs == {(project_dir, "gpu")}, f"node type {name} installs {installs}"
    assert "gpu" in extras, f"pyproject.toml has no `gpu` extra: {extras}"


def test_gpu_nodes_download_the_checkpoints_they_serve(ray_up_config):
    for name, node_type in worker_types(ray_up_config).items():
        commands = node_type.get("worker_setup_commands", ray_up_config["worker_setup_commands"])
        synced = set(s3_syncs(commands))
        for model in GPU_MODELS:
            if serves(node_type["resources"], model):
                missing = checkpoint_paths(model) - synced
                assert not missing, f"node type {name} serves {model.id}, never fetches {missing}"


def test_head_fetches_only_each_models_config_json(ray_up_config):
    # The application is built (and its config validated, which reads config.json) on the head.
    syncs = s3_syncs(ray_up_config["head_setup_commands"])
    assert {model.path for model in GPU_MODELS} <= set(syncs), sorted(syncs)
    for destination, options in syncs.items():
        excludes_all = has_option(options, "--exclude", "*")
        assert excludes_all and has_option(options, "--include", "config.json"), (
            f"the head fetches more than config.json of {destination}: {options}"
        )


# KubeRay: cluster/rayservice.yaml


def test_rayservice_serves_configs_gpu_yaml(rayservice):
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    served = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert served == yaml.safe_load((CONFIGS / "gpu.yaml").read_text()), (
        "serveConfigV2 differs from configs/gpu.yaml: copy the file's data into it"
    )


def kuberay_groups(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each group spec by the node type name Ray's KubeRay translation gives it."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    return {"headgroup": cluster["headGroupSpec"]} | groups


def test_rayservice_groups_start_ray_with_the_metrics_export_port(rayservice):
    for name, group in kuberay_groups(rayservice).items():
        port = group["rayStartParams"].get("metrics-export-port")
        assert port == METRICS_EXPORT_PORT, f"group {name}: metrics-export-port {port!r}"


def test_rayservice_gpus_are_what_kubernetes_allocates(rayservice, kuberay_config):
    # Ray's GPU count for a group must be the GPUs its pod gets, or engines wait for GPUs that
    # are not there (or idle ones sit in the pod).
    for name, group in kuberay_groups(rayservice).items():
        limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        allocated = int(limits.get("nvidia.com/gpu", 0))
        ray_gpus = kuberay_config["available_node_types"][name]["resources"].get("GPU", 0)
        assert allocated == ray_gpus, f"group {name}: pod gets {allocated} GPUs, Ray {ray_gpus}"


def test_rayservice_mounts_the_checkpoints_where_the_config_reads_them(rayservice, kuberay_config):
    for name, group in kuberay_groups(rayservice).items():
        pod = group["template"]["spec"]
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        mounts = [
            mount["mountPath"]
            for mount in pod["containers"][0].get("volumeMounts", [])
            if mount["name"] in volumes
        ]
        resources = kuberay_config["available_node_types"][name]["resources"]
        if name == "headgroup":  # builds the application: reads each model's config.json
            needed = {model.path for model in GPU_MODELS}
        else:
            needed = set().union(*(checkpoint_paths(m) for m in GPU_MODELS if serves(resources, m)))
        unmounted = {path for path in needed if not any(path.startswith(m + "/") for m in mounts)}
        assert not unmounted, f"group {name} reads {unmounted} but mounts only {mounts}"


def test_image_has_the_projects_ray_version(rayservice):
    ray_version = rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    pins = [Requirement(r) for r in requires(DISTRIBUTION) or []]
    (ray_pin,) = [pin for pin in pins if pin.name == "ray"]
    assert ray_pin.specifier.contains(ray_version), f"rayVersion {ray_version} is not {ray_pin}"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:([\d.]+)-", dockerfile, re.MULTILINE)
    assert base and base.group(1) == ray_version, "cluster/Dockerfile's Ray image is not rayVersion"
    images = {
        container["image"]
        for group in kuberay_groups(rayservice).values()
        for container in group["template"]["spec"]["containers"]
    }
    assert len(images) == 1, f"every group runs the one project image: {images}"
