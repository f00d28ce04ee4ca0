"""Read a PEFT adapter directory into host tensors (safetensors only, never pickles)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from services.common.adapter_errors import AdapterRejected, InvalidSafetensors
from services.common.adapter_files import ADAPTER_WEIGHTS, read_safetensors_header, split_safetensors
from services.common.peft_config import PeftLoraConfig, Variant, parse_peft_config

# The split projections of Llama-style models, and Phi-3's fused ones (the model's `linear` then
# says whether the loaded base model has the module).
TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
)
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight; group "module" is the layer's
# full name in the base model ("model.layers.3.self_attn.q_proj"), which is what PEFT matches
# target_modules and rank/alpha_pattern keys against.
TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<name>\w+))\."
    r"(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$"
)
# The edges (layers/lora_edges.py): PEFT's embedding LoRA, and a linear LoRA on lm_head.
# base_model.model.model.embed_tokens.lora_embedding_A, base_model.model.lm_head.lora_B.weight
EDGE_TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>model\.(?P<embed>embed_tokens)|(?P<head>lm_head))\."
    r"(?P<kind>lora_embedding_A|lora_embedding_B|lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$"
)
_EDGE_KINDS = {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}


class AdapterFormatError(ValueError):
    """The adapter directory is not a PEFT LoRA adapter this engine can serve."""


@dataclass
class LoraModuleWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # alpha / r, or alpha / sqrt(r) for rsLoRA
    magnitude: torch.Tensor | None = None  # DoRA [out]

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class AdapterWeights:
    digest: str
    variant: Variant
    tensors: dict[tuple[int, str], LoraModuleWeights]
    ranks: dict[str, int] = field(default_factory=dict)  # module name -> rank
    size_bytes: int = 0
    edges: dict[str, LoraModuleWeights] = field(default_factory=dict)  # "embed_tokens" / "lm_head"

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)


def load_adapter_weights(adapter_dir: Path, digest: str, dtype: torch.dtype) -> AdapterWeights:
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterFormatError(
            f"{adapter_dir} needs adapter_config.json and adapter_model.safetensors (pickles are refused)"
        )
    # The registry's header checks and caps first (safetensors' own reader allows 100 MB headers
    # and any number of dimensions).
    try:
        read_safetensors_header(weights_path)
    except InvalidSafetensors as exc:
        raise AdapterFormatError(f"{ADAPTER_WEIGHTS} is not a valid safetensors file: {exc}") from None
    return adapter_weights_from(config_path.read_bytes(), load_file(str(weights_path)), digest, dtype)


def adapter_weights_from_bytes(
    config: bytes | bytearray, weights: bytearray, digest: str, dtype: torch.dtype
) -> AdapterWeights:
    """The same, from the two files' bytes (an adapter fetched into memory, not yet on disk);
    the tensors view `weights` until the dtype conversion copies them."""
    return adapter_weights_from(bytes(config), tensors_in(weights), digest, dtype)


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def tensors_in(buf: bytearray) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as views of its bytes in memory (no copy), after the same
    header checks and caps registration runs, so a wrong file can never be read outside its own
    buffer."""
    try:
        header, base = split_safetensors(buf)
    except InvalidSafetensors as exc:
        raise AdapterFormatError(f"{ADAPTER_WEIGHTS} is not a valid safetensors file: {exc}") from None
    out: dict[str, torch.Tensor] = {}
    for name, info in header.tensors.items():
        dtype = _TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise AdapterFormatError(f"tensor {name!r} has dtype {info.dtype!r}; use F32, F16 or BF16")
        if info.numel == 0:
            out[name] = torch.empty(info.shape, dtype=dtype)
            continue
        flat = torch.frombuffer(buf, dtype=dtype, count=info.numel, offset=base + info.offset)
        out[name] = flat.reshape(info.shape)
    return out


def adapter_weights_from(
    config_bytes: bytes, raw: dict[str, torch.Tensor], digest: str, dtype: torch.dtype
) -> AdapterWeights:
    try:
        config = json.loads(config_bytes)
        peft = parse_peft_config(config if isinstance(config, dict) else {})
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"adapter_config.json is not valid JSON ({exc})") from None
    except AdapterRejected as exc:
        raise AdapterFormatError(str(exc)) from None
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    names: dict[tuple[int, str], str] = {}
    edge_parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        edge = EDGE_TENSOR_NAME.match(key)
        if edge is not None and _edge_kind_fits(edge.group("embed") is not None, edge.group("kind")):
            kind = _EDGE_KINDS.get(edge.group("kind"), edge.group("kind"))
            edge_parts.setdefault(edge.group("module"), {})[kind] = tensor
            continue
        m = TENSOR_NAME.match(key)
        if m is None or m.group("name") not in TARGETS:
            raise AdapterFormatError(f"tensor {key!r} does not map to a supported linear layer")
        where = (int(m.group("layer")), m.group("name"))
        parts.setdefault(where, {})[m.group("kind")] = tensor
        names[where] = m.group("module")
    tensors: dict[tuple[int, str], LoraModuleWeights] = {}
    ranks: dict[str, int] = {}
    for (layer, name), p in sorted(parts.items()):
        tensors[(layer, name)] = _module_weights(p, names[(layer, name)], peft, dtype)
        ranks[name] = max(ranks.get(name, 0), tensors[(layer, name)].rank)
    edges: dict[str, LoraModuleWeights] = {}
    for module_name, p in sorted(edge_parts.items()):
        name = module_name.rsplit(".", 1)[-1]
        edges[name] = _module_weights(p, module_name, peft, dtype, edge=name)
        ranks[name] = edges[name].rank
    if not tensors and not edges:
        raise AdapterFormatError("adapter_model.safetensors holds no LoRA tensors")
    # Bytes as resident in the engine's dtype, which is what a step reads.
    size = sum(t.numel() for t in raw.values()) * torch.empty(0, dtype=dtype).element_size()
    return AdapterWeights(
        digest=digest, variant=peft.variant, tensors=tensors, ranks=ranks, edges=edges, size_bytes=size
    )


def _edge_kind_fits(embedding: bool, kind: str) -> bool:
    """PEFT writes lora_embedding_A/B for the embeddings and lora_A/B for lm_head, never the reverse."""
    return kind == "lora_magnitude_vector" or kind.startswith("lora_embedding_") == embedding


def _module_weights(
    p: dict[str, torch.Tensor], module_name: str, peft: PeftLoraConfig, dtype: torch.dtype, edge: str = ""
) -> LoraModuleWeights:
    """One adapted module's tensors, checked against PEFT's targeting, rank and scale for it (the
    registry checked the same); `edge` names an embed_tokens / lm_head module."""
    if "lora_A" not in p or "lora_B" not in p:
        raise AdapterFormatError(f"{module_name} lacks lora_A or lora_B")
    a, b = p["lora_A"], p["lora_B"]
    r = int(a.shape[0])
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
        raise AdapterFormatError(f"{module_name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}")
    module = peft.module(module_name, linear=edge != "embed_tokens", output_layer=edge == "lm_head")
    if module is None:
        raise AdapterFormatError(
            f"the weights adapt {module_name}, which adapter_config.json does not target; "
            f"the config does not match the weights"
        )
    if module.rank != r:
        raise AdapterFormatError(
            f"adapter_config.json gives {module_name} rank {module.rank} (r / rank_pattern) "
            f"but its tensors have rank {r}"
        )
    magnitude = p.get("lora_magnitude_vector")
    if module.dora and magnitude is None:
        raise AdapterFormatError(f"DoRA adapter lacks the magnitude vector for {module_name}")
    if not module.dora and magnitude is not None:
        raise AdapterFormatError(
            f"{module_name} has a DoRA magnitude vector but adapter_config.json does not set use_dora"
        )
    return LoraModuleWeights(
        a=a.to(dtype).contiguous(),
        b=b.to(dtype).contiguous(),
        scale=module.scale,
        magnitude=None if magnitude is None else magnitude.to(dtype).reshape(-1),
    )
