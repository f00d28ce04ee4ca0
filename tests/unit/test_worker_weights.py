"""Base weights: cast and fused once into a serving copy, then mapped from it, equal to the checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.worker.engine import host_memory
from services.worker.models.llama import MLP, Attention, DecoderLayer, LlamaForCausalLM, load_model
from services.worker.serving_cache import SERVING_DIR


def _copy_model(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name, ignore=shutil.ignore_patterns(SERVING_DIR)))


def _checkpoint(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name).to(dtype) for name in f.keys()}  # noqa: SIM118


def _serving_copies(model_dir: Path) -> list[Path]:
    return sorted((model_dir / SERVING_DIR).glob("*/model.safetensors"))


def _mapped_file(tensor: torch.Tensor) -> Path | None:
    """The file whose mapping holds the tensor's bytes, from /proc/self/maps."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return Path(fields[5]) if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def _attn(model: LlamaForCausalLM, layer: int) -> Attention:
    return model.attention_layers()[layer]


def _mlp(model: LlamaForCausalLM, layer: int) -> MLP:
    block = model.model.layers[layer]
    assert isinstance(block, DecoderLayer)
    return block.mlp


def _assert_equals_checkpoint(model: LlamaForCausalLM, expected: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    assert set(params) - set(expected) <= {"lm_head.weight"}  # a tied head is not stored
    for name, param in params.items():
        want = expected.get(name, expected["model.embed_tokens.weight"])
        assert param.dtype == want.dtype and torch.equal(param, want), name
    assert not any(p.device.type == "meta" for p in params.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weights_equal_the_checkpoint_cast_once_then_mapped(
    tiny_llama_dir: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    model_dir = _copy_model(tiny_llama_dir, tmp_path)
    expected = _checkpoint(model_dir, dtype)
    first = load_model(model_dir, dtype, "cpu")  # builds the serving copy
    [serving] = _serving_copies(model_dir)
    second = load_model(model_dir, dtype, "cpu")  # maps it
    for model in (first, second):
        _assert_equals_checkpoint(model, expected)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tiny-llama ties them
    # The second model's weights are the serving file's pages, fused groups included, no copies.
    attn, mlp = _attn(second, 1), _mlp(second, 1)
    assert _mapped_file(attn.qkv.weight) == serving.resolve()
    assert _mapped_file(second.model.embed_tokens.weight) == serving.resolve()
    assert attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()
    assert attn.v_proj.weight.data_ptr() == attn.qkv.weight[-attn.v_proj.out_features :].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up.weight[mlp.gate_proj.out_features :].data_ptr()
    # Writing a weight (nothing does) would stay in this process: the mapping is private.
    original = attn.qkv.weight[0].clone()
    attn.qkv.weight[0, 0] += 1
    assert torch.equal(_attn(load_model(model_dir, dtype, "cpu"), 1).qkv.weight[0], original)


def test_fused_biases_are_one_tensor_with_each_part_its_rows(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_llama_dir, tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    tensors = _checkpoint(model_dir, torch.float32)
    torch.manual_seed(0)
    for layer in range(config["num_hidden_layers"]):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weight = tensors[f"model.layers.{layer}.self_attn.{proj}.weight"]
            if proj != "o_proj":  # Llama's attention_bias covers q/k/v; o_proj has none here
                tensors[f"model.layers.{layer}.self_attn.{proj}.bias"] = torch.randn(weight.shape[0])
    save_file(tensors, str(model_dir / "model.safetensors"))
    for _ in range(2):  # built, then mapped
        model = load_model(model_dir, torch.bfloat16, "cpu")
        _assert_equals_checkpoint(model, {n: t.to(torch.bfloat16) for n, t in tensors.items()})
        attn = _attn(model, 0)
        assert attn.qkv.bias is not None
        assert attn.k_proj.bias is not None and attn.k_proj.bias.data_ptr() == (
            attn.qkv.bias[attn.q_proj.out_features :].data_ptr()
        )


def test_a_replaced_checkpoint_gets_a_new_serving_copy(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_llama_dir, tmp_path)
    load_model(model_dir, torch.bfloat16, "cpu")
    [old] = _serving_copies(model_dir)
    doubled = {name: t * 2 for name, t in _checkpoint(model_dir, torch.float32).items()}
    save_file(doubled, str(model_dir / "model.new"))
    os.replace(model_dir / "model.new", model_dir / "model.safetensors")
    model = load_model(model_dir, torch.bfloat16, "cpu")
    _assert_equals_checkpoint(model, {n: t.to(torch.bfloat16) for n, t in doubled.items()})
    [new] = _serving_copies(model_dir)
    assert new != old and not old.exists()  # the stale copy is gone


def test_without_a_writable_serving_dir_the_weights_are_cast_in_memory(
    tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = _copy_model(tiny_llama_dir, tmp_path)
    (model_dir / SERVING_DIR).write_text("not a directory")  # what a read-only mount looks like to mkdir
    with caplog.at_level(logging.WARNING):
        model = load_model(model_dir, torch.bfloat16, "cpu")
    _assert_equals_checkpoint(model, _checkpoint(model_dir, torch.bfloat16))
    assert "casting in memory" in caplog.text
    assert _mapped_file(_attn(model, 0).qkv.weight) is None


def test_a_checkpoint_missing_a_weight_names_it(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = _copy_model(tiny_llama_dir, tmp_path)
    tensors = _checkpoint(model_dir, torch.float32)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks weights for \['model.layers.1.mlp.down_proj.weight'\]"):
        load_model(model_dir, torch.bfloat16, "cpu")
    assert not _serving_copies(model_dir)


def test_host_kv_memory_reads_as_zeros_and_each_tensor_is_its_own() -> None:
    a = host_memory.zeros((2, 64, 16), torch.bfloat16, "cpu")
    b = host_memory.zeros((2, 64, 16), torch.bfloat16, "cpu")
    assert a.shape == (2, 64, 16) and a.dtype == torch.bfloat16 and a.is_contiguous()
    assert not a.any() and not b.any()
    a[1, 3] = 1.5
    assert a.sum().item() == 1.5 * 16 and not b.any()
