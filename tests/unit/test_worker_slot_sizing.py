"""An adapter's device bytes, planned from its safetensors header, are what the engine allocates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.adapter_files import read_safetensors_header
from services.worker.adapters.sizing import planned_device_bytes
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine
from tests.engine_support import PeftAdapterSpec, build_peft_adapter, load_weights

SPECS = (
    PeftAdapterSpec("qv-r4", 4, 8, ("q_proj", "v_proj")),  # padded to the bucket of 8
    PeftAdapterSpec("dora-r8", 8, 16, ("q_proj", "down_proj"), use_dora=True),
    PeftAdapterSpec("mixed", 8, 16, ("q_proj", "up_proj"), extra=(("rank_pattern", {"up_proj": 24}),)),
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_device_bytes_equal_the_slots_the_engine_fills(
    tiny_llama_dir: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    engine = LLMEngine(EngineConfig(model_dir=tiny_llama_dir, dtype=dtype, kv_cache_blocks=16))
    for i, spec in enumerate(SPECS):
        adapter_dir = build_peft_adapter(tiny_llama_dir, tmp_path / spec.name, spec, seed=i)
        header = read_safetensors_header(adapter_dir / "adapter_model.safetensors")
        planned = planned_device_bytes(header.tensors, engine.linear_shape, dtype)
        adapter = engine.prepare_adapter(load_weights(adapter_dir, dtype))
        engine.install_adapter(adapter)
        group = engine.runner.lora.slots.groups[adapter.group]
        assert planned == adapter.slot_bytes == group.slot_bytes == adapter.resident_bytes
        # Not the file size: the rank is padded to its bucket, and the slots have the engine's dtype.
        file_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
        assert planned != file_bytes


def test_a_tensor_for_a_layer_the_model_lacks_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    engine = LLMEngine(EngineConfig(model_dir=tiny_llama_dir, dtype=torch.float32, kv_cache_blocks=16))
    adapter_dir = build_peft_adapter(tiny_llama_dir, tmp_path / "qv", SPECS[0], seed=0)
    tensors = read_safetensors_header(adapter_dir / "adapter_model.safetensors").tensors
    renamed = {k.replace("layers.0.", "layers.99."): v for k, v in tensors.items()}
    with pytest.raises(ValueError, match="layer 99"):
        planned_device_bytes(renamed, engine.linear_shape, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_device_bytes_count_edge_lora_unpadded_beside_the_slots(
    tiny_llama_dir: Path, tiny_edge_adapters: dict[str, Path], dtype: torch.dtype
) -> None:
    engine = LLMEngine(EngineConfig(model_dir=tiny_llama_dir, dtype=dtype, kv_cache_blocks=16))
    for name, adapter_dir in tiny_edge_adapters.items():
        header = read_safetensors_header(adapter_dir / "adapter_model.safetensors")
        planned = planned_device_bytes(header.tensors, engine.linear_shape, dtype)
        adapter = engine.prepare_adapter(load_weights(adapter_dir, dtype))
        edges = [e for e in (adapter.embed, adapter.lm_head) if e is not None]
        assert edges or name == "ordinary", name
        held = sum(t.nbytes for e in edges for t in e.tensors())
        held += sum(t.nbytes for d in (adapter.a, adapter.b_t, adapter.dora_scale) for t in d.values())
        assert planned == adapter.resident_bytes == held, name
