"""What the registry and the worker must agree on about a base model's LoRA-targetable layers.

Derived from the model's config (never hard-coded per model) by `services.common.base_models`,
stored in the registry's base-model catalog, and used by adapter validation.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetModule:
    """One linear layer inside every transformer block, e.g. q_proj."""

    name: str  # PEFT's target name, e.g. "q_proj"
    path: str  # path inside a block, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class BaseModelSpec:
    name: str  # catalog name, e.g. "smollm2-135m-instruct"
    architecture: str  # HF architecture, e.g. "LlamaForCausalLM"
    num_layers: int
    context_length: int
    hidden_size: int
    vocab_size: int
    target_modules: tuple[TargetModule, ...]
    # Blocks live at f"{layers_prefix}.{i}" in the HF module tree.
    layers_prefix: str = "model.layers"

    def module(self, name: str) -> TargetModule | None:
        return next((m for m in self.target_modules if m.name == name), None)

    def edge_modules(self) -> tuple[TargetModule, ...]:
        """embed_tokens and lm_head as LoRA targets, `path` their full module names, sized as LoRA
        reads them (A [r, in], B [out, r]): the embeddings map a one-hot token (vocab inputs) to
        the hidden size, lm_head maps the hidden size to the vocabulary."""
        parent = self.layers_prefix.rsplit(".", 1)[0] if "." in self.layers_prefix else ""
        embed = f"{parent}.embed_tokens" if parent else "embed_tokens"
        return (
            TargetModule("embed_tokens", embed, self.vocab_size, self.hidden_size),
            TargetModule("lm_head", "lm_head", self.hidden_size, self.vocab_size),
        )
