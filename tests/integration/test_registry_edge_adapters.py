"""LoRA on embed_tokens and lm_head through the real registry (gRPC upload, validation, store):
PEFT's adapters are accepted; wrong shapes, modules_to_save and PEFT's full embedding copies are
refused with INVALID_ARGUMENT and a sentence, leaving nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loraplex.v1 import common_pb2
from services.common.model_spec import BaseModelSpec
from tests.fixtures.registry import RegistryProcess
from tests.integration.test_registry_service import (
    CONFIG,
    WEIGHTS,
    _copy,
    _expect_rejected,
    _rewrite,
    _tenant,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EMBED = "base_model.model.model.embed_tokens"


def test_adapters_on_embed_tokens_and_lm_head_are_registered_ready(
    registry: RegistryProcess, tiny_edge_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    tenant = _tenant(registry)
    with registry.admin() as c:
        for name in ("edges-attn", "embed-dora", "head-rslora"):
            adapter = c.upload_adapter(
                tiny_edge_adapters[name], tenant=tenant, name=name, base_model=tiny_llama_spec.name
            )
            assert adapter.status == common_pb2.ADAPTER_STATUS_READY, name


def test_an_embedding_lora_for_another_vocabulary_is_refused_naming_module_and_shapes(
    registry: RegistryProcess,
    tmp_path: Path,
    tiny_edge_adapters: dict[str, Path],
    tiny_llama_spec: BaseModelSpec,
) -> None:
    d = _copy(tiny_edge_adapters["embed"], tmp_path / "vocab")
    tensors = load_file(str(d / WEIGHTS))
    rank = tensors[f"{EMBED}.lora_embedding_A"].shape[0]
    tensors[f"{EMBED}.lora_embedding_A"] = torch.zeros(rank, 32000)
    _rewrite(d, tensors)
    vocab = tiny_llama_spec.vocab_size
    _expect_rejected(
        registry,
        tmp_path,
        d,
        tiny_llama_spec,
        INVALID,
        f"{EMBED}.lora_embedding_A has shape [{rank}, 32000]",
        f"has a vocabulary of {vocab} tokens",
    )


def test_an_lm_head_lora_of_the_wrong_width_is_refused(
    registry: RegistryProcess,
    tmp_path: Path,
    tiny_edge_adapters: dict[str, Path],
    tiny_llama_spec: BaseModelSpec,
) -> None:
    d = _copy(tiny_edge_adapters["head-rslora"], tmp_path / "width")
    tensors = load_file(str(d / WEIGHTS))
    key = "base_model.model.lm_head.lora_A.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 96)
    _rewrite(d, tensors)
    _expect_rejected(
        registry,
        tmp_path,
        d,
        tiny_llama_spec,
        INVALID,
        "lm_head",
        f"takes {tiny_llama_spec.hidden_size} inputs",
    )


def test_modules_to_save_is_refused_with_its_bytes_per_adapter(
    registry: RegistryProcess,
    tmp_path: Path,
    tiny_edge_adapters: dict[str, Path],
    tiny_llama_spec: BaseModelSpec,
) -> None:
    d = _copy(tiny_edge_adapters["ordinary"], tmp_path / "modules-to-save")
    _rewrite(d, load_file(str(d / WEIGHTS)), modules_to_save=["lm_head"])
    params = tiny_llama_spec.vocab_size * tiny_llama_spec.hidden_size
    _expect_rejected(
        registry,
        tmp_path,
        d,
        tiny_llama_spec,
        INVALID,
        "modules_to_save",
        f"lm_head: {params / 1e6:.1f}M parameters, {params * 2 / 1e6:.1f} MB per adapter in bf16",
    )


def test_peft_default_save_with_full_embedding_copies_is_refused_with_the_fix(
    registry: RegistryProcess, tmp_path: Path, tiny_llama_dir: Path, tiny_llama_spec: BaseModelSpec
) -> None:
    """What save_pretrained writes by default when embed_tokens is a target: the base table too
    (in bf16 here, to fit the test registry's 8 MB upload limit)."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16),
        LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"]),
    )
    model.save_pretrained(str(tmp_path / "default-save"))
    d = tmp_path / "default-save"
    assert json.loads((d / CONFIG).read_text())["target_modules"] == ["embed_tokens"]
    _expect_rejected(
        registry,
        tmp_path,
        d,
        tiny_llama_spec,
        INVALID,
        "full copy of embed_tokens",
        "save_embedding_layers=False",
    )
