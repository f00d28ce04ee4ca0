"""Qwen3: the Llama block plus an RMSNorm over each query and key head before RoPE.

Its explicit `head_dim` (128 on every size, unlike hidden / heads) and its optional attention
bias are config, read in models/config.py; the per-head norms are the only new layers.
"""

from __future__ import annotations

from services.worker.layers.norm import RMSNorm
from services.worker.models.config import ModelConfig
from services.worker.models.llama import Attention, LlamaForCausalLM


class Qwen3Attention(Attention):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention = Qwen3Attention
