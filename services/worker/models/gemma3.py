"""Gemma 3 text models: the Llama block with Gemma's own norms, activation, scales and layer mix.

What differs, each in a few lines below: (1 + w) RMSNorms, also after attention and around the MLP
(four per block) and on each query/key head; embeddings scaled by sqrt(hidden); a GELU-tanh gated
MLP; attention scaled by query_pre_attn_scalar^-1/2; local (sliding-window) layers with their own
RoPE base beside global ones; the final logits soft-capped when the config says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.worker.layers.lora_edges import EdgeBatch, add_embedding_lora
from services.worker.layers.norm import OffsetRMSNorm
from services.worker.layers.rotary import rope_cache
from services.worker.models.config import Gemma3Config, ModelConfig
from services.worker.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM, StepContext


def _config(cfg: ModelConfig) -> Gemma3Config:
    assert isinstance(cfg, Gemma3Config)
    return cfg


class Gemma3Attention(Attention):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        g = _config(cfg)
        self.q_norm = OffsetRMSNorm(g.head_dim, g.rms_norm_eps)
        self.k_norm = OffsetRMSNorm(g.head_dim, g.rms_norm_eps)
        self.sliding = g.sliding_layers[layer]
        self.scale = g.query_pre_attn_scalar**-0.5


class Gemma3MLP(MLP):
    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        gate, up = self.gate_up(x, ctx.lora)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up, ctx.lora)


class Gemma3DecoderLayer(DecoderLayer):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer, Gemma3Attention, Gemma3MLP)
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = OffsetRMSNorm(h, eps)
        self.post_attention_layernorm = OffsetRMSNorm(h, eps)
        self.pre_feedforward_layernorm = OffsetRMSNorm(h, eps)
        self.post_feedforward_layernorm = OffsetRMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), ctx))


class Gemma3ForCausalLM(LlamaForCausalLM):
    local_cos: torch.Tensor  # the local layers' RoPE tables (their own base)
    local_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.model.norm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("local_cos", torch.empty(0), persistent=False)
        self.register_buffer("local_sin", torch.empty(0), persistent=False)

    def make_layer(self, cfg: ModelConfig, layer: int) -> DecoderLayer:
        return Gemma3DecoderLayer(cfg, layer)

    def init_rope(self, device: str) -> None:
        super().init_rope(device)
        g = _config(self.config)
        cos, sin = rope_cache(g.rotary_dim, g.max_positions, g.local_rope_theta)
        self.local_cos, self.local_sin = cos.to(device), sin.to(device)

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if ctx.edges is not None:  # PEFT scales an embedding LoRA's delta like the embedding
            add_embedding_lora(x, input_ids, ctx.edges)
        # sqrt(hidden) rounded to the weights' dtype first, as the reference does.
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        tables = {
            False: (self.rope_cos[ctx.positions], self.rope_sin[ctx.positions]),
            True: (self.local_cos[ctx.positions], self.local_sin[ctx.positions]),
        }
        tables = {k: (c.to(x.dtype).unsqueeze(1), s.to(x.dtype).unsqueeze(1)) for k, (c, s) in tables.items()}
        for layer, sliding in zip(self.model.layers, _config(self.config).sliding_layers, strict=True):
            ctx.cos, ctx.sin = tables[sliding]
            x = layer(x, ctx)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor, edges: EdgeBatch | None = None) -> torch.Tensor:
        logits = super().compute_logits(hidden, edges)
        cap = _config(self.config).final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
