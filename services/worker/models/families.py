"""The one place that maps a checkpoint's `architectures[0]` to the engine's model class, and loads it.

The config reader for each architecture is in models/config.py (import-time cheap, so
`loraplex models import` checks a directory with the very reader the worker uses).
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.worker.models.config import READERS, read_config
from services.worker.models.gemma3 import Gemma3ForCausalLM
from services.worker.models.llama import LlamaForCausalLM
from services.worker.models.phi3 import Phi3ForCausalLM
from services.worker.models.qwen3 import Qwen3ForCausalLM
from services.worker.models.weights import load_weights

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
    """The model of `model_dir`'s architecture with its weights (models/weights.py), ready to serve."""
    cfg = read_config(model_dir)
    with torch.device("meta"):
        model = MODEL_CLASSES[cfg.architecture](cfg)
    load_weights(model, model_dir, dtype, device)
    model.init_rope(device)
    model.fuse_projections()
    return model.eval()
