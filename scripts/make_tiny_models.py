"""Make the tiny local models the embedded default serves (no network, deterministic by seed).

Each model is a 4-layer Llama with random weights and a byte-level BPE tokenizer trained on
synthetic text, with a chat template, saved the way a Hugging Face checkpoint is. Its output
is gibberish; it exists so the whole serving stack (tokenizer, chat template, vLLM engine,
tensor parallelism) runs for real on any laptop in seconds.

    python scripts/make_tiny_models.py            # makes models/tiny-chat and models/tiny-chat-tp2
    python scripts/make_tiny_models.py --force    # remakes them
"""

from __future__ import annotations

import argparse
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


def make_model(target: Path, seed: int) -> None:
    # Imported here: the heavy libraries are only needed when a model is actually made.
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def ensure_tiny_models(force: bool = False) -> list[Path]:
    """Make each tiny model that is missing (or all, with force); return their directories."""
    made = []
    for name, seed in TINY_MODELS.items():
        target = MODELS_DIR / name
        if force or not (target / "config.json").exists():
            make_model(target, seed)
            print(f"made {target}")
        made.append(target)
    return made


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--force", action="store_true", help="remake models that already exist")
    ensure_tiny_models(force=parser.parse_args().force)
