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
from services.common.adapter_files import DEFAULT_MAX_HEADER_BYTES, SafetensorsHeader, TensorInfo
from services.common.model_spec import BaseModelSpec, TargetModule
from services.common.peft_config import PeftLoraConfig, Variant, block_module_name, parse_peft_config

WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")

_TENSOR_RE = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)


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
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    magnitude: TensorInfo | None = None


def validate_adapter(
    config: Mapping[str, Any], header: SafetensorsHeader, base: BaseModelSpec, limits: AdapterLimits
) -> ValidatedAdapter:
    peft = parse_peft_config(config)
    _check_base_name(config.get("base_model_name_or_path"), base)
    modules = _collect_modules(config, header, base)
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
    """The config must target exactly the layers the tensors adapt, and nothing loraplex cannot
    adapt: PEFT would silently drop tensors of untargeted layers and leave targeted layers without
    tensors at their initial values, so either mismatch means the files do not say one thing."""
    for name, linear, output_layer in _other_modules(base):
        if peft.targets(name, linear=linear, output_layer=output_layer):
            raise AdapterRejected(
                f"adapter_config.json's target_modules match {name}, which loraplex does not adapt (it "
                f"serves LoRA on the linear layers inside {base.layers_prefix}.N: "
                f"{', '.join(t.name for t in base.target_modules)}); retrain without it."
            )
    for layer in range(base.num_layers):
        for target in base.target_modules:
            path = block_module_name(base.layers_prefix, layer, target.path)
            targeted = peft.targets(path)
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
    """(full name, is linear, is the output layer) of the modules around the targetable linears,
    as a Llama-family model names them: the containers, the embeddings, the final norm, lm_head."""
    parent = base.layers_prefix.rsplit(".", 1)[0] if "." in base.layers_prefix else ""
    outer = f"{parent}." if parent else ""
    names: list[tuple[str, bool, bool]] = [
        (f"{outer}embed_tokens", False, False),
        (f"{outer}norm", False, False),
        ("lm_head", True, True),
        (base.layers_prefix, False, False),
    ]
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


def _collect_modules(
    config: Mapping[str, Any], header: SafetensorsHeader, base: BaseModelSpec
) -> dict[str, _Module]:
    by_path = {m.path: m for m in base.target_modules}
    layer_re = re.compile(rf"^{re.escape(base.layers_prefix)}\.(\d+)\.(.+)$")
    modules: dict[str, _Module] = {}
    for name, info in header.tensors.items():
        m = _TENSOR_RE.match(name)
        if m is None:
            raise AdapterRejected(
                _special_refusal(name, config)
                or f"tensor {name!r} is not a LoRA weight loraplex can serve; expected names like "
                f"base_model.model.<module>.lora_A.weight, as PEFT's save_pretrained writes them."
            )
        module_path, kind = m.group("module"), m.group("kind")
        layer = layer_re.match(module_path)
        if layer is None and (special := _special_refusal(name, config)):
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
        if info.dtype not in WEIGHT_DTYPES:
            raise AdapterRejected(
                f"tensor {name!r} is {info.dtype}; LoRA weights must be one of {', '.join(WEIGHT_DTYPES)}."
            )
        module = modules.setdefault(module_path, _Module(by_path[layer.group(2)]))
        if kind == "lora_A.weight":
            module.a = info
        elif kind == "lora_B.weight":
            module.b = info
        else:
            module.magnitude = info
    if not modules:
        raise AdapterRejected(
            "adapter_model.safetensors holds no LoRA tensors (lora_A / lora_B); save the adapter with "
            "PEFT's save_pretrained."
        )
    return modules


def _special_refusal(name: str, config: Mapping[str, Any]) -> str | None:
    """A specific explanation for tensors of features loraplex does not serve, if one applies."""
    if config.get("modules_to_save") and ".lora_" not in name:
        return (
            f"tensor {name!r} is a fully trained copy of a module (modules_to_save="
            f"{config['modules_to_save']!r}); loraplex serves only LoRA deltas on a shared base, so "
            f"retrain without modules_to_save."
        )
    if "lora_embedding_" in name or ".embed_tokens." in name:
        return (
            f"tensor {name!r} adapts the token embeddings, which loraplex does not serve; target only "
            f"the attention and MLP projections."
        )
    if ".lm_head." in name:
        return (
            f"tensor {name!r} adapts lm_head, which loraplex does not serve; target only the attention "
            f"and MLP projections."
        )
    if name.endswith(".bias"):
        return f"tensor {name!r} is a LoRA bias, which loraplex does not serve; retrain with lora_bias=False."
    return None


def _shape(info: TensorInfo) -> str:
    return str(list(info.shape))


def _check_module(path: str, module: _Module, dora: bool, base: BaseModelSpec) -> int:
    spec = module.spec
    prefix = f"base_model.model.{path}"
    if module.a is None or module.b is None:
        missing = "lora_A" if module.a is None else "lora_B"
        raise AdapterRejected(
            f"{path} has no {missing}.weight tensor; every adapted layer needs both lora_A and lora_B, "
            f"so the file is incomplete."
        )
    a, b = module.a, module.b
    if len(a.shape) != 2 or a.shape[0] < 1:
        raise AdapterRejected(
            f"tensor {prefix}.lora_A.weight has shape {_shape(a)}; expected [rank, inputs]."
        )
    if len(b.shape) != 2:
        raise AdapterRejected(
            f"tensor {prefix}.lora_B.weight has shape {_shape(b)}; expected [outputs, rank]."
        )
    rank = a.shape[0]
    if a.shape[1] != spec.in_features:
        raise AdapterRejected(
            f"tensor {prefix}.lora_A.weight has shape {_shape(a)} but {spec.name} of {base.name} takes "
            f"{spec.in_features} inputs: was this adapter trained for another base model?"
        )
    if b.shape[0] != spec.out_features:
        raise AdapterRejected(
            f"tensor {prefix}.lora_B.weight has shape {_shape(b)} but {spec.name} of {base.name} has "
            f"{spec.out_features} outputs: was this adapter trained for another base model?"
        )
    if b.shape[1] != rank:
        raise AdapterRejected(
            f"{path} has lora_A of rank {rank} but lora_B of rank {b.shape[1]}; the ranks of a pair "
            f"must match, so the file is inconsistent."
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
