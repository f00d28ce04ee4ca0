"""Base model catalog, pull idempotency, and the LoRA geometry derived from configs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.base_models import (
    CATALOG,
    UnknownModelError,
    build_atomically,
    describe_model,
    is_complete,
    local_models,
    pull_model,
    resolve_model,
)
from services.common.config import DEFAULT_MODEL
from services.common.model_spec import BaseModelSpec, TargetModule
from services.devtools.tiny_model import TINY_LLAMA

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _real_linear_shapes(model: nn.Module, spec: BaseModelSpec, layer: int) -> dict[str, tuple[int, int]]:
    block = model.get_submodule(f"{spec.layers_prefix}.{layer}")
    return {
        path: (m.in_features, m.out_features) for path, m in block.named_modules() if isinstance(m, nn.Linear)
    }


def _target(spec: BaseModelSpec, name: str) -> TargetModule:
    module = spec.module(name)
    assert module is not None, f"{name} missing from {spec.name}"
    return module


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()


def test_unknown_model_error_names_the_known_models(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        pull_model("llama-9000", tmp_path)
    assert not (tmp_path / "models" / "llama-9000").exists()


def test_resolve_refuses_a_model_that_was_never_pulled(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="models pull"):
        resolve_model(DEFAULT_MODEL, tmp_path)


def test_default_model_is_in_the_catalog() -> None:
    assert DEFAULT_MODEL in CATALOG
    assert CATALOG[DEFAULT_MODEL].source.locate().suffix == ".gguf"


def test_failed_build_leaves_no_directory_behind(tmp_path: Path) -> None:
    def explode(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        build_atomically(tmp_path / "m", explode, done=is_complete)
    assert list(tmp_path.iterdir()) == [tmp_path / ".m.lock"]


def test_second_pull_is_a_fast_no_op(smollm2_dir: Path, loraplex_home: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    started = time.perf_counter()
    again = pull_model(DEFAULT_MODEL, loraplex_home)
    assert time.perf_counter() - started < 0.05
    assert again == smollm2_dir
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before


def test_pulled_model_is_plain_safetensors_with_chat_template(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert not list(smollm2_dir.glob("*.gguf")) and not list(smollm2_dir.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>assistant" in prompt


@pytest.mark.slow
def test_pulled_model_answers_a_factual_question_greedily(
    smollm2_dir: Path, smollm2_model: nn.Module
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = torch.tensor([tokenizer.encode(str(prompt), add_special_tokens=False)])
    with torch.no_grad():
        out = smollm2_model.generate(ids, max_new_tokens=8, do_sample=False)  # type: ignore[operator]
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_local_models_lists_pulled_models(smollm2_dir: Path, loraplex_home: Path) -> None:
    listed = {m.name: m for m in local_models(loraplex_home)}
    assert listed[DEFAULT_MODEL].path == smollm2_dir
    assert listed[DEFAULT_MODEL].architecture == "LlamaForCausalLM"
    assert listed[DEFAULT_MODEL].size_bytes > 100 << 20


def test_local_models_ignores_half_written_dirs(tmp_path: Path) -> None:
    (tmp_path / "models" / ".x.123.tmp").mkdir(parents=True)
    (tmp_path / "models" / "partial").mkdir()
    (tmp_path / "models" / "partial" / "config.json").write_text("{}")
    assert local_models(tmp_path) == []


@pytest.mark.slow
def test_smollm2_spec_matches_the_loaded_model(smollm2_model: nn.Module, smollm2_spec: BaseModelSpec) -> None:
    model = smollm2_model
    assert smollm2_spec.architecture == "LlamaForCausalLM"
    blocks = model.get_submodule(smollm2_spec.layers_prefix)
    assert isinstance(blocks, nn.ModuleList)
    assert smollm2_spec.num_layers == 30 == len(blocks)
    assert smollm2_spec.context_length == 8192
    assert (smollm2_spec.hidden_size, smollm2_spec.vocab_size) == (576, 49152)
    assert tuple(m.name for m in smollm2_spec.target_modules) == LLAMA_TARGETS
    declared = {m.path: (m.in_features, m.out_features) for m in smollm2_spec.target_modules}
    for layer in (0, smollm2_spec.num_layers - 1):
        assert _real_linear_shapes(model, smollm2_spec, layer) == declared
    k_proj = _target(smollm2_spec, "k_proj")
    assert (k_proj.in_features, k_proj.out_features) == (576, 192)


def test_tiny_spec_matches_the_loaded_model(tiny_llama_dir: Path, tiny_llama_spec: BaseModelSpec) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert tiny_llama_spec.name == TINY_LLAMA
    assert tiny_llama_spec.num_layers == 2
    assert tuple(m.name for m in tiny_llama_spec.target_modules) == LLAMA_TARGETS
    declared = {m.path: (m.in_features, m.out_features) for m in tiny_llama_spec.target_modules}
    for layer in range(tiny_llama_spec.num_layers):
        assert _real_linear_shapes(model, tiny_llama_spec, layer) == declared
    # GQA: k/v project to fewer heads than q.
    assert declared["self_attn.k_proj"] == (64, 32)


def test_describe_model_reads_the_config_not_a_table(tmp_path: Path, tiny_llama_dir: Path) -> None:
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config.update(hidden_size=96, intermediate_size=40, num_hidden_layers=3, max_position_embeddings=77)
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = describe_model("odd", tmp_path)
    assert (spec.num_layers, spec.context_length, spec.hidden_size) == (3, 77, 96)
    assert _target(spec, "up_proj").out_features == 40
    assert _target(spec, "down_proj").in_features == 40


def test_describe_model_needs_no_weights_and_is_fast(tmp_path: Path, smollm2_dir: Path) -> None:
    (tmp_path / "config.json").write_bytes((smollm2_dir / "config.json").read_bytes())
    started = time.perf_counter()
    spec = describe_model(DEFAULT_MODEL, tmp_path)
    assert time.perf_counter() - started < 2.0
    assert spec.num_layers == 30
