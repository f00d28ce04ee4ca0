"""Decide whether a PEFT LoRA adapter can be served on a base model. Pure: data in, verdict out.

Every refusal is an `AdapterRejected` whose message says what is wrong and what to do about it.
The tensors are the ground truth: target modules and ranks come from their names and shapes,
and the config must agree with them (PEFT itself refuses to load an adapter where it does not).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from services.common.adapter_errors import AdapterRejected
from services.common.adapter_files import DEFAULT_MAX_HEADER_BYTES, SafetensorsHeader, TensorInfo
from services.common.model_spec import BaseModelSpec, TargetModule

Variant = Literal["LORA", "RSLORA", "DORA"]

WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")
# Config keys whose truthy values change what the weights mean; loraplex serves none of them.
_UNSUPPORTED_FEATURES: dict[str, str] = {
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "megatron_config": "Megatron-parallel layers",
}
_KNOWN_USE_FLAGS = {"use_dora", "use_rslora", *(k for k in _UNSUPPORTED_FEATURES if k.startswith("use_"))}
# Initialisations that subtract the adapter from the base weights: the adapter alone is not a delta.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

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

    def scale(self, module: str) -> float:
        """The factor PEFT applies to B(A(x)) for `module`."""
        r = self.module_ranks[module]
        alpha = self.module_alphas[module]
        return alpha / math.sqrt(r) if self.variant == "RSLORA" else alpha / r


@dataclass
class _Module:
    spec: TargetModule
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    magnitude: TensorInfo | None = None


def validate_adapter(
    config: Mapping[str, Any], header: SafetensorsHeader, base: BaseModelSpec, limits: AdapterLimits
) -> ValidatedAdapter:
    variant = _check_config(config, base)
    modules = _collect_modules(config, header, base)
    ranks: dict[str, int] = {}
    for path, module in sorted(modules.items()):
        ranks[path] = _check_module(path, module, variant, base)
    rank = max(ranks.values())
    if rank > limits.max_rank:
        worst = max(ranks, key=lambda p: ranks[p])
        raise AdapterRejected(
            f"the adapter has rank {rank} (at {worst}), over this registry's limit of {limits.max_rank}; "
            f"retrain it with r <= {limits.max_rank}."
        )
    alphas = _check_config_ranks(config, ranks)
    return ValidatedAdapter(
        rank=rank,
        variant=variant,
        lora_alpha=float(config["lora_alpha"]),
        target_modules=tuple(sorted({m.spec.name for m in modules.values()})),
        module_ranks=ranks,
        module_alphas=alphas,
    )


def _check_config(config: Mapping[str, Any], base: BaseModelSpec) -> Variant:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterRejected(
            f"adapter_config.json has peft_type {peft_type!r}; loraplex serves only LoRA adapters "
            f'(peft_type "LORA", including rsLoRA and DoRA).'
        )
    _check_base_name(config.get("base_model_name_or_path"), base)
    for key, feature in _UNSUPPORTED_FEATURES.items():
        if config.get(key):
            raise AdapterRejected(
                f"adapter_config.json enables {feature} ({key}), which loraplex does not serve; "
                f"train a plain LoRA, rsLoRA or DoRA adapter instead."
            )
    for key, value in config.items():
        if key.startswith("use_") and key not in _KNOWN_USE_FLAGS and value:
            raise AdapterRejected(
                f"adapter_config.json sets {key}={value!r}, a variant loraplex does not know; "
                f"it serves plain LoRA, rsLoRA (use_rslora) and DoRA (use_dora)."
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterRejected(
            f"adapter_config.json has bias={bias!r}; loraplex serves adapters that leave the base "
            f'model\'s biases frozen, so retrain with bias="none".'
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise AdapterRejected(
            f"the adapter was initialised with {init!r}, which also changes the base weights, so it is not "
            f"a delta on the shared base; convert it to a plain LoRA with PEFT's "
            f"save_pretrained(..., path_initial_model_for_weight_conversion=...)."
        )
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterRejected(f"adapter_config.json has lora_alpha={alpha!r}; it must be a number.")
    dora, rslora = bool(config.get("use_dora")), bool(config.get("use_rslora"))
    if dora and rslora:
        raise AdapterRejected(
            "adapter_config.json sets both use_dora and use_rslora; loraplex serves one variant at a "
            "time, so retrain with only one of them."
        )
    return "DORA" if dora else "RSLORA" if rslora else "LORA"


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


def _check_module(path: str, module: _Module, variant: Variant, base: BaseModelSpec) -> int:
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
    if variant == "DORA":
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


def _pattern_value(patterns: Mapping[str, Any], module_path: str, default: Any, key: str) -> Any:
    """PEFT's `get_pattern_key`: the first pattern that matches a dotted suffix of the path wins."""
    for pattern, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({pattern})$", module_path)
        except re.error as exc:
            raise AdapterRejected(
                f"{key} pattern {pattern!r} in adapter_config.json is not a valid regex ({exc})."
            ) from None
        if matched:
            return value
    return default


def _check_config_ranks(config: Mapping[str, Any], ranks: Mapping[str, int]) -> dict[str, float]:
    """The config's r / rank_pattern must describe the tensors; returns each module's lora_alpha."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterRejected("rank_pattern and alpha_pattern in adapter_config.json must be JSON objects.")
    alphas: dict[str, float] = {}
    for path, rank in ranks.items():
        expected = _pattern_value(rank_pattern, path, config.get("r"), "rank_pattern")
        if expected != rank:
            raise AdapterRejected(
                f"adapter_config.json gives {path} rank {expected!r} (r / rank_pattern) but its tensors "
                f"have rank {rank}; the config does not match the weights."
            )
        alpha = _pattern_value(alpha_pattern, path, config["lora_alpha"], "alpha_pattern")
        if not isinstance(alpha, int | float) or isinstance(alpha, bool):
            raise AdapterRejected(f"alpha_pattern gives {path} lora_alpha={alpha!r}; it must be a number.")
        alphas[path] = float(alpha)
    return alphas
