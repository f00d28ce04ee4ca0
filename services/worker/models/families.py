"""The one place that maps a checkpoint's `architectures[0]` to the engine's model class, and loads it.

The config reader for each architecture is in models/config.py (import-time cheap, so
`loraplex models import` checks a directory with the very reader the worker uses).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from services.worker.layers.packed import can_pack
from services.worker.models.config import READERS, read_config
from services.worker.models.gemma3 import Gemma3ForCausalLM
from services.worker.models.llama import LlamaForCausalLM
from services.worker.models.phi3 import Phi3ForCausalLM
from services.worker.models.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}
assert set(MODEL_CLASSES) == set(READERS), "every architecture needs a reader and a model class"


def load_model(model_dir: Path, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    """The model of `model_dir`'s architecture with its safetensors weights, ready to serve."""
    cfg = read_config(model_dir)
    with torch.device("meta"):
        model = MODEL_CLASSES[cfg.architecture](cfg)
    model = model.to_empty(device=device).to(dtype)
    model.init_rope(device)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    loaded: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name not in params:
                    continue  # e.g. rotary inv_freq buffers in older checkpoints
                with torch.no_grad():
                    params[name].copy_(f.get_tensor(name).to(dtype))
                loaded.add(name)
    if cfg.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"{model_dir} lacks weights for {sorted(missing)[:5]}")
    model.fuse_projections()
    if can_pack(device, dtype):
        model.pack_weights()
    return model.eval()
