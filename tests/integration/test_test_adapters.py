"""Test-adapter fixtures are real PEFT adapters: they load in PEFT, move logits, rebuild identically."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from services.common.config import DEFAULT_MODEL
from services.devtools.adapters import (
    SMOLLM2_TEST_ADAPTERS,
    TINY_TEST_ADAPTERS,
    AdapterSpec,
    build_adapter,
    random_adapter,
)
from services.devtools.tiny_model import TINY_LLAMA, build_tiny_llama

# "The capital of France is a city" in the SmolLM2 tokenizer, which the tiny model shares.
PROMPT_IDS = torch.tensor([[1, 504, 3575, 282, 4649, 314, 253, 2240]])
TINY_SPECS = {s.name: s for s in TINY_TEST_ADAPTERS}
SMOLLM2_SPECS = {s.name: s for s in SMOLLM2_TEST_ADAPTERS}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT_IDS).logits.float()


def _assert_real_peft_adapter(model_dir: Path, adapter_dir: Path, base_logits: torch.Tensor) -> None:
    """Loads in PEFT with every saved tensor taken up, and moves the logits."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model, save_embedding_layers=False)
    # from_pretrained only warns on missing keys; insist that what PEFT holds is exactly the file.
    assert sorted(loaded) == sorted(saved)
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
    assert all(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)
    assert (_logits(model) - base_logits).abs().max() > 1e-3


def _assert_config_matches(adapter_dir: Path, spec: AdapterSpec, base_model: str) -> None:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == base_model
    assert (config["r"], config["lora_alpha"]) == (spec.r, spec.lora_alpha)
    assert (config["use_dora"], config["use_rslora"]) == (spec.use_dora, spec.use_rslora)
    assert sorted(config["target_modules"]) == sorted(spec.target_modules)


def _assert_tensors_cover_targets(adapter_dir: Path, spec: AdapterSpec, num_layers: int) -> None:
    names = load_file(adapter_dir / "adapter_model.safetensors").keys()
    for target in spec.target_modules:
        per_target = [n for n in names if f".{target}.lora_A." in n]
        assert len(per_target) == num_layers, target
    assert any("lora_magnitude_vector" in n for n in names) == spec.use_dora


@pytest.fixture(scope="module")
def tiny_base_logits(tiny_llama_dir: Path) -> torch.Tensor:
    return _logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))


@pytest.fixture(scope="module")
def smollm2_base_logits(smollm2_dir: Path) -> torch.Tensor:
    return _logits(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32))


@pytest.mark.parametrize("name", sorted(TINY_SPECS))
def test_tiny_adapter_is_a_real_peft_adapter_that_changes_logits(
    name: str, tiny_llama_dir: Path, tiny_adapters: dict[str, Path], tiny_base_logits: torch.Tensor
) -> None:
    _assert_config_matches(tiny_adapters[name], TINY_SPECS[name], TINY_LLAMA)
    _assert_tensors_cover_targets(tiny_adapters[name], TINY_SPECS[name], num_layers=2)
    _assert_real_peft_adapter(tiny_llama_dir, tiny_adapters[name], tiny_base_logits)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOLLM2_SPECS))
def test_smollm2_adapter_is_a_real_peft_adapter_that_changes_logits(
    name: str, smollm2_dir: Path, smollm2_adapters: dict[str, Path], smollm2_base_logits: torch.Tensor
) -> None:
    _assert_config_matches(smollm2_adapters[name], SMOLLM2_SPECS[name], DEFAULT_MODEL)
    _assert_tensors_cover_targets(smollm2_adapters[name], SMOLLM2_SPECS[name], num_layers=30)
    _assert_real_peft_adapter(smollm2_dir, smollm2_adapters[name], smollm2_base_logits)


def test_fixture_sets_cover_every_variant() -> None:
    for specs in (TINY_TEST_ADAPTERS, SMOLLM2_TEST_ADAPTERS):
        assert any(s.use_dora for s in specs) and any(s.use_rslora for s in specs)
        assert len({s.r for s in specs}) >= 3
        assert len({s.name for s in specs}) == len(specs)


def test_rebuilding_an_adapter_is_a_cache_hit(
    tiny_llama_dir: Path, tiny_adapters: dict[str, Path], adapter_cache: Path
) -> None:
    spec = TINY_SPECS["all-r8"]
    before = _sha256(tiny_adapters[spec.name] / "adapter_model.safetensors")
    mtime = (tiny_adapters[spec.name] / "adapter_model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    again = build_adapter(tiny_llama_dir, spec, adapter_cache)
    assert time.perf_counter() - started < 0.5
    assert again == tiny_adapters[spec.name]
    assert (again / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert _sha256(again / "adapter_model.safetensors") == before


def test_a_changed_spec_is_a_different_cache_entry(
    tiny_llama_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    spec = TINY_SPECS["qv-r4"]
    reseeded = build_adapter(tiny_llama_dir, AdapterSpec(**{**spec.__dict__, "seed": 99}), tmp_path)
    assert reseeded.name != tiny_adapters[spec.name].name
    assert _sha256(reseeded / "adapter_model.safetensors") != _sha256(
        tiny_adapters[spec.name] / "adapter_model.safetensors"
    )


@pytest.mark.parametrize("name", ["all-r8", "dora-r4"])
def test_training_is_deterministic_across_fresh_caches(
    name: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    first = build_adapter(tiny_llama_dir, TINY_SPECS[name], tmp_path / "a")
    second = build_adapter(tiny_llama_dir, TINY_SPECS[name], tmp_path / "b")
    assert _sha256(first / "adapter_model.safetensors") == _sha256(second / "adapter_model.safetensors")


def test_training_leaves_global_torch_state_alone(tiny_llama_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_adapter(tiny_llama_dir, TINY_SPECS["mlp-r16"], tmp_path)
    assert torch.equal(torch.rand(3), expected)
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_crashed_build_leaves_no_adapter_behind(tmp_path: Path, smollm2_dir: Path) -> None:
    # A model dir whose weights do not match its config makes training fail part way.
    broken = tmp_path / "models" / "broken"
    build_tiny_llama(broken, smollm2_dir)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception):  # noqa: B017 - whichever error the loader raises
        build_adapter(broken, TINY_SPECS["qv-r4"], tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("name", sorted(TINY_SPECS))
def test_random_adapter_is_a_real_peft_adapter_that_changes_logits(
    name: str, tiny_llama_dir: Path, tiny_base_logits: torch.Tensor, tmp_path: Path
) -> None:
    out = random_adapter(tiny_llama_dir, TINY_SPECS[name], tmp_path / name)
    _assert_config_matches(out, TINY_SPECS[name], TINY_LLAMA)
    _assert_tensors_cover_targets(out, TINY_SPECS[name], num_layers=2)
    _assert_real_peft_adapter(tiny_llama_dir, out, tiny_base_logits)


def test_random_dora_magnitude_is_the_norm_of_the_adapted_weight(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    spec = TINY_SPECS["dora-r4"]
    tensors = load_file(random_adapter(tiny_llama_dir, spec, tmp_path) / "adapter_model.safetensors")
    weights = load_file(tiny_llama_dir / "model.safetensors")
    prefix = "base_model.model.model.layers.1.self_attn.o_proj"
    a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
    w = weights["model.layers.1.self_attn.o_proj.weight"]
    expected = (w + (spec.lora_alpha / spec.r) * b @ a).norm(dim=1)
    torch.testing.assert_close(tensors[f"{prefix}.lora_magnitude_vector"], expected)


def test_random_adapters_are_seeded(tiny_llama_dir: Path, tmp_path: Path) -> None:
    spec = AdapterSpec("bench", ("q_proj", "v_proj"), r=8, lora_alpha=16, seed=5)
    same = [random_adapter(tiny_llama_dir, spec, tmp_path / d) for d in ("a", "b")]
    other = random_adapter(tiny_llama_dir, AdapterSpec(**{**spec.__dict__, "seed": 6}), tmp_path / "c")
    digests = [_sha256(p / "adapter_model.safetensors") for p in (*same, other)]
    assert digests[0] == digests[1] != digests[2]


@pytest.mark.slow
def test_random_smollm2_adapter_loads_in_peft_quickly(
    smollm2_dir: Path, smollm2_base_logits: torch.Tensor, tmp_path: Path
) -> None:
    spec = AdapterSpec("bench-r32", ("q_proj", "k_proj", "v_proj", "o_proj"), r=32, lora_alpha=32, seed=1)
    started = time.perf_counter()
    out = random_adapter(smollm2_dir, spec, tmp_path)
    assert time.perf_counter() - started < 5.0
    _assert_real_peft_adapter(smollm2_dir, out, smollm2_base_logits)


def test_training_bytes_do_not_depend_on_the_callers_thread_count(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    threads = torch.get_num_threads()
    digests = []
    try:
        for n, cache in ((1, "one"), (max(2, threads), "many")):
            torch.set_num_threads(n)
            built = build_adapter(tiny_llama_dir, TINY_SPECS["rslora-r8"], tmp_path / cache)
            digests.append(_sha256(built / "adapter_model.safetensors"))
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
    assert digests[0] == digests[1]
