"""validate_adapter on real PEFT adapters of a tiny Llama, and on the ways they can be wrong."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest
from peft import LoraConfig

from services.common.adapter_errors import AdapterRejected
from services.common.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    SafetensorsHeader,
    TensorInfo,
    read_safetensors_header,
)
from services.registry.validation import AdapterLimits, ValidatedAdapter, validate_adapter
from tests.fixtures.tiny_peft import HIDDEN, TINY_NAME, VOCAB, tiny_spec, write_adapter

LIMITS = AdapterLimits()
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], SafetensorsHeader]]:
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for kind in ("lora", "rslora", "dora", "mixed", "one_layer", "edges", "edges_dora", "edges_with_copies"):
        directory = write_adapter(kind, root / kind)
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        out[kind] = (config, read_safetensors_header(directory / ADAPTER_WEIGHTS))
    return out


def config_of(adapters: dict[str, Any], kind: str, **changes: Any) -> dict[str, Any]:
    return {**adapters[kind][0], **changes}


def header_with(header: SafetensorsHeader, name: str, info: TensorInfo | None) -> SafetensorsHeader:
    """A copy of `header` with one tensor replaced, or removed when info is None."""
    new = dict(header.tensors)
    if info is None:
        del new[name]
    else:
        new[name] = info
    return SafetensorsHeader(tensors=new, metadata=header.metadata)


def validate(adapters: dict[str, Any], kind: str, **config_changes: Any) -> ValidatedAdapter:
    return validate_adapter(
        config_of(adapters, kind, **config_changes), adapters[kind][1], tiny_spec(), LIMITS
    )


def rejection(config: dict[str, Any], header: SafetensorsHeader, **kw: Any) -> str:
    base = kw.pop("base", tiny_spec())
    limits = kw.pop("limits", LIMITS)
    with pytest.raises(AdapterRejected) as info:
        validate_adapter(config, header, base, limits)
    return str(info.value)


def test_plain_lora_is_accepted_with_ranks_from_its_tensors(adapters: dict[str, Any]) -> None:
    v = validate(adapters, "lora")
    assert (v.variant, v.rank, v.lora_alpha) == ("LORA", 4, 8.0)
    assert v.target_modules == ("q_proj", "v_proj")
    assert v.module_ranks == {
        f"model.layers.{i}.self_attn.{m}": 4 for i in (0, 1) for m in ("q_proj", "v_proj")
    }
    assert v.scale("model.layers.0.self_attn.q_proj") == 2.0


def test_rslora_is_accepted_and_scales_by_sqrt_rank(adapters: dict[str, Any]) -> None:
    v = validate(adapters, "rslora")
    assert (v.variant, v.rank) == ("RSLORA", 8)
    assert v.target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert math.isclose(v.scale("model.layers.1.self_attn.o_proj"), 16 / math.sqrt(8))


def test_dora_is_accepted_with_its_magnitude_vectors(adapters: dict[str, Any]) -> None:
    v = validate(adapters, "dora")
    assert (v.variant, v.rank, v.target_modules) == ("DORA", 4, ("down_proj", "q_proj"))


def test_rank_and_alpha_patterns_give_per_module_values(adapters: dict[str, Any]) -> None:
    v = validate(adapters, "mixed")
    assert v.rank == 16
    assert v.module_ranks["model.layers.0.self_attn.q_proj"] == 4
    assert v.module_ranks["model.layers.1.self_attn.v_proj"] == 8
    assert v.module_ranks["model.layers.0.mlp.up_proj"] == 4
    assert v.module_ranks["model.layers.1.mlp.up_proj"] == 16
    assert v.module_alphas["model.layers.1.mlp.up_proj"] == 32.0
    assert v.module_alphas["model.layers.1.self_attn.v_proj"] == 8.0


def test_layers_to_transform_is_accepted(adapters: dict[str, Any]) -> None:
    v = validate(adapters, "one_layer")
    assert v.module_ranks == {"model.layers.1.mlp.gate_proj": 2}


def test_tensor_for_a_module_the_base_lacks_is_rejected(adapters: dict[str, Any]) -> None:
    spec = tiny_spec()
    no_v = dataclasses.replace(
        spec, target_modules=tuple(m for m in spec.target_modules if m.name != "v_proj")
    )
    message = rejection(adapters["lora"][0], adapters["lora"][1], base=no_v)
    assert "self_attn.v_proj" in message and "not a LoRA-targetable layer" in message
    assert "another base model" in message


def test_right_module_wrong_input_size_names_the_expected_size(adapters: dict[str, Any]) -> None:
    config, header = adapters["lora"]
    bad = header_with(header, f"{Q0}.lora_A.weight", TensorInfo("F32", (4, 100)))
    message = rejection(config, bad)
    assert f"has shape [4, 100] but q_proj of {TINY_NAME} takes {HIDDEN} inputs" in message
    assert "was this adapter trained for another base model?" in message


def test_adapter_for_a_wider_model_is_rejected_on_output_size(adapters: dict[str, Any]) -> None:
    spec = tiny_spec()
    wider = dataclasses.replace(
        spec,
        target_modules=tuple(
            dataclasses.replace(m, out_features=m.out_features * 2) if m.name == "q_proj" else m
            for m in spec.target_modules
        ),
    )
    message = rejection(adapters["lora"][0], adapters["lora"][1], base=wider)
    assert "lora_B.weight has shape [64, 4] but q_proj" in message and "128 outputs" in message


def test_layer_beyond_the_base_depth_is_rejected(adapters: dict[str, Any]) -> None:
    shallow = dataclasses.replace(tiny_spec(), num_layers=1)
    message = rejection(adapters["lora"][0], adapters["lora"][1], base=shallow)
    assert "is for layer 1 but" in message and "has 1 layers" in message


def test_rank_over_the_limit_is_rejected(adapters: dict[str, Any]) -> None:
    message = rejection(*adapters["mixed"], limits=AdapterLimits(max_rank=8))
    assert "rank 16" in message and "limit of 8" in message and "r <= 8" in message


def test_missing_lora_b_is_rejected(adapters: dict[str, Any]) -> None:
    config, header = adapters["lora"]
    message = rejection(config, header_with(header, f"{Q0}.lora_B.weight", None))
    assert "has no lora_B.weight" in message


def test_mismatched_pair_ranks_are_rejected(adapters: dict[str, Any]) -> None:
    config, header = adapters["lora"]
    bad = header_with(header, f"{Q0}.lora_B.weight", TensorInfo("F32", (HIDDEN, 3)))
    assert "lora_A of rank 4 but lora_B of rank 3" in rejection(config, bad)


def test_config_rank_that_disagrees_with_tensors_is_rejected(adapters: dict[str, Any]) -> None:
    message = rejection(config_of(adapters, "lora", r=8), adapters["lora"][1])
    assert "rank 8" in message and "tensors have rank 4" in message


def test_dora_without_magnitude_vector_is_rejected(adapters: dict[str, Any]) -> None:
    config, header = adapters["dora"]
    bad = header_with(header, f"{Q0}.lora_magnitude_vector", None)
    assert "no lora_magnitude_vector" in rejection(config, bad)


def test_magnitude_vectors_without_use_dora_are_rejected(adapters: dict[str, Any]) -> None:
    message = rejection(config_of(adapters, "dora", use_dora=False), adapters["dora"][1])
    assert "does not set use_dora" in message


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"peft_type": "IA3"}, "serves only LoRA adapters"),
        ({"use_foo": True}, "use_foo=True, a field loraplex does not know"),
        ({"future_knob": {"on": 1}}, "future_knob={'on': 1}, a field loraplex does not know"),
        ({"use_qalora": True}, "QALoRA"),
        ({"bias": "lora_only"}, 'retrain with bias="none"'),
        ({"lora_bias": True}, "lora_bias"),
        ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
        ({"lora_alpha": "eight"}, "lora_alpha='eight'"),
        ({"rank_pattern": {"(": 2}}, "not a valid regular expression"),
        ({"rank_pattern": {"q_proj": 0}}, "it must be a positive integer"),
        ({"target_modules": None}, "has no target_modules"),
        ({"target_modules": "(q_proj"}, "not a valid regular expression"),
        ({"target_modules": "all-linear", "layers_to_transform": [0]}, "PEFT refuses that combination"),
        ({"layers_pattern": "layers"}, "without layers_to_transform"),
        (
            {
                "target_modules": ["v_proj", *(f"model.layers.{i}.self_attn.q_proj" for i in range(20))],
                "layers_to_transform": [0],
            },
            "PEFT condenses such lists first",
        ),
        ({"modules_to_save": ["lm_head"]}, "full trained copy of each of those layers in every adapter"),
        ({"layer_replication": [[0, 2]]}, "(layer_replication)"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "(target_parameters)"),
        ({"base_model_name_or_path": "meta-llama/Llama-3.2-1B"}, "trained on 'meta-llama/Llama-3.2-1B'"),
    ],
)
def test_unsupported_config_is_rejected_with_a_reason(
    adapters: dict[str, Any], changes: dict[str, Any], expected: str
) -> None:
    assert expected in rejection(config_of(adapters, "lora", **changes), adapters["lora"][1])


PEFT_VARIANT_FIELDS = [
    f.name
    for f in dataclasses.fields(LoraConfig)
    if f.metadata.get("is_lora_variant") and f.name != "use_dora"
]


@pytest.mark.parametrize("field", PEFT_VARIANT_FIELDS)
def test_every_other_peft_lora_variant_is_rejected(adapters: dict[str, Any], field: str) -> None:
    message = rejection(config_of(adapters, "lora", **{field: {"enabled": 1}}), adapters["lora"][1])
    assert f"({field})" in message and "does not serve" in message


@pytest.mark.parametrize("init", ["olora", "corda", "loftq", "lora_ga", "pissa"])
def test_initialisations_that_change_the_base_are_rejected(adapters: dict[str, Any], init: str) -> None:
    message = rejection(config_of(adapters, "lora", init_lora_weights=init), adapters["lora"][1])
    assert "changes the base weights" in message


@pytest.mark.parametrize("init", [True, "gaussian", "eva", "orthogonal", "mica"])
def test_initialisations_that_leave_the_base_alone_are_accepted(
    adapters: dict[str, Any], init: object
) -> None:
    assert validate(adapters, "lora", init_lora_weights=init).variant == "LORA"


@pytest.mark.parametrize("trained_on", [None, "SomeOrg/Tiny_Test_Llama", "/home/me/models/base", "./base"])
def test_matching_or_local_base_model_names_are_accepted(
    adapters: dict[str, Any], trained_on: str | None
) -> None:
    assert validate(adapters, "lora", base_model_name_or_path=trained_on).rank == 4


@pytest.mark.parametrize(
    ("extra", "config_changes", "expected"),
    [
        ("base_model.model.lm_head.weight", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ("base_model.model.lm_head.lora_A.weight", {}, "adapts lm_head, which adapter_config.json does not"),
        ("base_model.model.model.embed_tokens.lora_embedding_A", {}, "adapts model.embed_tokens, which"),
        (f"{Q0}.lora_B.bias", {}, "lora_bias=False"),
        ("base_model.model.model.layers.0.self_attn.q_proj.weight", {}, "not a LoRA weight"),
    ],
)
def test_tensors_of_unserved_features_are_rejected(
    adapters: dict[str, Any], extra: str, config_changes: dict[str, Any], expected: str
) -> None:
    config, header = adapters["lora"]
    bad = SafetensorsHeader(tensors={**header.tensors, extra: TensorInfo("F32", (4, HIDDEN))})
    assert expected in rejection({**config, **config_changes}, bad)


def test_integer_weights_are_rejected(adapters: dict[str, Any]) -> None:
    config, header = adapters["lora"]
    bad = header_with(header, f"{Q0}.lora_A.weight", TensorInfo("I8", (4, HIDDEN)))
    assert "is I8" in rejection(config, bad)


def test_adapter_without_lora_tensors_is_rejected(adapters: dict[str, Any]) -> None:
    assert "no LoRA tensors" in rejection(adapters["lora"][0], SafetensorsHeader(tensors={}))


def test_a_targeted_layer_without_tensors_is_rejected(adapters: dict[str, Any]) -> None:
    config, header = adapters["lora"]
    missing = {k: v for k, v in header.tensors.items() if "layers.1.self_attn.v_proj" not in k}
    message = rejection(config, SafetensorsHeader(tensors=missing))
    assert "targets model.layers.1.self_attn.v_proj" in message and "no lora_A / lora_B" in message


def test_tensors_of_a_layer_the_config_does_not_target_are_rejected(adapters: dict[str, Any]) -> None:
    message = rejection(config_of(adapters, "lora", target_modules=["q_proj"]), adapters["lora"][1])
    assert "adapts model.layers.0.self_attn.v_proj, which adapter_config.json does not target" in message


def test_layers_to_transform_must_describe_the_tensors(adapters: dict[str, Any]) -> None:
    message = rejection(config_of(adapters, "one_layer", layers_to_transform=[0]), adapters["one_layer"][1])
    assert "targets model.layers.0.mlp.gate_proj" in message


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "v_proj", "norm"], ["q_proj", "v_proj", "self_attn"], ".*(q_proj|v_proj|model.norm)"],
)
def test_a_config_targeting_a_layer_loraplex_does_not_adapt_is_rejected(
    adapters: dict[str, Any], targets: object
) -> None:
    message = rejection(config_of(adapters, "lora", target_modules=targets), adapters["lora"][1])
    assert "which loraplex does not adapt" in message


@pytest.mark.parametrize(
    "targets",
    [
        r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
        ["self_attn.q_proj", "self_attn.v_proj"],
        ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "v_proj"],
    ],
)
def test_every_targeting_form_that_names_the_adapted_layers_is_accepted(
    adapters: dict[str, Any], targets: object
) -> None:
    assert validate(adapters, "lora", target_modules=targets).target_modules == ("q_proj", "v_proj")


def test_all_linear_means_every_block_linear(adapters: dict[str, Any]) -> None:
    message = rejection(config_of(adapters, "lora", target_modules="all-linear"), adapters["lora"][1])
    assert "targets model.layers.0.self_attn.k_proj" in message


def test_dotted_pattern_keys_give_the_scale_peft_gives(adapters: dict[str, Any]) -> None:
    v = validate(adapters, "lora", alpha_pattern={"self_attn.v_proj": 2, "layers.0.self_attn.q_proj": 12})
    assert v.scale("model.layers.1.self_attn.v_proj") == 2 / 4
    assert v.scale("model.layers.0.self_attn.q_proj") == 12 / 4
    assert v.scale("model.layers.1.self_attn.q_proj") == 8 / 4


def test_dora_with_rslora_is_served_as_peft_serves_it(adapters: dict[str, Any]) -> None:
    v = validate(adapters, "dora", use_rslora=True)
    assert v.variant == "DORA"
    assert math.isclose(v.scale("model.layers.0.self_attn.q_proj"), 4 / math.sqrt(4))


# -- LoRA on embed_tokens and lm_head ------------------------------------------------------------
EMBED = "base_model.model.model.embed_tokens"
HEAD = "base_model.model.lm_head"


def test_lora_on_embed_tokens_and_lm_head_is_accepted_with_peft_scales(adapters: dict[str, Any]) -> None:
    v = validate(adapters, "edges")
    assert v.target_modules == ("embed_tokens", "lm_head", "q_proj")
    assert v.module_ranks["model.embed_tokens"] == 4 and v.module_ranks["lm_head"] == 4
    assert v.scale("model.embed_tokens") == 2.0 and v.scale("lm_head") == 2.0


def test_dora_on_embed_tokens_and_lm_head_is_accepted(adapters: dict[str, Any]) -> None:
    v = validate(adapters, "edges_dora")
    assert (v.variant, v.target_modules) == ("DORA", ("embed_tokens", "lm_head"))


@pytest.mark.parametrize(
    ("tensor", "info", "expected"),
    [
        (
            f"{EMBED}.lora_embedding_A",
            TensorInfo("F32", (4, 300)),
            f"lora_embedding_A has shape [4, 300] but embed_tokens of {TINY_NAME} has a vocabulary of "
            f"{VOCAB} tokens (expected [rank, {VOCAB}])",
        ),
        (
            f"{EMBED}.lora_embedding_B",
            TensorInfo("F32", (48, 4)),
            f"lora_embedding_B has shape [48, 4] but embed_tokens of {TINY_NAME} has {HIDDEN} hidden "
            f"dimensions (expected [{HIDDEN}, rank])",
        ),
        (
            f"{HEAD}.lora_A.weight",
            TensorInfo("F32", (4, 48)),
            f"lm_head.lora_A.weight has shape [4, 48] but lm_head of {TINY_NAME} takes {HIDDEN} inputs",
        ),
        (
            f"{HEAD}.lora_B.weight",
            TensorInfo("F32", (300, 4)),
            f"lm_head.lora_B.weight has shape [300, 4] but lm_head of {TINY_NAME} has {VOCAB} outputs",
        ),
        (f"{HEAD}.lora_B.weight", TensorInfo("F32", (VOCAB, 3)), "lora_A of rank 4 but lora_B of rank 3"),
    ],
)
def test_edge_tensors_of_the_wrong_shape_are_rejected_naming_module_and_shapes(
    adapters: dict[str, Any], tensor: str, info: TensorInfo, expected: str
) -> None:
    config, header = adapters["edges"]
    message = rejection(config, header_with(header, tensor, info))
    assert expected in message
    assert "another base model" in message or "the file is inconsistent" in message


def test_an_embedding_dora_magnitude_of_the_wrong_size_is_rejected(adapters: dict[str, Any]) -> None:
    config, header = adapters["edges_dora"]
    bad = header_with(header, f"{EMBED}.lora_magnitude_vector", TensorInfo("F32", (VOCAB,)))
    assert f"embed_tokens of {TINY_NAME} has {HIDDEN} outputs" in rejection(config, bad)


def test_linear_lora_names_on_the_embeddings_are_rejected(adapters: dict[str, Any]) -> None:
    config, header = adapters["edges"]
    renamed = {
        k.replace("lora_embedding_A", "lora_A.weight").replace("lora_embedding_B", "lora_B.weight"): v
        for k, v in header.tensors.items()
    }
    message = rejection(config, SafetensorsHeader(tensors=renamed))
    assert "not how PEFT names a LoRA of embed_tokens" in message


def test_full_embedding_copies_from_save_embedding_layers_are_rejected_with_the_fix(
    adapters: dict[str, Any],
) -> None:
    config, header = adapters["edges_with_copies"]
    message = rejection(config, header)
    assert "is a full copy of" in message and "save_embedding_layers=False" in message
    assert f"{VOCAB * HIDDEN * 4 / 1e6:.1f} MB in this file" in message


def test_an_edge_the_config_targets_without_tensors_is_rejected(adapters: dict[str, Any]) -> None:
    config, header = adapters["edges"]
    without_head = {k: v for k, v in header.tensors.items() if not k.startswith(HEAD)}
    assert "targets lm_head" in rejection(config, SafetensorsHeader(tensors=without_head))


def test_all_linear_does_not_target_lm_head_as_in_peft(adapters: dict[str, Any]) -> None:
    config, header = adapters["edges"]
    head_only = {k: v for k, v in header.tensors.items() if k.startswith(HEAD)}
    message = rejection({**config, "target_modules": "all-linear"}, SafetensorsHeader(tensors=head_only))
    assert "no lora_A / lora_B" in message  # all-linear wants the block projections, not lm_head


def test_modules_to_save_is_rejected_with_its_cost_on_this_base_model(adapters: dict[str, Any]) -> None:
    smollm2_like = dataclasses.replace(tiny_spec(), name="smollm2-like", vocab_size=49152, hidden_size=576)
    config = config_of(adapters, "lora", modules_to_save=["lm_head", "embed_tokens"])
    message = rejection(config, adapters["lora"][1], base=smollm2_like)
    assert "lm_head: 28.3M parameters, 56.6 MB per adapter in bf16" in message
    assert "against 1.6 MB for a rank-16 LoRA of it" in message
    assert "embed_tokens: 28.3M parameters" in message and "train a LoRA on those layers" in message
