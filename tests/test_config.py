"""The config contract: a bad config fails before anything starts, with one message that names the
field path and what is wrong; the committed configs validate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from apps.config import ConfigError, load_config
from tests.conftest import CONFIGS, ROOT, app_args


def one_model(path: str, **fields: Any) -> dict[str, Any]:
    return {"models": [{"id": "m", "path": path, **fields}]}


# (case id, build args from a checkpoint path, field path expected in the message, phrase expected)
INVALID_CONFIGS = [
    ("unknown_field", lambda p: one_model(p, engine={"max_num_seq": 8}), "models[m].engine.max_num_seq", "Extra inputs"),
    ("wrong_type", lambda p: one_model(p, engine={"max_num_seqs": "many"}), "models[m].engine.max_num_seqs", "valid integer"),
    ("tp_not_dividing_heads", lambda p: one_model(p, parallelism={"tensor_parallel_size": 3}), "models[m]", "does not divide"),
    ("duplicate_id", lambda p: {"models": [{"id": "m", "path": p}, {"id": "m", "path": p}]}, "(top level)", "Duplicate model ids ['m']"),
    ("missing_path", lambda p: one_model(p + "-missing"), "models[m].path", "no model checkpoint"),
    ("no_models", lambda p: {"models": []}, "models", "at least 1 item"),
    ("default_above_cap", lambda p: one_model(p, limits={"default_max_tokens": 600, "max_tokens_cap": 512}), "models[m].limits", "default_max_tokens (600) must be <= max_tokens_cap (512)"),
    ("cap_not_below_context", lambda p: one_model(p, engine={"max_model_len": 512}, limits={"max_tokens_cap": 512, "default_max_tokens": 256}), "models[m]", "must be below engine.max_model_len"),
    ("prompt_cap_plus_output_over_context", lambda p: one_model(p, engine={"max_model_len": 1024}, limits={"max_prompt_tokens": 800}), "models[m]", "exceed engine.max_model_len"),
    ("gpu_memory_over_one", lambda p: one_model(p, engine={"gpu_memory_utilization": 1.5}), "models[m].engine.gpu_memory_utilization", "less than or equal to 1"),
    ("min_above_max_replicas", lambda p: one_model(p, replicas={"autoscaling": {"min_replicas": 3, "max_replicas": 2}}), "models[m].replicas.autoscaling", "min_replicas (3) must be <= max_replicas (2)"),
    ("draft_method_without_model", lambda p: one_model(p, engine={"speculative": {"method": "draft_model", "num_speculative_tokens": 3}}), "models[m].engine.speculative", "needs `model`"),
    ("accelerator_type_on_cpu", lambda p: one_model(p, parallelism={"accelerator_type": "A100"}), "models[m].parallelism", "accelerator_type is for GPUs"),
    ("threads_bind_rank_count", lambda p: one_model(p, parallelism={"tensor_parallel_size": 2, "cpu_threads_bind": "0"}), "models[m].parallelism", "one core list per rank (2)"),
    ("bad_model_id", lambda p: {"models": [{"id": "bad id!", "path": p}]}, "models[bad id!].id", "should match pattern"),
    ("replicas_two_ways", lambda p: one_model(p, replicas={"num_replicas": 2, "autoscaling": {"max_replicas": 3}}), "models[m].replicas", "either num_replicas or autoscaling"),
    ("unknown_dtype", lambda p: one_model(p, engine={"dtype": "float8"}), "models[m].engine.dtype", "Input should be"),
]


@pytest.mark.parametrize(
    ("build", "field_path", "phrase"),
    [case[1:] for case in INVALID_CONFIGS],
    ids=[case[0] for case in INVALID_CONFIGS],
)
def test_invalid_config_names_field_and_problem(make_checkpoint, build, field_path, phrase):
    with pytest.raises(ConfigError) as raised:
        load_config(build(make_checkpoint()))
    message = str(raised.value)
    assert message.startswith("Invalid application config:"), message
    assert f"  {field_path}: " in message, f"field path {field_path!r} not named in:\n{message}"
    assert phrase in message, f"{phrase!r} not in:\n{message}"


def test_every_problem_is_reported_at_once(make_checkpoint):
    args = {"models": [{"id": "m", "path": make_checkpoint(), "engine": {"dtype": 1, "bogus": 2}}]}
    with pytest.raises(ConfigError) as raised:
        load_config(args)
    lines = str(raised.value).splitlines()[1:]
    assert len(lines) == 2, lines


def test_kv_heads_fewer_than_ranks_are_replicated(make_checkpoint):
    # 70B-style: 64 query heads, 8 KV heads; TP 16 replicates KV heads, which vLLM supports.
    config = load_config(one_model(make_checkpoint(heads=64, kv_heads=8), parallelism={"tensor_parallel_size": 16}))
    assert config.models[0].parallelism.tensor_parallel_size == 16


def test_relative_path_resolves_to_absolute(make_checkpoint, monkeypatch, tmp_path):
    make_checkpoint("rel")
    monkeypatch.chdir(tmp_path)
    config = load_config(one_model("rel"))
    assert config.models[0].path == str(tmp_path / "rel")


def test_defaults_follow_the_field(make_checkpoint):
    model = load_config(one_model(make_checkpoint())).models[0]
    assert model.limits.default_max_tokens == 256
    assert model.engine.gpu_memory_utilization == 0.92
    assert model.engine.enable_prefix_caching is True


def test_embedded_default_config_is_valid():
    config = load_config(app_args("app.yaml"))
    tp = {m.id: m.parallelism.tensor_parallel_size for m in config.models}
    assert tp == {"tiny-chat": 1, "tiny-chat-tp2": 2, "tiny-embed": 1}
    assert {m.id: m.task for m in config.models}["tiny-embed"] == "embed"


@pytest.mark.parametrize(
    "config_file", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "gpu.yaml")
)
def test_every_cpu_config_is_valid(config_file):
    # Model paths in configs are relative to the project root, where `serve run` starts.
    assert load_config(app_args(config_file, local_paths=True)).models


def test_gpu_config_is_valid_for_a_gpu_cluster():
    # The checkpoints live on the GPU nodes, not here: validate everything but the files.
    config = load_config(app_args("gpu.yaml"), check_model_files=False)
    by_id = {m.id: m for m in config.models}
    big = by_id["llama-3.1-70b-instruct-awq"]
    assert big.parallelism.accelerator == "gpu" and big.parallelism.tensor_parallel_size == 4
    assert big.engine.quantization == "awq" and big.engine.speculative is not None
    assert all(m.engine.enable_prefix_caching for m in config.models)


def test_gpu_config_parallelism_fits_llama_checkpoints(make_checkpoint):
    # The head counts of the real checkpoints (70B: 64 query / 8 KV heads; 8B: 32 / 8), so the
    # TP sizes in gpu.yaml are checked as they would be on the GPU nodes.
    args = app_args("gpu.yaml")
    heads = {"llama-3.1-8b-instruct": (32, 8), "llama-3.1-70b-instruct-awq": (64, 8)}
    for model in args["models"]:
        model["path"] = make_checkpoint(model["id"], *heads[model["id"]])
        model["engine"].pop("speculative")  # its draft model lives on the GPU nodes only
    assert len(load_config(args).models) == 2


def test_checkpoint_config_that_is_not_an_object_is_a_config_error(make_checkpoint):
    path = make_checkpoint()
    (Path(path) / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not a JSON object"):
        load_config(one_model(path))


def test_lora_adapters_need_a_generative_model_and_names_of_their_own():
    def config(**model):
        args = {"models": [{"id": "m", "path": "/x", **model}]}
        return load_config(args, check_model_files=False)

    adapters = {"adapters": [{"name": "m-sql", "path": "/a"}]}
    assert [a.name for a in config(lora=adapters).models[0].lora_adapters] == ["m-sql"]
    with pytest.raises(ConfigError, match="LoRA adapters need a `generate` model"):
        config(task="embed", lora=adapters)
    with pytest.raises(ConfigError, match=r"Duplicate model ids \['m'\]"):
        config(lora={"adapters": [{"name": "m", "path": "/a"}]})
    with pytest.raises(ConfigError, match="adapter_config.json missing"):
        model = {"id": "m", "path": str(ROOT / "models/tiny-chat")}
        load_config({"models": [model | {"lora": {"adapters": [{"name": "a", "path": "/nowhere"}]}}]})
