"""Decide whether a PEFT LoRA adapter can be served on a base model. Pure: data in, verdict out.

Every refusal is an `AdapterRejected` whose message says what is wrong and what to do about it.
The tensors say which layers are adapted and at what rank; adapter_config.json, read with PEFT's
own semantics by services.common.peft_config (the module the worker's loader uses too), must say
the same: the same layers targeted, the same ranks, and nothing loraplex does not serve.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.adapter_errors import AdapterRejected
from services.common.adapter_files import DEFAULT_MAX_HEADER_BYTES, DTYPE_BITS, SafetensorsHeader, TensorInfo
from services.common.model_spec import BaseModelSpec, TargetModule
from services.common.peft_config import PeftLoraConfig, Variant, block_module_name, parse_peft_config

WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")

_TENSOR_RE = re.compile(
    r"^base_model\.model\.(?P<module>.+)\."
    r"(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$"
)
# PEFT's names for an embedding LoRA's pair, read as a linear layer's (A [r, vocab], B [hidden, r]).
_EMBEDDING_KINDS = {"lora_embedding_A": "lora_A.weight", "lora_embedding_B": "lora_B.weight"}
# What each parameter costs on the device (bf16), for the modules_to_save sentence.
DEVICE_BYTES_PER_PARAM = 2


@dataclass(frozen=True)
class AdapterLimits:
    max_rank: int = 256
    max_bytes: int = 512 << 20
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # the worker's cap too
    max_config_bytes: int = 1 << 20


@dataclass(frozen=True)
class ValidatedAdapter:
    rank: int  # max over modules
    variant: Variant
    lora_alpha: float
    target_modules: tuple[str, ...]  # sorted PEFT names, e.g. ("q_proj", "v_proj")
    # Keyed by module path in the base model, e.g. "model.layers.0.self_attn.q_proj".
    module_ranks: dict[str, int]
    module_alphas: dict[str, float]
    module_scales: dict[str, float]

    def scale(self, module: str) -> float:
        """The factor PEFT applies to B(A(x)) for `module`."""
        return self.module_scales[module]


@dataclass
class _Module:
    spec: TargetModule
    embedding: bool = False  # PEFT's embedding LoRA: lora_embedding_A / lora_embedding_B
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    magnitude: TensorInfo | None = None


def validate_adapter(
    config: Mapping[str, Any], header: SafetensorsHeader, base: BaseModelSpec, limits: AdapterLimits
) -> ValidatedAdapter:
    _refuse_modules_to_save(config, base)
    peft = parse_peft_config(config)
    _check_base_name(config.get("base_model_name_or_path"), base)
    modules = _collect_modules(header, base)
    _check_targeting(peft, modules, base)
    ranks: dict[str, int] = {}
    for path, module in sorted(modules.items()):
        ranks[path] = _check_module(path, module, peft.use_dora, base)
    rank = max(ranks.values())
    if rank > limits.max_rank:
        worst = max(ranks, key=lambda p: ranks[p])
        raise AdapterRejected(
            f"the adapter has rank {rank} (at {worst}), over this registry's limit of {limits.max_rank}; "
            f"retrain it with r <= {limits.max_rank}."
        )
    for path, tensor_rank in ranks.items():
        expected = peft.rank(path)
        if expected != tensor_rank:
            raise AdapterRejected(
                f"adapter_config.json gives {path} rank {expected} (r / rank_pattern) but its tensors "
                f"have rank {tensor_rank}; the config does not match the weights."
            )
    return ValidatedAdapter(
        rank=rank,
        variant=peft.variant,
        lora_alpha=peft.lora_alpha,
        target_modules=tuple(sorted({m.spec.name for m in modules.values()})),
        module_ranks=ranks,
        module_alphas={path: peft.alpha(path) for path in ranks},
        module_scales={path: peft.scale(path) for path in ranks},
    )


def _check_targeting(peft: PeftLoraConfig, modules: Mapping[str, _Module], base: BaseModelSpec) -> None:
    """The config must target exactly the layers the tensors adapt (the block projections and the
    edges, embed_tokens and lm_head), and nothing loraplex cannot adapt: PEFT would silently drop
    tensors of untargeted layers and leave targeted layers without tensors at their initial
    values, so either mismatch means the files do not say one thing."""
    for name, linear, output_layer in _other_modules(base):
        if peft.targets(name, linear=linear, output_layer=output_layer):
            raise AdapterRejected(
                f"adapter_config.json's target_modules match {name}, which loraplex does not adapt (it "
                f"serves LoRA on the linear layers inside {base.layers_prefix}.N: "
                f"{', '.join(t.name for t in base.target_modules)}, and on embed_tokens and lm_head); "
                f"retrain without it."
            )
    paths = [
        (block_module_name(base.layers_prefix, layer, target.path), True, False)
        for layer in range(base.num_layers)
        for target in base.target_modules
    ]
    paths += [(e.path, e.name != "embed_tokens", e.name == "lm_head") for e in base.edge_modules()]
    for path, linear, output_layer in paths:
        targeted = peft.targets(path, linear=linear, output_layer=output_layer)
        if targeted and path not in modules:
            raise AdapterRejected(
                f"adapter_config.json targets {path} (target_modules / exclude_modules / "
                f"layers_to_transform) but adapter_model.safetensors has no lora_A / lora_B for it; "
                f"the config does not match the weights."
            )
        if not targeted and path in modules:
            raise AdapterRejected(
                f"adapter_model.safetensors adapts {path}, which adapter_config.json does not target "
                f"(target_modules / exclude_modules / layers_to_transform), so PEFT would ignore "
                f"those tensors; the config does not match the weights."
            )


def _other_modules(base: BaseModelSpec) -> list[tuple[str, bool, bool]]:
    """(full name, is linear, is the output layer) of the modules around the targetable layers,
    as a Llama-family model names them: the containers and the final norm."""
    parent = base.layers_prefix.rsplit(".", 1)[0] if "." in base.layers_prefix else ""
    outer = f"{parent}." if parent else ""
    names: list[tuple[str, bool, bool]] = [(f"{outer}norm", False, False), (base.layers_prefix, False, False)]
    if parent:
        names.append((parent, False, False))
    containers = sorted({t.path.rsplit(".", 1)[0] for t in base.target_modules if "." in t.path})
    for layer in range(base.num_layers):
        block = f"{base.layers_prefix}.{layer}"
        names.append((block, False, False))
        names.extend((f"{block}.{c}", False, False) for c in containers)
    return names


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def _check_base_name(trained_on: object, base: BaseModelSpec) -> None:
    """Compare a hub id ("org/name") with the chosen base; local paths name the trainer's disk only."""
    if not isinstance(trained_on, str) or not trained_on:
        return
    hub_like = re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", trained_on)
    if hub_like and _normalise(trained_on.rsplit("/", 1)[-1]) != _normalise(base.name):
        raise AdapterRejected(
            f"the adapter was trained on {trained_on!r} (base_model_name_or_path) but is being "
            f"registered for base model {base.name!r}; register it for the model it was trained on."
        )


def _collect_modules(header: SafetensorsHeader, base: BaseModelSpec) -> dict[str, _Module]:
    by_path = {m.path: m for m in base.target_modules}
    edges = {m.path: m for m in base.edge_modules()}
    layer_re = re.compile(rf"^{re.escape(base.layers_prefix)}\.(\d+)\.(.+)$")
    modules: dict[str, _Module] = {}
    for name, info in header.tensors.items():
        m = _TENSOR_RE.match(name)
        if m is None:
            raise AdapterRejected(
                _special_refusal(name, base, info)
                or f"tensor {name!r} is not a LoRA weight loraplex can serve; expected names like "
                f"base_model.model.<module>.lora_A.weight, as PEFT's save_pretrained writes them."
            )
        module_path, kind = m.group("module"), m.group("kind")
        if info.dtype not in WEIGHT_DTYPES:
            raise AdapterRejected(
                f"tensor {name!r} is {info.dtype}; LoRA weights must be one of {', '.join(WEIGHT_DTYPES)}."
            )
        edge = edges.get(module_path)
        if edge is not None:
            embedding = edge.name == "embed_tokens"
            if embedding != kind.startswith("lora_embedding_") and kind != "lora_magnitude_vector":
                expected = (
                    "lora_embedding_A / lora_embedding_B" if embedding else "lora_A.weight / lora_B.weight"
                )
                raise AdapterRejected(
                    f"tensor {name!r} is not how PEFT names a LoRA of {edge.name} (it writes {expected}); "
                    f"save the adapter with PEFT's save_pretrained."
                )
            module = modules.setdefault(module_path, _Module(edge, embedding=embedding))
            _set_tensor(module, _EMBEDDING_KINDS.get(kind, kind), info)
            continue
        if kind.startswith("lora_embedding_"):
            raise AdapterRejected(
                f"tensor {name!r} is an embedding LoRA of {module_path!r}, which is not the token "
                f"embeddings of {base.name} ({base.edge_modules()[0].path}); was this adapter trained "
                f"for another base model?"
            )
        layer = layer_re.match(module_path)
        if layer is None and (special := _special_refusal(name, base, info)):
            raise AdapterRejected(special)
        if layer is None or layer.group(2) not in by_path:
            targetable = ", ".join(t.name for t in base.target_modules)
            raise AdapterRejected(
                f"tensor {name!r} adapts {module_path!r}, which is not a LoRA-targetable layer of "
                f"{base.name} (its targetable modules are {targetable} inside {base.layers_prefix}.N); "
                f"was this adapter trained for another base model?"
            )
        index = int(layer.group(1))
        if index >= base.num_layers:
            raise AdapterRejected(
                f"tensor {name!r} is for layer {index} but {base.name} has {base.num_layers} layers "
                f"(0..{base.num_layers - 1}); was this adapter trained for another base model?"
            )
        module = modules.setdefault(module_path, _Module(by_path[layer.group(2)]))
        _set_tensor(module, kind, info)
    if not modules:
        raise AdapterRejected(
            "adapter_model.safetensors holds no LoRA tensors (lora_A / lora_B); save the adapter with "
            "PEFT's save_pretrained."
        )
    return modules


def _special_refusal(name: str, base: BaseModelSpec, info: TensorInfo) -> str | None:
    """A specific explanation for tensors of features loraplex does not serve, if one applies."""
    for edge in base.edge_modules():
        copies = (f"base_model.model.{edge.path}.weight", f"base_model.model.{edge.path}.base_layer.weight")
        if name in copies:
            size = _megabytes(info.numel * DTYPE_BITS[info.dtype] // 8)
            return (
                f"tensor {name!r} is a full copy of {edge.name} ({_params(info.numel)} parameters, "
                f"{size} in this file), which PEFT's save_pretrained adds "
                f"when target_modules names embed_tokens or lm_head (save_embedding_layers, on by default "
                f"then); loraplex serves the LoRA of those layers on the shared base without it, so save the "
                f"adapter again with save_pretrained(..., save_embedding_layers=False)."
            )
    if name.endswith(".bias"):
        return f"tensor {name!r} is a LoRA bias, which loraplex does not serve; retrain with lora_bias=False."
    return None


def _refuse_modules_to_save(config: Mapping[str, Any], base: BaseModelSpec) -> None:
    """modules_to_save puts a full trained copy of each named layer into every adapter: say what
    that costs on this base model next to a LoRA of the same layer."""
    raw = config.get("modules_to_save")
    if not raw:
        return
    costs: list[str] = []
    for entry in raw if isinstance(raw, list) else [raw]:
        found = _layer_sizes(str(entry), base)
        if found is None:
            continue
        params, in_out, count = found
        lora = 16 * in_out * count
        costs.append(
            f"{entry}: {_params(params)} parameters, {_megabytes(params * DEVICE_BYTES_PER_PARAM)} per "
            f"adapter in bf16, against {_megabytes(lora * DEVICE_BYTES_PER_PARAM)} for a rank-16 LoRA of it"
        )
    cost = f" (on {base.name}: {'; '.join(costs)})" if costs else ""
    raise AdapterRejected(
        f"adapter_config.json sets modules_to_save={raw!r}: PEFT then stores a full trained copy of each "
        f"of those layers in every adapter{cost}. loraplex keeps adapters as low-rank deltas on one "
        f"shared base, and a full copy per adapter would fill its device and host tiers with a few "
        f"adapters; train a LoRA on those layers instead (list them in target_modules: embed_tokens and "
        f"lm_head are served)."
    )


def _layer_sizes(entry: str, base: BaseModelSpec) -> tuple[int, int, int] | None:
    """(parameters of the layers a modules_to_save entry names, in + out of one, how many), where
    loraplex knows the layer: the embeddings, lm_head, or a projection of every block."""
    last = entry.rsplit(".", 1)[-1]
    for edge in base.edge_modules():
        if last == edge.name:
            return edge.in_features * edge.out_features, edge.in_features + edge.out_features, 1
    target = base.module(last)
    if target is None:
        return None
    one = target.in_features * target.out_features
    return one * base.num_layers, target.in_features + target.out_features, base.num_layers


def _params(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1_000_000 else f"{count:,}"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _set_tensor(module: _Module, kind: str, info: TensorInfo) -> None:
    if kind == "lora_A.weight":
        module.a = info
    elif kind == "lora_B.weight":
        module.b = info
    else:
        module.magnitude = info


def _shape(info: TensorInfo) -> str:
    return str(list(info.shape))


def _check_module(path: str, module: _Module, dora: bool, base: BaseModelSpec) -> int:
    spec = module.spec
    prefix = f"base_model.model.{path}"
    a_name, b_name = "lora_A.weight", "lora_B.weight"
    if module.embedding:
        a_name, b_name = "lora_embedding_A", "lora_embedding_B"
    if module.a is None or module.b is None:
        missing = a_name if module.a is None else b_name
        raise AdapterRejected(
            f"{path} has no {missing} tensor; every adapted layer needs both its LoRA A and B, "
            f"so the file is incomplete."
        )
    a, b = module.a, module.b
    inputs, outputs = ("vocab", "hidden") if module.embedding else ("inputs", "outputs")
    if len(a.shape) != 2 or a.shape[0] < 1:
        raise AdapterRejected(f"tensor {prefix}.{a_name} has shape {_shape(a)}; expected [rank, {inputs}].")
    if len(b.shape) != 2:
        raise AdapterRejected(f"tensor {prefix}.{b_name} has shape {_shape(b)}; expected [{outputs}, rank].")
    rank = a.shape[0]
    if a.shape[1] != spec.in_features:
        takes = (
            f"has a vocabulary of {spec.in_features} tokens (expected [rank, {spec.in_features}])"
            if module.embedding
            else f"takes {spec.in_features} inputs"
        )
        raise AdapterRejected(
            f"tensor {prefix}.{a_name} has shape {_shape(a)} but {spec.name} of {base.name} {takes}: "
            f"was this adapter trained for another base model?"
        )
    if b.shape[0] != spec.out_features:
        gives = (
            f"has {spec.out_features} hidden dimensions (expected [{spec.out_features}, rank])"
            if module.embedding
            else f"has {spec.out_features} outputs"
        )
        raise AdapterRejected(
            f"tensor {prefix}.{b_name} has shape {_shape(b)} but {spec.name} of {base.name} {gives}: "
            f"was this adapter trained for another base model?"
        )
    if b.shape[1] != rank:
        raise AdapterRejected(
            f"{path} has {a_name.removesuffix('.weight')} of rank {rank} but "
            f"{b_name.removesuffix('.weight')} of rank {b.shape[1]}; the ranks of a pair must match, so "
            f"the file is inconsistent."
        )
    if dora:
        mag = module.magnitude
        if mag is None:
            raise AdapterRejected(
                f"{path} has no lora_magnitude_vector although use_dora is set; the DoRA adapter is "
                f"incomplete."
            )
        if mag.shape != (spec.out_features,):
            raise AdapterRejected(
                f"tensor {prefix}.lora_magnitude_vector has shape {_shape(mag)} but {spec.name} of "
                f"{base.name} has {spec.out_features} outputs: was this adapter trained for another "
                f"base model?"
            )
    elif module.magnitude is not None:
        raise AdapterRejected(
            f"{path} has a DoRA lora_magnitude_vector but adapter_config.json does not set use_dora; "
            f"the config does not match the weights."
        )
    return rank
