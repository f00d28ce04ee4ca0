"""Weights packed on a thread while steps run give the tokens and logits of weights packed first."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import EngineRequest, LLMEngine
from services.worker.engine.sampling import SamplingParams
from services.worker.layers.lora import FusedLoRALinear, LoRALinear
from services.worker.layers.packed import can_pack
from tests.engine_support import run_all, tokens_of

PROMPTS = ([1, 2, 3, 4, 5, 6, 7], [9, 8, 7], list(range(100, 140)))


def _packed_matrices(engine: LLMEngine) -> int:
    modules = engine.model.modules()
    return sum(1 for m in modules if isinstance(m, FusedLoRALinear | LoRALinear) and m.packed is not None)


def _generate(engine: LLMEngine) -> tuple[dict[str, list[int]], torch.Tensor]:
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(EngineRequest(f"r{i}", prompt, SamplingParams(max_tokens=6, ignore_eos=True)))
    outputs = run_all(engine)
    return {rid: tokens_of(outs) for rid, outs in outputs.items()}, engine.runner.last_logits[0]


def test_packing_in_the_background_matches_packing_first(smollm2_dir: Path) -> None:
    config = EngineConfig(model_dir=smollm2_dir, dtype=torch.bfloat16, kv_cache_blocks=32)
    first = LLMEngine(config)
    assert first.packing is None  # packed before the constructor returned, if at all
    later = LLMEngine(replace(config, pack_in_background=True))
    tokens, logits = _generate(later)  # while the thread packs, where it does
    expected_tokens, expected_logits = _generate(first)
    assert tokens == expected_tokens
    assert torch.equal(logits, expected_logits)
    if later.packing is not None:
        later.packing.join()
    # 30 layers x (qkv, o_proj, gate_up, down_proj) where oneDNN packs bf16; else none, and no thread.
    packs = can_pack("cpu", torch.bfloat16)
    assert (later.packing is not None) == packs
    assert _packed_matrices(later) == _packed_matrices(first) == (120 if packs else 0)
    assert (later.model.lm_head_packed is not None) == packs


def test_fp32_weights_are_packed_before_the_engine_serves(smollm2_dir: Path) -> None:
    # Packed fp32 GEMMs differ from plain ones in the last bits, so no step may run on a mix.
    config = EngineConfig(
        model_dir=smollm2_dir, dtype=torch.float32, kv_cache_blocks=32, pack_in_background=True
    )
    engine = LLMEngine(config)
    assert engine.packing is None
    packs = can_pack("cpu", torch.float32)
    assert _packed_matrices(engine) == (120 if packs else 0)
    assert (engine.model.lm_head_packed is not None) == packs
