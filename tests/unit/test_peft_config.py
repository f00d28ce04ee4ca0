"""services.common.peft_config against PEFT itself: its own matching functions on many cases, and
the LoRA layers (r, scaling, DoRA) get_peft_model really creates on a tiny Llama for each form."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key as peft_get_pattern_key

from services.common.adapter_errors import AdapterRejected
from services.common.peft_config import get_pattern_key, parse_peft_config

LAYERS = 4
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LINEARS = [f"model.layers.{i}.{p}" for i in range(LAYERS) for p in BLOCK_LINEARS]
# The edges, (is linear, is the output layer) each: PEFT's embedding LoRA and lm_head's linear one.
EDGES = {"model.embed_tokens": (False, False), "lm_head": (True, True)}
OTHERS = [
    "model",
    "model.layers",
    "model.norm",
    "model.rotary_emb",
    *(f"model.layers.{i}{s}" for i in range(LAYERS) for s in ("", ".self_attn", ".mlp", ".mlp.act_fn")),
]

PATTERN_KEYS = [
    "q_proj",
    "self_attn.q_proj",
    "mlp.down_proj",
    "down_proj",
    "model.layers.3.mlp.down_proj",
    "layers.3.self_attn.q_proj",
    "layers.1.self_attn.v_proj",
    "3.self_attn.q_proj",
    "proj",
    "_proj",
    r"layers\.[02]\.mlp\..*",
    ".*attn.*",
    "self_attn",
    "q_proj|v_proj",
    "q_proj$",
    "^model.layers.0.self_attn.k_proj",
    "model.layers.1",
    "layers.1.",
    "o_pro",
    ".",
]


@pytest.mark.parametrize("name", [*LINEARS, *OTHERS, *EDGES, "q_proj", ""])
def test_pattern_keys_resolve_as_peft_get_pattern_key_resolves_them(name: str) -> None:
    # Every order of a few keys, since the first match wins: all pairs, both ways.
    for keys in itertools.permutations(PATTERN_KEYS, 2):
        assert get_pattern_key(keys, name) == peft_get_pattern_key(keys, name), (keys, name)
    assert get_pattern_key(PATTERN_KEYS, name) == peft_get_pattern_key(PATTERN_KEYS, name)


def test_dotted_and_per_layer_keys_pick_the_modules_peft_picks() -> None:
    """The bug this module fixes: the worker searched keys in a path without self_attn / mlp."""
    config = parse_peft_config(
        {
            "peft_type": "LORA",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"layers.3.self_attn.q_proj": 16, "self_attn.q_proj": 8},
            "alpha_pattern": {"mlp.down_proj": 32, "model.layers.1.self_attn.v_proj": 2},
        }
    )
    assert config.rank("model.layers.3.self_attn.q_proj") == 16
    assert config.rank("model.layers.0.self_attn.q_proj") == 8
    assert config.rank("model.layers.0.self_attn.v_proj") == 4
    assert config.alpha("model.layers.2.mlp.down_proj") == 32.0
    assert config.alpha("model.layers.1.self_attn.v_proj") == 2.0
    assert config.alpha("model.layers.0.self_attn.v_proj") == 8.0
    assert config.scale("model.layers.3.self_attn.q_proj") == 8 / 16
    assert config.scale("model.layers.2.mlp.down_proj") == 32 / 4


# (keyword arguments of LoraConfig) for every targeting form loraplex serves.
FORMS: dict[str, dict[str, Any]] = {
    "list": {"target_modules": ["q_proj", "v_proj", "down_proj"]},
    "list-dotted": {"target_modules": ["self_attn.o_proj", "mlp.up_proj"]},
    "list-full-names": {
        "target_modules": ["model.layers.1.self_attn.q_proj", "model.layers.2.mlp.gate_proj"]
    },
    "all-linear": {"target_modules": "all-linear"},
    "all-linear-excluded": {"target_modules": "all-linear", "exclude_modules": ["k_proj", "mlp.up_proj"]},
    "regex": {"target_modules": r".*\.layers\.[13]\.(self_attn\.(q|k)_proj|mlp\.down_proj)"},
    "regex-excluded": {"target_modules": r".*_proj", "exclude_modules": r".*layers\.0\..*"},
    "layers": {"target_modules": ["q_proj", "gate_proj"], "layers_to_transform": [0, 2]},
    "layers-dotted-and-full-names": {
        # A full name escapes the layer filter (PEFT's `key in target_modules`); suffixes do not.
        "target_modules": ["self_attn.q_proj", "mlp.down_proj", "model.layers.1.self_attn.v_proj"],
        "layers_to_transform": [0, 2],
    },
    "layer-int": {"target_modules": ["v_proj", "down_proj"], "layers_to_transform": 3},
    "layers-pattern": {
        "target_modules": ["k_proj", "up_proj"],
        "layers_to_transform": [1, 3],
        "layers_pattern": "layers",
    },
    "patterns": {
        "target_modules": "all-linear",
        "rank_pattern": {"self_attn.q_proj": 8, "model.layers.3.mlp.down_proj": 16, "v_proj": 2},
        "alpha_pattern": {"mlp.down_proj": 32, "layers.1.self_attn.q_proj": 3, r"layers\.2\..*": 5},
    },
    "rslora-patterns": {
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "use_rslora": True,
        "rank_pattern": {"layers.0.self_attn.v_proj": 16},
        "alpha_pattern": {"q_proj": 4},
    },
    "dora": {"target_modules": ["q_proj", "o_proj"], "use_dora": True, "alpha_pattern": {"o_proj": 2}},
    "dora-rslora": {"target_modules": ["up_proj"], "use_dora": True, "use_rslora": True, "r": 16},
    "edges": {"target_modules": ["embed_tokens", "lm_head", "q_proj"]},
    "edges-regex": {"target_modules": r".*(embed_tokens|lm_head|v_proj)"},
    "edges-patterns": {
        "target_modules": ["embed_tokens", "lm_head", "down_proj"],
        "rank_pattern": {"lm_head": 8, "embed_tokens": 2},
        "alpha_pattern": {"model.embed_tokens": 32},
    },
    "edges-rslora-dora": {
        "target_modules": ["embed_tokens", "lm_head"],
        "use_rslora": True,
        "use_dora": True,
    },
    # Neither edge has a layer index, so the layer filter leaves only q_proj of layer 1.
    "edges-layers": {"target_modules": ["embed_tokens", "lm_head", "q_proj"], "layers_to_transform": [1]},
}


@functools.cache
def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def _saved_config(config: LoraConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        return dict(json.loads((Path(tmp) / "adapter_config.json").read_text()))


@pytest.mark.parametrize("form", FORMS)
def test_targets_ranks_and_scales_are_what_get_peft_model_builds(form: str) -> None:
    """The reference is PEFT loading the saved adapter (PeftModel.from_pretrained), which is what
    an adapter on disk means: save_pretrained writes the config with sorted keys, so the order in
    which rank/alpha_pattern keys are tried is the file's, not the one the trainer wrote."""
    kwargs = {"r": 4, "lora_alpha": 8, **FORMS[form]}
    as_written = _saved_config(LoraConfig(**kwargs))
    trained = get_peft_model(copy.deepcopy(_tiny_llama()), LoraConfig(**kwargs))
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_pretrained(tmp)
        # What save_pretrained writes after injection ("all-linear" expanded to names) reads the same.
        as_saved = dict(json.loads((Path(tmp) / "adapter_config.json").read_text()))
        model = PeftModel.from_pretrained(copy.deepcopy(_tiny_llama()), tmp)
    built = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert built, form
    for doc in (as_written, as_saved):
        ours = parse_peft_config(doc)
        for name, (linear, output_layer) in [*((n, (True, False)) for n in LINEARS), *EDGES.items()]:
            mine = ours.module(name, linear=linear, output_layer=output_layer)
            layer = built.get(name)
            assert (mine is not None) == (layer is not None), (form, name)
            if mine is None or layer is None:
                continue
            assert mine.rank == layer.r["default"], (form, name)
            assert mine.alpha == layer.lora_alpha["default"], (form, name)
            assert math.isclose(mine.scale, layer.scaling["default"], rel_tol=1e-12), (form, name)
            assert mine.dora == layer.use_dora["default"], (form, name)
        for name in OTHERS:
            assert not ours.targets(name, linear=False), (form, name)


@pytest.mark.parametrize("form", [f for f in FORMS if "all-linear" not in FORMS[f].values()])
def test_targets_agree_with_check_target_module_exists_on_every_module(form: str) -> None:
    peft_config = LoraConfig(**{"r": 4, "lora_alpha": 8, **FORMS[form]})
    ours = parse_peft_config(_saved_config(peft_config))
    for name in [*LINEARS, *OTHERS, *EDGES]:
        assert ours.targets(name) == bool(check_target_module_exists(peft_config, name)), (form, name)


def test_a_config_that_targets_containers_or_lm_head_says_so() -> None:
    ours = parse_peft_config({"peft_type": "LORA", "target_modules": ["self_attn", "lm_head"]})
    assert ours.targets("model.layers.0.self_attn", linear=False)
    assert ours.targets("lm_head", linear=True, output_layer=True)
    assert not ours.targets("model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"use_qalora": True}, "(use_qalora)"),
        ({"lora_bias": True}, "(lora_bias)"),
        ({"modules_to_save": ["lm_head"]}, "(modules_to_save)"),
        ({"layer_replication": [[0, 2]]}, "(layer_replication)"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "(target_parameters)"),
        ({"trainable_token_indices": [1, 2]}, "(trainable_token_indices)"),
        ({"megatron_config": {"tp": 2}}, "(megatron_config)"),
        ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
        ({"bias": "all"}, "bias='all'"),
        ({"r": 0}, "r=0"),
        ({"use_dora": "yes"}, "use_dora='yes'"),
        ({"alpha_pattern": {"q_proj": "x"}}, "lora_alpha='x'"),
        ({"exclude_modules": 3}, "exclude_modules=3"),
        ({"layers_to_transform": "0"}, "layers_to_transform='0'"),
        ({"brand_new_option": 2}, "brand_new_option=2"),
    ],
)
def test_fields_that_change_the_math_are_refused_with_their_name(
    changes: dict[str, Any], phrase: str
) -> None:
    doc = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **changes}
    with pytest.raises(AdapterRejected) as info:
        parse_peft_config(doc)
    assert phrase in str(info.value)


def test_every_field_peft_writes_by_default_is_accepted() -> None:
    """A config with every LoraConfig field at PEFT's default, as save_pretrained writes it."""
    doc = _saved_config(LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True))
    ours = parse_peft_config(doc)
    # fan_in_fan_out: PEFT sets it back to False on nn.Linear, so it changes nothing.
    assert ours.module("model.layers.0.self_attn.q_proj") is not None
    assert ours.variant == "LORA"


@pytest.mark.parametrize(
    "changes",
    [
        {"target_modules": r"(.*)*x"},
        {"exclude_modules": r"(.*)*x"},
        {"rank_pattern": {r"(.*)*x": 4}},
        {"alpha_pattern": {r"(\w|.)*\d{3}x": 4}},
    ],
)
def test_a_pattern_that_backtracks_exponentially_is_refused_in_bounded_time(changes: dict[str, Any]) -> None:
    """With `re`, as PEFT matches, "(.*)*x" takes ~0.5 s on 22 characters and doubles with each
    one more: minutes on a module name, with the GIL held. The registry must not be made to hang."""
    doc = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **changes}
    config = parse_peft_config(doc)
    name = "model.layers.10.self_attn.q_proj.base_layer"  # 44 characters
    started = time.monotonic()
    try:
        module = config.module(name)
    except AdapterRejected as exc:
        assert "simplify" in str(exc)
    else:
        assert module is None or module.rank == 4
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    ("targets", "refused"),
    [
        (["embed_tokens", "q_proj"], True),
        (["model.lm_head"], True),
        (".*lm_head", True),
        (["q_proj", "v_proj"], False),  # PEFT only warns: no embedding layer is adapted
        ("all-linear", False),
    ],
)
def test_ensure_weight_tying_is_refused_where_it_ties_embedding_adapters(
    targets: object, refused: bool
) -> None:
    doc = {"peft_type": "LORA", "r": 4, "target_modules": targets, "ensure_weight_tying": True}
    if not refused:
        parse_peft_config(doc)
        return
    with pytest.raises(AdapterRejected, match="ensure_weight_tying=False"):
        parse_peft_config(doc)
