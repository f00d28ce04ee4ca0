"""The engine's grammar hooks on the tiny random Llama (SmolLM2's tokenizer): whatever the model
prefers, a constrained row's output validates, greedy or sampled, with adapters, through
preemption; the free rows of the batch are untouched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from services.worker.engine.config import EngineConfig
from services.worker.engine.constrained import GrammarCompiler, ResponseFormat
from services.worker.engine.llm_engine import EngineRequest, LLMEngine
from services.worker.engine.sampling import SamplingParams
from tests.engine_support import VARIANTS, build_peft_adapter, load_weights, run_all, tokens_of

# Bounded everywhere, so a random model's output completes well within max_tokens.
ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "label": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["a", "b", "c"]},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "label", "kind", "ok"],
    "additionalProperties": False,
}
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": ITEM, "maxItems": 2},
        "n": {"type": "number", "maximum": 9},
    },
    "required": ["items"],
    "additionalProperties": False,
}
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def _engine(model_dir: Path, kv_cache_blocks: int) -> LLMEngine:
    config = EngineConfig(
        model_dir=model_dir, dtype=torch.float32, kv_block_size=4, kv_cache_blocks=kv_cache_blocks
    )
    return LLMEngine(config)


def _text(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_constrained_rows_validate_through_preemption_beside_untouched_free_rows(
    tiny_llama_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    compiler = GrammarCompiler(49152)
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    adapter = load_weights(build_peft_adapter(tiny_llama_dir, tmp_path / "a", VARIANTS[1], seed=1))
    free = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [list(range(50 * i + 100, 50 * i + 111)) for i in range(6)]
    constrained_params = [
        SamplingParams(max_tokens=MAX_TOKENS),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=7),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.9, seed=8),
    ]

    def run(
        blocks: int, with_constrained: bool
    ) -> tuple[LLMEngine, dict[str, list[int]], dict[str, str | None]]:
        engine = _engine(tiny_llama_dir, blocks)
        engine.load_adapter(adapter)
        for i in range(3):  # free rows: base, adapter, base
            digest = adapter.digest if i == 1 else None
            engine.add_request(EngineRequest(f"free{i}", prompts[i], free, digest))
        if with_constrained:
            for i, params in enumerate(constrained_params):
                digest = adapter.digest if i == 2 else None
                grammar = compiler.compile(fmt, tokenizer)
                engine.add_request(EngineRequest(f"json{i}", prompts[3 + i], params, digest, grammar=grammar))
        outputs = run_all(engine)
        return (
            engine,
            {rid: tokens_of(o) for rid, o in outputs.items()},
            {rid: o[-1].finish_reason for rid, o in outputs.items()},
        )

    _, alone, _ = run(256, with_constrained=False)
    engine, mixed, reasons = run(24, with_constrained=True)
    assert engine.scheduler.num_preemptions > 0  # the constrained rows were recomputed mid-way
    for i in range(3):
        assert mixed[f"free{i}"] == alone[f"free{i}"]
    for i in range(3):
        assert reasons[f"json{i}"] == "stop"
        value = json.loads(_text(tokenizer, mixed[f"json{i}"]))
        jsonschema.validate(value, SCHEMA)
