"""The Llama family (Llama, Mistral, Qwen2, SmolLM) over a paged KV cache, loading HF safetensors.

Parameter names mirror the HF checkpoints; models/weights.py loads them by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.layers.attention import AttentionMetadata, paged_attention
from services.worker.layers.lora import FusedLoRALinear, LoraBatch, LoRALinear
from services.worker.layers.lora_edges import EdgeBatch, add_embedding_lora, add_lm_head_lora
from services.worker.layers.norm import RMSNorm
from services.worker.layers.packed import matmul, pack
from services.worker.layers.rotary import apply_rotary, rope_cache
from services.worker.models.weights import load_weights

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_positions: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dir(cls, model_dir: Path) -> LlamaConfig:
        c = json.loads((model_dir / "config.json").read_text())
        arch = (c.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch} is not supported; use one of {SUPPORTED_ARCHITECTURES}")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope scaling {rope} is not supported")
        eos = c.get("eos_token_id")
        gen_path = model_dir / "generation_config.json"
        if gen_path.is_file():
            eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
        heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
            max_positions=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            attention_bias=c.get("attention_bias", c.get("model_type") == "qwen2"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )


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
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = LoRALinear((layer, "q_proj"), h, self.heads * self.head_dim, bias)
        self.k_proj = LoRALinear((layer, "k_proj"), h, self.kv_heads * self.head_dim, bias)
        self.v_proj = LoRALinear((layer, "v_proj"), h, self.kv_heads * self.head_dim, bias)
        self.o_proj = LoRALinear((layer, "o_proj"), self.heads * self.head_dim, h, False)
        self.qkv = FusedLoRALinear((self.q_proj, self.k_proj, self.v_proj))
        self.k_cache = torch.empty(0)  # [kv_heads, slots, d], assigned by the runner
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x, ctx.lora)
        q = q.view(t, self.heads, self.head_dim)
        k = k.view(t, self.kv_heads, self.head_dim)
        v = v.view(t, self.kv_heads, self.head_dim)
        assert ctx.cos is not None and ctx.sin is not None
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, ctx.attention, self.head_dim**-0.5)
        return self.o_proj(out.reshape(t, -1), ctx.lora)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
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
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class Backbone(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        # Given a weight, Embedding skips its random init: on the meta device that init imports
        # torch._dynamo (~1.3 s of a cold start), and the checkpoint overwrites it anyway.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    rope_cos: torch.Tensor  # [max_positions, head_dim] fp32
    rope_sin: torch.Tensor

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_cache(cfg.head_dim, cfg.max_positions, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head_packed: torch.Tensor | None = None
        self.requires_grad_(False)

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

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.model.layers if isinstance(layer, DecoderLayer)]

    def linear(self, key: tuple[int, str]) -> LoRALinear | None:
        layer, name = key
        if not 0 <= layer < self.config.num_layers:
            return None
        block = self.model.layers[layer]
        assert isinstance(block, DecoderLayer)
        parent = block.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
        module = getattr(parent, name, None)
        return module if isinstance(module, LoRALinear) else None


def load_model(model_dir: Path, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    cfg = LlamaConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    load_weights(model, model_dir, dtype, device)
    model.rope_cos, model.rope_sin = model.rope_cos.to(device), model.rope_sin.to(device)
    model.fuse_projections()
    return model.eval()
