"""Phi-3 / Phi-4-mini: the Llama block with q/k/v and gate/up stored as one matrix each.

Adapters trained on Phi target the fused modules (`qkv_proj`, `gate_up_proj`), so these are the
LoRA modules too: one LoRALinear each, whose low-rank delta lands on the whole fused output.
Partial rotary (Phi-4-mini rotates 3/4 of each head) is config (`rotary_dim`), handled by
layers/rotary.rotate_. `longrope` scaling (the 128k-context Phi-3 and Phi-4-mini) keeps a
short and a long cos/sin table stacked in one; each step maps every token's position to its row
(layers/rotary.longrope_rows) before the shared forward reads the table.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.layers.attention import paged_attention
from services.worker.layers.lora import LoRALinear
from services.worker.layers.rotary import longrope_cache, longrope_rows, rotate_
from services.worker.models.config import ModelConfig
from services.worker.models.llama import LlamaForCausalLM, StepContext


class Phi3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.qkv_proj = LoRALinear((layer, "qkv_proj"), cfg.hidden_size, qkv_out, False)
        self.o_proj = LoRALinear((layer, "o_proj"), self.heads * self.head_dim, cfg.hidden_size, False)
        self.sliding = cfg.sliding_window is not None
        self.k_cache = torch.empty(0)  # [kv_heads, slots, d], assigned by the runner
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x, ctx.lora).view(t, -1, self.head_dim)  # [T, heads + 2 kv_heads, d]
        q, k, v = qkv.split((self.heads, self.kv_heads, self.kv_heads), dim=1)
        assert ctx.cos is not None and ctx.sin is not None
        rotate_(qkv[:, : self.heads + self.kv_heads], ctx.cos, ctx.sin)
        scale = self.head_dim**-0.5
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, ctx.attention, scale, self.sliding)
        return self.o_proj(out.reshape(t, -1), ctx.lora)


class Phi3MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = LoRALinear((layer, "gate_up_proj"), h, 2 * i, False)  # [gate; up] rows
        self.down_proj = LoRALinear((layer, "down_proj"), i, h, False)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, ctx.lora).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, ctx.lora)


class Phi3ForCausalLM(LlamaForCausalLM):
    attention = Phi3Attention
    mlp = Phi3MLP

    def init_rope(self, device: str) -> None:
        cfg = self.config
        if cfg.longrope is None:
            return super().init_rope(device)
        cos, sin = longrope_cache(cfg.rotary_dim, cfg.max_positions, cfg.rope_theta, cfg.longrope)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        cfg = self.config
        if cfg.longrope is not None:
            # The shared forward reads rope_cos[ctx.positions]; here that index is the table row.
            rows = longrope_rows(
                ctx.positions, ctx.attention, cfg.max_positions, cfg.longrope.original_max_positions
            )
            ctx = replace(ctx, positions=rows)
        return super().forward(input_ids, ctx)
