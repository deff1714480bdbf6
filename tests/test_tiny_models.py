"""The embedded default's models are made locally and deterministically: same seed, same bytes."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("make_tiny_models", ROOT / "scripts" / "make_tiny_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_same_seed_makes_identical_models(tmp_path):
    script = load_script()
    script.make_model(tmp_path / "a", seed=7)
    script.make_model(tmp_path / "b", seed=7)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_model_has_a_chat_template_and_tp2_friendly_heads(tmp_path):
    script = load_script()
    script.make_model(tmp_path / "m", seed=0)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["vocab_size"] == script.VOCAB_SIZE
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<s><|user|>\nhi</s>\n<|assistant|>\n"
