"""How a step lays out its LoRA work: fused base projections, adapters grouped by what they target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import LLMEngine
from services.worker.engine.sampling import SamplingParams
from services.worker.engine.scheduler import ScheduledBatch
from services.worker.engine.sequence import Sequence
from services.worker.layers.lora import SHARED_SHRINK_TOKENS
from services.worker.models.llama import MLP, Attention
from tests.engine_support import PeftAdapterSpec, build_peft_adapter, load_weights

QV = PeftAdapterSpec("qv-r8", 8, 16, ("q_proj", "v_proj"))
ALL = PeftAdapterSpec("all-r8", 8, 16)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    root = tmp_path_factory.mktemp("group-adapters")
    engine = LLMEngine(EngineConfig(model_dir=tiny_llama_dir, dtype=torch.float32, kv_cache_blocks=64))
    for i, spec in enumerate((QV, ALL)):
        engine.load_adapter(load_weights(build_peft_adapter(tiny_llama_dir, root / spec.name, spec, seed=i)))
    return engine


def test_fused_projections_share_storage_with_the_modules_adapters_target(engine: LLMEngine) -> None:
    for layer, attn in enumerate(engine.model.attention_layers()):
        assert isinstance(attn, Attention)  # the Llama-style block, which fuses q/k/v itself
        fused = attn.qkv.weight
        assert fused.shape[0] == sum(p.out_features for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        # Views, not copies: the base weights are in memory once.
        assert attn.q_proj.weight.data_ptr() == fused.data_ptr()
        assert torch.equal(attn.v_proj.weight, fused[-attn.v_proj.out_features :])
        gate, up = engine.model.linear((layer, "gate_proj")), engine.model.linear((layer, "up_proj"))
        assert gate is not None and up is not None
        assert (
            up.weight.data_ptr() == gate.weight.data_ptr() + gate.weight.numel() * gate.weight.element_size()
        )
    # The fused weights are buffers: counting parameters still counts each base weight once.
    assert len({p.data_ptr() for p in engine.model.parameters()}) == len(list(engine.model.parameters()))


def test_adapters_of_one_rank_bucket_that_target_different_modules_are_stacked_apart(
    engine: LLMEngine,
) -> None:
    qv, all_linear = sorted(engine.adapters.values(), key=lambda a: len(a.targets))
    assert qv.bucket == all_linear.bucket == 8
    seqs = [
        Sequence(f"r{i}", [5, 6, 7], SamplingParams(), adapter.digest)
        for i, adapter in enumerate((qv, all_linear, qv))
    ]
    batch = ScheduledBatch(seqs, [3, 3, 3])
    engine.runner.lora.arrange(batch, engine.adapters)
    order = sorted(range(3), key=lambda i: (engine.runner.lora.row_key(seqs[i].adapter, engine.adapters), i))
    batch = ScheduledBatch([seqs[i] for i in order], [3, 3, 3])
    lora = engine.runner.lora.build(batch, [0, 3, 6, 9], engine.adapters)
    assert lora is not None
    targets = sorted({name for _, name in group.weights} for group in lora.groups)
    # The q/v-only adapter is not padded with zero A/B at k, o or the MLP next to the other one.
    assert targets == [
        {"q_proj", "v_proj"},
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    ]
    assert sorted(g.num_adapters for g in lora.groups) == [1, 1]


def test_slot_bytes_count_the_bucket_padding_and_the_engine_dtype(engine: LLMEngine) -> None:
    pool = engine.runner.lora.slots
    for adapter in engine.adapters.values():
        group = pool.groups[adapter.group]
        # What one slot of its group's buffers really occupies, all modules together.
        occupied = sum(
            t[0].numel() * t.element_size() for buf in (group.a, group.b, group.dora) for t in buf.values()
        )
        padded = 0
        for k in adapter.targets:
            linear = engine.model.linear(k)
            assert linear is not None
            padded += (linear.in_features + linear.out_features) * adapter.bucket * 4
        assert adapter.slot_bytes == group.slot_bytes == occupied == padded


@pytest.mark.parametrize("tokens", [1, 3, SHARED_SHRINK_TOKENS])
def test_a_fused_projection_adds_each_parts_lora_as_the_part_alone_would(
    engine: LLMEngine, tokens: int
) -> None:
    qv, all_linear = sorted(engine.adapters.values(), key=lambda a: len(a.targets))
    seqs = [
        Sequence(f"s{i}", [5] * tokens, SamplingParams(), a.digest) for i, a in enumerate((qv, all_linear))
    ]
    batch = ScheduledBatch(seqs, [tokens, tokens])
    engine.runner.lora.arrange(batch, engine.adapters)
    order = sorted(range(2), key=lambda i: engine.runner.lora.row_key(seqs[i].adapter, engine.adapters))
    batch = ScheduledBatch([seqs[i] for i in order], [tokens, tokens])
    lora = engine.runner.lora.build(batch, [0, tokens, 2 * tokens], engine.adapters)
    assert lora is not None
    attn = engine.model.attention_layers()[1]
    mlp = engine.model.model.layers[1].mlp
    assert isinstance(attn, Attention) and isinstance(mlp, MLP)
    x = torch.randn(2 * tokens, attn.q_proj.in_features)
    # q/v only for one adapter, q/k/v for the other: prompt chunks shrink the targeted parts in one
    # matmul, decode rows part by part; either way each part gets what its own module would add.
    for fused in (attn.qkv, mlp.gate_up):
        apart = torch.cat([part(x, lora) for part in fused.parts], dim=1)
        torch.testing.assert_close(fused.fused(x, lora), apart)
        assert not torch.equal(fused.fused(x, lora), fused.fused(x, None))  # the adapters did change it
