"""The Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, SmolLM) over a paged KV cache.

What tells them apart is config, not code: q/k/v (and o) biases, `llama3` RoPE scaling, a
sliding window, tied embeddings (all read in models/config.py). Families with their own layers
subclass these modules in their own file (qwen3.py). Parameter names mirror the HF checkpoints,
and models/weights.py loads them by name (models/families.py picks the class).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.layers.attention import AttentionMetadata, paged_attention
from services.worker.layers.lora import FusedLoRALinear, LoraBatch, LoRALinear
from services.worker.layers.lora_edges import EdgeBatch, add_embedding_lora, add_lm_head_lora
from services.worker.layers.norm import RMSNorm
from services.worker.layers.packed import matmul, pack
from services.worker.layers.rotary import rope_cache, rotate_
from services.worker.models.config import ModelConfig


@dataclass
class StepContext:
    """Everything one forward pass needs besides the token ids; built once per step."""

    positions: torch.Tensor  # [T]
    attention: AttentionMetadata
    lora: LoraBatch | None
    cos: torch.Tensor | None = None  # [T, 1, d], filled by the model
    sin: torch.Tensor | None = None
    edges: EdgeBatch | None = None  # LoRA on embed_tokens / lm_head (layers/lora_edges.py)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.qkv_bias
        self.q_proj = LoRALinear((layer, "q_proj"), h, self.heads * self.head_dim, bias)
        self.k_proj = LoRALinear((layer, "k_proj"), h, self.kv_heads * self.head_dim, bias)
        self.v_proj = LoRALinear((layer, "v_proj"), h, self.kv_heads * self.head_dim, bias)
        self.o_proj = LoRALinear((layer, "o_proj"), self.heads * self.head_dim, h, cfg.o_bias)
        self.sliding = cfg.sliding_window is not None
        self.scale = self.head_dim**-0.5
        self.qkv = FusedLoRALinear((self.q_proj, self.k_proj, self.v_proj))
        # Per-head norms of queries and keys before RoPE (Qwen3, Gemma 3 set them).
        self.q_norm: nn.Module | None = None
        self.k_norm: nn.Module | None = None
        self.k_cache = torch.empty(0)  # [kv_heads, slots, d], assigned by the runner
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv.fused(x, ctx.lora).view(t, -1, self.head_dim)  # [T, heads + 2 kv_heads, d]
        q, k, v = qkv.split((self.heads, self.kv_heads, self.kv_heads), dim=1)
        assert ctx.cos is not None and ctx.sin is not None
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # new tensors, normalized over d per head
            rotate_(q, ctx.cos, ctx.sin)
            rotate_(k, ctx.cos, ctx.sin)
        else:
            rotate_(qkv[:, : self.heads + self.kv_heads], ctx.cos, ctx.sin)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, ctx.attention, self.scale, self.sliding)
        return self.o_proj(out.reshape(t, -1), ctx.lora)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = LoRALinear((layer, "gate_proj"), h, i, False)
        self.up_proj = LoRALinear((layer, "up_proj"), h, i, False)
        self.down_proj = LoRALinear((layer, "down_proj"), i, h, False)
        self.gate_up = FusedLoRALinear((self.gate_proj, self.up_proj))

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        gate, up = self.gate_up(x, ctx.lora)
        return self.down_proj(F.silu(gate) * up, ctx.lora)


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, attention: type[nn.Module], mlp: type[nn.Module]
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp(cfg, layer)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: list[DecoderLayer]) -> None:
        super().__init__()
        # Given a weight, Embedding skips its random init: on the meta device that init imports
        # torch._dynamo (~1.3 s of a cold start), and the checkpoint overwrites it anyway.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    # A family with its own attention or MLP subclasses this model and names them here.
    attention: type[nn.Module] = Attention
    mlp: type[nn.Module] = MLP
    rope_cos: torch.Tensor  # [max_positions, head_dim] fp32
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, [self.make_layer(cfg, i) for i in range(cfg.num_layers)])
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)  # see init_rope
        self.lm_head_packed: torch.Tensor | None = None
        self.requires_grad_(False)

    def make_layer(self, cfg: ModelConfig, layer: int) -> DecoderLayer:
        return DecoderLayer(cfg, layer, self.attention, self.mlp)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rope(self, device: str) -> None:
        """The cos/sin tables: computed, not loaded, and kept in fp32 (so set after `.to(dtype)`)."""
        cfg = self.config
        cos, sin = rope_cache(cfg.rotary_dim, cfg.max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        if ctx.edges is not None:
            add_embedding_lora(x, input_ids, ctx.edges)
        ctx.cos = self.rope_cos[ctx.positions].to(x.dtype).unsqueeze(1)
        ctx.sin = self.rope_sin[ctx.positions].to(x.dtype).unsqueeze(1)
        for layer in self.model.layers:
            x = layer(x, ctx)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor, edges: EdgeBatch | None = None) -> torch.Tensor:
        logits = matmul(hidden, self.lm_head.weight, self.lm_head_packed).float()
        if edges is not None:
            add_lm_head_lora(logits, hidden, edges)
        return logits

    def fuse_projections(self) -> None:
        """One matmul for q/k/v and one for gate/up in every layer (after the weights load)."""
        for module in self.modules():
            if isinstance(module, FusedLoRALinear):
                module.fuse()

    def pack_weights(self) -> None:
        """Every matrix a step multiplies by, in oneDNN's layout (CPU bf16 only, see layers/packed.py).

        The parts of a fused projection are never multiplied on their own, so only the fused
        weight is packed."""
        fused_parts = {id(p) for m in self.modules() if isinstance(m, FusedLoRALinear) for p in m.parts}
        for module in self.modules():
            if isinstance(module, FusedLoRALinear) or (
                isinstance(module, LoRALinear) and id(module) not in fused_parts
            ):
                module.pack()
        self.lm_head_packed = pack(self.lm_head.weight)

    def attention_layers(self) -> list[nn.Module]:
        """Each layer's attention; the runner gives each its `k_cache` and `v_cache`."""
        return [layer.self_attn for layer in self.model.layers if isinstance(layer, DecoderLayer)]

    def linear(self, key: tuple[int, str]) -> LoRALinear | None:
        layer, name = key
        if not 0 <= layer < self.config.num_layers:
            return None
        block = self.model.layers[layer]
        assert isinstance(block, DecoderLayer)
        for parent in (block.self_attn, block.mlp):
            module = getattr(parent, name, None)
            if isinstance(module, LoRALinear):
                return module
        return None
