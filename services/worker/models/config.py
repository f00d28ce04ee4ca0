"""Reading a Hugging Face config.json into the engine's model config, one reader per family.

Every field the engine relies on is read here and nowhere else: the worker's loader and
`loraplex models import` both call `read_config`, so a directory import accepts is one a worker
loads. A field the engine does not implement (a RoPE variant, an activation, a sliding-window
layout) is refused with a sentence naming the field, rather than silently computing something
else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


class UnsupportedModelError(ValueError):
    """A config the engine cannot serve; the message names the field and what is supported."""


@dataclass(frozen=True)
class RopeScaling:
    """`rope_type: llama3` frequency scaling (Llama 3.1+); `factor` 1 with no bands means none."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int


@dataclass(frozen=True)
class LongRope:
    """`rope_type: longrope` (Phi-3 / Phi-4-mini long-context), as transformers computes it.

    Two frequency sets, each the default one divided per frequency by a factor: `short_factor`
    for sequences within the pretraining context (`original_max_positions`), `long_factor`
    beyond it (layers/rotary.py says which token uses which). cos and sin are both multiplied by
    `attention_factor`."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_positions: int
    attention_factor: float


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int  # the leading dims of each head that RoPE rotates (head_dim unless partial)
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    longrope: LongRope | None  # Phi only; with it, rope_scaling is None
    max_positions: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    sliding_window: int | None  # keys further back than this many positions are not attended
    eos_token_ids: tuple[int, ...]


Raw = dict[str, Any]


def _refuse(field: str, value: object, supported: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"config field {field} = {value!r} is not supported; {supported}")


def _rope(c: Raw, allowed: tuple[str, ...], partial_ok: bool) -> tuple[float, float, str, Raw]:
    """(rope_theta, partial_rotary_factor, rope type, its parameters) from `rope_parameters`
    (transformers 5) or `rope_scaling` (older).

    A config may carry both (an old config re-saved); each present one must be supported, so a
    scaling the engine would ignore is refused rather than silently dropped."""
    present: list[tuple[str, Raw, str]] = []
    for field in ("rope_parameters", "rope_scaling"):
        params = c.get(field) or {}
        kind = params.get("rope_type", params.get("type")) or "default"
        if kind == "su" and "longrope" in allowed:  # early Phi-3 configs' name for it (as in transformers)
            kind = "longrope"
        if kind not in allowed:
            raise _refuse(f"{field}.rope_type", kind, f"this family supports {', '.join(allowed)}")
        if params:
            present.append((field, params, kind))
    # A scaled one wins over a plain one (rope_parameters may hold only rope_theta).
    present.sort(key=lambda p: p[2] == "default")
    _, rope, kind = present[0] if present else ("", {}, "default")
    partial = rope.get("partial_rotary_factor") or c.get("partial_rotary_factor") or 1.0
    if partial != 1.0 and not partial_ok:
        raise _refuse("partial_rotary_factor", partial, "this family rotates the whole head (1.0)")
    theta = float(rope.get("rope_theta") or c.get("rope_theta") or 10000.0)
    return theta, float(partial), kind, rope


def _llama3_scaling(rope: Raw) -> RopeScaling:
    return RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_positions=int(rope["original_max_position_embeddings"]),
    )


def _longrope(c: Raw, rope: Raw, rotary_dim: int) -> LongRope:
    """As transformers' `_compute_longrope_parameters` with Phi3Config: the top-level
    `original_max_position_embeddings` (Phi3Config's default 4096 when absent) wins over the one
    in the RoPE dict; `factor`, when absent, is max_position_embeddings / original; and
    `attention_factor`, when absent, is sqrt(1 + ln factor / ln original) (1 for factor <= 1)."""
    original = int(c.get("original_max_position_embeddings") or 4096)
    factors = {}
    for field in ("short_factor", "long_factor"):
        value = rope[field]
        if not isinstance(value, list) or len(value) != rotary_dim // 2:
            raise _refuse(
                f"rope_parameters.{field}",
                value,
                f"it must list {rotary_dim // 2} numbers (one per rotated pair)",
            )
        factors[field] = tuple(float(v) for v in value)
    factor = rope.get("factor")
    if factor is None:
        factor = c.get("max_position_embeddings", 2048) / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return LongRope(
        short_factor=factors["short_factor"],
        long_factor=factors["long_factor"],
        original_max_positions=original,
        attention_factor=float(attention_factor),
    )


def _eos(c: Raw, model_dir: Path) -> tuple[int, ...]:
    eos = c.get("eos_token_id")
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    return tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _common(
    c: Raw,
    model_dir: Path,
    rope_types: tuple[str, ...],
    *,
    qkv_bias: bool,
    o_bias: bool,
    partial_rotary: bool = False,
) -> ModelConfig:
    """The fields every Llama-style family shares: a SiLU-gated MLP without biases, RMSNorm, RoPE."""
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse("hidden_act", act, "this family's MLP is SiLU-gated")
    if c.get("mlp_bias"):
        raise _refuse("mlp_bias", True, "the MLP projections have no bias")
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if c.get(field) is not None:
            raise _refuse(field, c[field], "this family has no soft-capping (Gemma 3 caps final logits)")
    theta, partial, kind, rope = _rope(c, rope_types, partial_rotary)
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or rotary_dim < 2:
        raise _refuse(
            "partial_rotary_factor", partial, f"it must rotate an even number of the {head_dim} dims"
        )
    return ModelConfig(
        architecture=c["architectures"][0],
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=_llama3_scaling(rope) if kind == "llama3" else None,
        longrope=_longrope(c, rope, rotary_dim) if kind == "longrope" else None,
        max_positions=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        sliding_window=None,
        eos_token_ids=_eos(c, model_dir),
    )


def _no_qwen_sliding(c: Raw) -> None:
    full = "Qwen models are served with full attention in every layer"
    if c.get("use_sliding_window"):
        raise _refuse("use_sliding_window", True, full)
    kinds = set(c.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise _refuse("layer_types", sorted(kinds), full)


def read_llama(c: Raw, model_dir: Path) -> ModelConfig:
    bias = bool(c.get("attention_bias", False))  # Llama puts it on q/k/v and o alike
    return _common(c, model_dir, ("default", "llama3"), qkv_bias=bias, o_bias=bias)


def read_mistral(c: Raw, model_dir: Path) -> ModelConfig:
    if c.get("layer_types"):
        raise _refuse("layer_types", c["layer_types"], "Mistral's window covers every layer (no layer_types)")
    cfg = _common(c, model_dir, ("default",), qkv_bias=False, o_bias=False)
    window = c.get("sliding_window")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise _refuse("sliding_window", window, "it must be a positive number of tokens or null")
    return replace(cfg, sliding_window=window)


def read_qwen2(c: Raw, model_dir: Path) -> ModelConfig:
    _no_qwen_sliding(c)
    return _common(c, model_dir, ("default",), qkv_bias=True, o_bias=False)  # Qwen2: q/k/v biases only


def read_qwen3(c: Raw, model_dir: Path) -> ModelConfig:
    _no_qwen_sliding(c)
    bias = bool(c.get("attention_bias", False))
    return _common(c, model_dir, ("default",), qkv_bias=bias, o_bias=bias)


def read_phi3(c: Raw, model_dir: Path) -> ModelConfig:
    """Phi-3 / Phi-4-mini: fused qkv_proj and gate_up_proj (models/phi3.py), partial rotary,
    `longrope` scaling, a sliding window over every layer when the config sets one (Phi-3-mini: 2047)."""
    cfg = _common(c, model_dir, ("default", "longrope"), qkv_bias=False, o_bias=False, partial_rotary=True)
    window = c.get("sliding_window")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise _refuse("sliding_window", window, "it must be a positive number of tokens or null")
    return replace(cfg, sliding_window=window)


@dataclass(frozen=True)
class Gemma3Config(ModelConfig):
    sliding_layers: tuple[bool, ...]  # per layer: local (sliding window) or global attention
    local_rope_theta: float
    query_pre_attn_scalar: float
    final_logit_softcapping: float | None


def read_gemma3(c: Raw, model_dir: Path) -> Gemma3Config:
    """Gemma 3 text models (model_type gemma3_text; Gemma 3 1B is one)."""
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise _refuse("hidden_activation", act, "Gemma 3's MLP is GELU (tanh approximation)-gated")
    for field in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if c.get(field):
            raise _refuse(field, c[field], "Gemma 3 text models are served without it")
    layers = c["num_hidden_layers"]
    pattern = c.get("sliding_window_pattern", 6)  # older configs: every 6th layer is global
    kinds = c.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
    ]
    if set(kinds) - {"sliding_attention", "full_attention"} or len(kinds) != layers:
        raise _refuse("layer_types", kinds, "one of sliding_attention / full_attention per layer")
    rope = c.get("rope_parameters") or {}
    if "full_attention" in rope or "sliding_attention" in rope:  # transformers 5: per layer type
        global_rope, local_rope = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    else:
        global_rope = {**(c.get("rope_scaling") or {}), "rope_theta": c.get("rope_theta", 1e6)}
        local_rope = {"rope_theta": c.get("rope_local_base_freq", 10000.0)}
    for kind, params in (("full_attention", global_rope), ("sliding_attention", local_rope)):
        rope_type = params.get("rope_type", params.get("type")) or "default"
        if rope_type != "default":
            raise _refuse(f"rope_parameters.{kind}.rope_type", rope_type, "Gemma 3 text models use default")
    heads = c["num_attention_heads"]
    bias = bool(c.get("attention_bias", False))
    return Gemma3Config(
        architecture=c["architectures"][0],
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        rotary_dim=c.get("head_dim") or c["hidden_size"] // heads,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(global_rope.get("rope_theta") or 1e6),
        rope_scaling=None,
        longrope=None,
        max_positions=c.get("max_position_embeddings", 131072),
        tie_word_embeddings=c.get("tie_word_embeddings", True),
        qkv_bias=bias,
        o_bias=bias,
        sliding_window=c.get("sliding_window"),
        eos_token_ids=_eos(c, model_dir),
        sliding_layers=tuple(k == "sliding_attention" for k in kinds),
        local_rope_theta=float(local_rope.get("rope_theta") or 10000.0),
        query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", 256)),
        final_logit_softcapping=c.get("final_logit_softcapping"),
    )


# architectures[0] -> its reader. The model class for each is chosen in models/families.py.
READERS: dict[str, Callable[[Raw, Path], ModelConfig]] = {
    "LlamaForCausalLM": read_llama,
    "MistralForCausalLM": read_mistral,
    "Qwen2ForCausalLM": read_qwen2,
    "Qwen3ForCausalLM": read_qwen3,
    "Phi3ForCausalLM": read_phi3,
    "Gemma3ForCausalLM": read_gemma3,
}


def read_config(model_dir: Path) -> ModelConfig:
    c: Raw = json.loads((model_dir / "config.json").read_text())
    architectures = c.get("architectures") or []
    arch = architectures[0] if architectures else None
    reader = READERS.get(arch) if isinstance(arch, str) else None
    if reader is None:
        raise _refuse("architectures[0]", arch, f"supported architectures: {', '.join(READERS)}")
    try:
        return reader(c, model_dir)
    except KeyError as exc:
        raise UnsupportedModelError(f"config.json lacks the field {exc.args[0]}, needed by {arch}") from None
