"""Helpers shared by the engine tests: real PEFT adapters on a base model, and a run loop."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.base_models import build_atomically
from services.devtools.adapters import is_adapter_dir
from services.worker.engine.adapter_weights import AdapterWeights, load_adapter_weights
from services.worker.engine.llm_engine import LLMEngine, RequestOutput

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class PeftAdapterSpec:
    name: str
    rank: int
    alpha: int
    targets: tuple[str, ...] | str = ALL_TARGETS  # a list of names, a regex, or "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    # Further LoraConfig arguments (layers_to_transform, rank_pattern, ...), as (name, value) pairs.
    extra: tuple[tuple[str, Any], ...] = ()


# One of each variant and a spread of ranks, so a batch mixes rank buckets.
VARIANTS = (
    PeftAdapterSpec("qv-r8", 8, 16, ("q_proj", "v_proj")),
    PeftAdapterSpec("all-r16", 16, 32),
    PeftAdapterSpec("dora-r8", 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj"), use_dora=True),
    PeftAdapterSpec("rslora-r16", 16, 8, use_rslora=True),
    PeftAdapterSpec("mlp-r64", 64, 64, ("gate_proj", "up_proj", "down_proj")),
)


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# LoRA on the model's edges (embed_tokens, lm_head), alone, together with attention, with DoRA
# and rsLoRA, and an ordinary adapter to share their batches.
EDGE_ADAPTERS = (
    PeftAdapterSpec("embed", 8, 16, ("embed_tokens",)),
    PeftAdapterSpec("head-rslora", 16, 8, ("lm_head",), use_rslora=True),
    PeftAdapterSpec("edges-attn", 8, 16, ("embed_tokens", "lm_head", *ATTENTION)),
    PeftAdapterSpec("embed-dora", 8, 16, ("embed_tokens", "v_proj"), use_dora=True),
    PeftAdapterSpec("head-dora", 4, 8, ("lm_head",), use_dora=True),
    PeftAdapterSpec("ordinary", 8, 16, ("q_proj", "v_proj")),
)
# Bump when build_peft_adapter's recipe changes, so cached adapters are rebuilt.
RECIPE = 1


def cached_peft_adapter(base_dir: Path, cache_dir: Path, spec: PeftAdapterSpec, seed: int) -> Path:
    """build_peft_adapter's adapter, built once per cache for this base model, spec and PEFT."""
    import peft

    identity = {
        "recipe": RECIPE,
        "peft": peft.__version__,
        "model_config": hashlib.sha256((base_dir / "config.json").read_bytes()).hexdigest(),
        "spec": asdict(spec),
        "seed": seed,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        build_peft_adapter(base_dir, tmp, spec, seed)

    dest = cache_dir / f"{base_dir.resolve().name}--random-{spec.name}--{key}"
    return build_atomically(dest, build, done=is_adapter_dir)


def build_peft_adapter(base_dir: Path, out: Path, spec: PeftAdapterSpec, seed: int) -> Path:
    """Save a PEFT adapter whose A and B are both random (B = 0 would make every test trivial)."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=spec.targets if isinstance(spec.targets, str) else list(spec.targets),
        use_dora=spec.use_dora,
        use_rslora=spec.use_rslora,
        init_lora_weights=False,
        **dict(spec.extra),
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.normal_(0.0, 0.5 / spec.rank**0.5)
            elif "magnitude" in name:
                p.mul_(1.0 + 0.1 * torch.randn_like(p))
    # Without full copies of embed_tokens / lm_head, which PEFT adds when they are targeted.
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    return out


def hf_greedy(model: Any, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """A transformers (or PEFT) model's greedy continuation of ids [1, L]: exactly `new_tokens`
    tokens and each step's logits in fp32 (the reference the engine is compared with)."""
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, ids.shape[1] :].tolist(), [step[0].float() for step in out.logits]


def digest_of(adapter_dir: Path) -> str:
    return hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()


def load_weights(adapter_dir: Path, dtype: torch.dtype = torch.float32) -> AdapterWeights:
    return load_adapter_weights(adapter_dir, digest_of(adapter_dir), dtype)


def run_all(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]
