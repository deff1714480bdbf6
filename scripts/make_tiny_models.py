"""Make the tiny local models the embedded default serves (no network, deterministic by seed).

Each model is a 4-layer Llama with random weights and a byte-level BPE tokenizer trained on
synthetic text, with a chat template, saved the way a Hugging Face checkpoint is. Its output
is gibberish; it exists so the whole serving stack (tokenizer, chat template, vLLM engine,
tensor parallelism) runs for real on any laptop in seconds.

Next to them it writes a LoRA adapter of tiny-chat in PEFT's on-disk format (by hand: peft is
not a dependency), with random non-zero weights, so serving an adapter (vLLM's enable_lora,
LoRARequest) runs for real too and visibly changes the output.

    python scripts/make_tiny_models.py            # makes models/tiny-chat, models/tiny-chat-tp2
                                                  # and the adapter models/tiny-chat-lora
    python scripts/make_tiny_models.py --force    # remakes them
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"
VOCAB_SIZE = 4096
MAX_POSITIONS = 2048
# A Llama-3-like template, short: the system prompt stays first and byte-identical across
# requests, which is what prefix caching needs.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# One entry per model of configs/app.yaml: directory name -> seed.
TINY_MODELS = {"tiny-chat": 0, "tiny-chat-tp2": 1}
# Cross-encoders (`task: score` models, for the tests): directory name -> seed.
TINY_RERANKERS = {"tiny-rerank": 3}
# LoRA adapters of those models: directory name -> (base model's directory name, seed). Made
# after the models, since an adapter's shapes come from its base's config.json.
TINY_LORAS = {"tiny-chat-lora": ("tiny-chat", 2)}
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGET_MODULES = ["q_proj", "v_proj"]
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "qu", "ng"]


def synthetic_corpus(seed: int, lines: int = 4000) -> list[str]:
    """Pseudo-words from a fixed syllable set: enough for BPE to learn a full vocabulary."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)]
    punctuation = [".", ",", "?", "!", ":"]
    corpus = []
    for _ in range(lines):
        sentence = " ".join(rng.choices(words, k=rng.randint(4, 16)))
        corpus.append(sentence.capitalize() + rng.choice(punctuation))
    corpus.append("0123456789 {}[]()<>|/\\-_=+*&^%$#@~`'\" \n\t")
    return corpus


def make_model(target: Path, seed: int, reranker: bool = False) -> None:
    """A tiny causal LM, or with `reranker` a cross-encoder (a sequence classifier with one
    label: the relevance score of a query and document pair)."""
    # Imported here: the heavy libraries are only needed when a model is actually made.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    special_tokens = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(synthetic_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **({"num_labels": 1} if reranker else {}),
    )
    torch.manual_seed(seed)
    architecture = LlamaForSequenceClassification if reranker else LlamaForCausalLM
    model = architecture(config).to(torch.bfloat16)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def lora_shapes(base_config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module; v_proj is narrower under GQA."""
    hidden = base_config["hidden_size"]
    head_dim = base_config.get("head_dim") or hidden // base_config["num_attention_heads"]
    return {
        "q_proj": (hidden, base_config["num_attention_heads"] * head_dim),
        "v_proj": (hidden, base_config["num_key_value_heads"] * head_dim),
    }


def make_lora(target: Path, base: Path, seed: int) -> None:
    """Write the adapter the way PEFT saves one, so vLLM (and PEFT) load it unchanged."""
    import torch
    from safetensors.torch import save_file

    base_config = json.loads((base / "config.json").read_text())
    dtype = getattr(torch, base_config.get("dtype") or base_config.get("torch_dtype") or "bfloat16")
    shapes = lora_shapes(base_config)
    # A generator of its own, so the weights depend on the seed alone. Both A and B are random
    # (PEFT starts B at zero, which would leave the output unchanged).
    generator = torch.Generator().manual_seed(seed)

    def random_weight(rows: int, columns: int) -> torch.Tensor:
        return torch.normal(0.0, 0.5, (rows, columns), generator=generator).to(dtype)

    tensors = {}
    for layer in range(base_config["num_hidden_layers"]):
        for module in LORA_TARGET_MODULES:
            in_features, out_features = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = random_weight(LORA_RANK, in_features)
            tensors[f"{prefix}.lora_B.weight"] = random_weight(out_features, LORA_RANK)

    # The fields PEFT writes for a plain LoRA; vLLM requires r, lora_alpha and target_modules
    # and rejects an adapter whose other fields ask for what it does not implement.
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        # Relative to the repository, so the bytes do not depend on where it is checked out.
        "base_model_name_or_path": os.path.relpath(base, ROOT),
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "target_modules": LORA_TARGET_MODULES,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    target.mkdir(parents=True, exist_ok=True)
    config_text = json.dumps(adapter_config, indent=2, sort_keys=True) + "\n"
    (target / "adapter_config.json").write_text(config_text)
    save_file(tensors, target / "adapter_model.safetensors", metadata={"format": "pt"})


def ensure_tiny_models(force: bool = False) -> list[Path]:
    """Make each tiny model and adapter that is missing (or all, with force); return their
    directories."""
    made = []
    for name, seed in TINY_MODELS.items():
        target = MODELS_DIR / name
        if force or not (target / "config.json").exists():
            make_model(target, seed)
            print(f"made {target}")
        made.append(target)
    for name, seed in TINY_RERANKERS.items():
        target = MODELS_DIR / name
        if force or not (target / "config.json").exists():
            make_model(target, seed, reranker=True)
            print(f"made {target}")
        made.append(target)
    for name, (base_name, seed) in TINY_LORAS.items():
        target = MODELS_DIR / name
        if force or not (target / "adapter_config.json").exists():
            make_lora(target, MODELS_DIR / base_name, seed)
            print(f"made {target}")
        made.append(target)
    return made


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--force", action="store_true", help="remake models and adapters that exist")
    ensure_tiny_models(force=parser.parse_args().force)
