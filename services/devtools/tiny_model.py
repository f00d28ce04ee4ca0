"""A tiny random Llama for tests that need the real code paths but not a real model's quality."""

from __future__ import annotations

import shutil
from pathlib import Path

from services.common.base_models import build_atomically, is_complete

TINY_LLAMA = "tiny-llama"
SEED = 1234
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _build(out: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Just enough structure to exercise GQA (4 query heads over 2 KV heads), a gated MLP, two blocks
    # and tied embeddings like SmolLM2's.
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.config.name_or_path = TINY_LLAMA
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)


def build_tiny_llama(path: Path, tokenizer_dir: Path) -> Path:
    """Write the tiny model to `path` (conventionally `<home>/models/tiny-llama`) unless present.

    `tokenizer_dir` is a pulled SmolLM2 directory: sharing its tokenizer makes text prompts and
    chat templates work on the tiny model too.
    """
    return build_atomically(path, lambda tmp: _build(tmp, tokenizer_dir), done=is_complete)
