"""Tiny random-weight models of each supported family, built on the spot with `transformers`.

Each keeps its family's real config fields (RoPE scaling, biases, per-head norms, an explicit
head_dim, tied embeddings, a sliding window) at toy sizes: the engine is checked against
`transformers`' own implementation of the architecture, with no hub access. One-dimensional
weights (biases, norms) are randomised too: HF initialises them to 0 and 1, which would leave a
wrongly loaded bias or norm unnoticed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.base_models import build_atomically, is_complete

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# GQA (4 query heads over 2 KV heads), two blocks, the tokenizer's whole vocabulary.
SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # 8192 in Llama 3.1; 64 here puts head_dim 16's wavelengths in all three bands.
    "original_max_position_embeddings": 64,
}
MISTRAL_WINDOW = 5  # shorter than every test prompt, so the window changes the logits


def _config(family: str, **fields: Any) -> Any:
    from transformers import (
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    if family == "llama3":  # Llama 3.2 1B/3B: llama3 RoPE scaling, tied embeddings
        return LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True, **fields)
    if family == "qwen2.5":  # q/k/v biases
        return Qwen2Config(**SHAPE, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **fields)
    if family == "qwen3":  # per-head q/k norms; head_dim 32, not hidden / heads = 16
        return Qwen3Config(**SHAPE, head_dim=32, tie_word_embeddings=True, **fields)
    if family == "mistral":
        return MistralConfig(**SHAPE, sliding_window=None, **fields)
    if family == "mistral-sliding":
        return MistralConfig(**SHAPE, sliding_window=MISTRAL_WINDOW, **fields)
    if family == "phi4-mini":  # fused qkv_proj / gate_up_proj, 3/4 of each head rotated, tied
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
        return Phi3Config(**SHAPE, rope_parameters=rope, tie_word_embeddings=True, **fields)
    if family == "gemma3":  # one local (window 5, base 1e4) and one global (base 1e6) layer
        rope = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        }
        return Gemma3TextConfig(
            **SHAPE,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=rope,
            final_logit_softcapping=2.0,
            hidden_activation="gelu_pytorch_tanh",
            **fields,
        )
    raise KeyError(family)


FAMILIES = ("llama3", "qwen2.5", "qwen3", "mistral", "mistral-sliding", "phi4-mini", "gemma3")


def _build(family: str, out: Path, tokenizer_dir: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = _config(
        family,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.2 * torch.randn_like(p))
    finally:
        torch.random.set_rng_state(state)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)


def build_tiny_family(family: str, path: Path, tokenizer_dir: Path, seed: int = 1234) -> Path:
    """A tiny random `family` model in `path` (safetensors, config, the tokenizer of `tokenizer_dir`).

    The same seed gives the same weights to families of the same shapes (mistral and
    mistral-sliding differ only in their window)."""
    build: Callable[[Path], None] = lambda tmp: _build(family, tmp, tokenizer_dir, seed)  # noqa: E731
    return build_atomically(path, build, done=is_complete)
