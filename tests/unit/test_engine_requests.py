"""The engine's request lifecycle on the tiny model: admission, prefix reuse, cancellation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import (
    AdapterInUse,
    AdapterMismatch,
    EngineRequest,
    LLMEngine,
    QueueFull,
    UnknownAdapter,
)
from services.worker.engine.sampling import SamplingParams
from tests.engine_support import VARIANTS, build_peft_adapter, load_weights, run_all, tokens_of

GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny-adapters")
    return [build_peft_adapter(tiny_llama_dir, root / VARIANTS[i].name, VARIANTS[i], seed=i) for i in (1, 3)]


def _engine(model_dir: Path, kv_cache_blocks: int, max_waiting: int = 256) -> LLMEngine:
    config = EngineConfig(
        model_dir=model_dir,
        dtype=torch.float32,
        kv_block_size=4,
        kv_cache_blocks=kv_cache_blocks,
        max_waiting=max_waiting,
    )
    return LLMEngine(config)


def test_shared_prefix_under_the_same_adapter_reuses_blocks_and_reports_cached_tokens(
    tiny_llama_dir: Path, adapter_dirs: list[Path]
) -> None:
    engine = _engine(tiny_llama_dir, kv_cache_blocks=64)
    weights = load_weights(adapter_dirs[0])
    engine.load_adapter(weights)
    prefix = list(range(100, 120))
    engine.add_request(EngineRequest("first", [*prefix, 1], GREEDY, weights.digest))
    run_all(engine)
    engine.add_request(EngineRequest("second", [*prefix, 2, 3], GREEDY, weights.digest))
    outputs = run_all(engine)
    assert outputs["second"][-1].num_cached_tokens == 20
    assert engine.stats().prefix_cache_hits == 5


def test_same_prefix_under_two_adapters_reuses_nothing(
    tiny_llama_dir: Path, adapter_dirs: list[Path]
) -> None:
    engine = _engine(tiny_llama_dir, kv_cache_blocks=64)
    a, b = load_weights(adapter_dirs[0]), load_weights(adapter_dirs[1])
    engine.load_adapter(a)
    engine.load_adapter(b)
    prompt = list(range(100, 121))
    engine.add_request(EngineRequest("a", prompt, GREEDY, a.digest))
    run_all(engine)
    engine.add_request(EngineRequest("b", prompt, GREEDY, b.digest))
    engine.add_request(EngineRequest("base", prompt, GREEDY, None))
    outputs = run_all(engine)
    assert outputs["b"][-1].num_cached_tokens == 0 and outputs["base"][-1].num_cached_tokens == 0
    stats = engine.stats()
    assert stats.prefix_cache_hits == 0 and stats.prefix_cache_queries == 15


def test_aborted_request_frees_its_kv_blocks_before_the_next_step(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, kv_cache_blocks=64)
    engine.add_request(EngineRequest("keep", list(range(10, 30)), SamplingParams(max_tokens=50)))
    engine.add_request(EngineRequest("cancel", list(range(40, 70)), SamplingParams(max_tokens=50)))
    engine.step()
    used_both = engine.stats().kv_blocks_used
    engine.abort_request("cancel")
    assert engine.stats().kv_blocks_used == used_both - 8  # 30 prompt + 1 sampled token in 4-token blocks
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == "cancel"]
    assert [o.finish_reason for o in aborted] == ["aborted"]
    assert all(o.request_id != "cancel" or o.new_token_ids == [] for o in outputs)


def test_full_waiting_queue_sheds_load(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, kv_cache_blocks=64, max_waiting=2)
    engine.add_request(EngineRequest("a", [1, 2], GREEDY))
    engine.add_request(EngineRequest("b", [1, 2], GREEDY))
    with pytest.raises(QueueFull):
        engine.add_request(EngineRequest("c", [1, 2], GREEDY))


def test_bad_requests_are_refused_with_a_reason(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, kv_cache_blocks=64)
    with pytest.raises(ValueError, match="context"):
        engine.add_request(EngineRequest("long", [1] * engine.context_length, GREEDY))
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request(EngineRequest("bad", [1], SamplingParams(top_p=2.0)))
    small = _engine(tiny_llama_dir, kv_cache_blocks=4)
    with pytest.raises(ValueError, match="KV cache blocks"):
        small.add_request(EngineRequest("huge", [1] * 16, GREEDY))
    with pytest.raises(UnknownAdapter):
        engine.add_request(EngineRequest("who", [1], GREEDY, "sha256:nope"))


def test_adapter_in_use_cannot_be_unloaded_and_a_free_one_can(
    tiny_llama_dir: Path, adapter_dirs: list[Path]
) -> None:
    engine = _engine(tiny_llama_dir, kv_cache_blocks=64)
    weights = load_weights(adapter_dirs[0])
    engine.load_adapter(weights)
    engine.add_request(EngineRequest("r", [1, 2, 3], GREEDY, weights.digest))
    with pytest.raises(AdapterInUse):
        engine.unload_adapter(weights.digest)
    run_all(engine)
    engine.unload_adapter(weights.digest)
    assert engine.resident_adapters() == []


def test_adapter_for_another_base_model_is_refused(tiny_llama_dir: Path, adapter_dirs: list[Path]) -> None:
    engine = _engine(tiny_llama_dir, kv_cache_blocks=64)
    weights = load_weights(adapter_dirs[0])
    key = next(iter(weights.tensors))
    weights.tensors[key].a = torch.zeros(weights.tensors[key].rank, 999)
    with pytest.raises(AdapterMismatch, match="another base model"):
        engine.load_adapter(weights)
    assert engine.resident_adapters() == []


def test_preemption_under_kv_pressure_does_not_change_greedy_tokens(tiny_llama_dir: Path) -> None:
    prompts = [list(range(10 * i, 10 * i + 9)) for i in range(1, 5)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    results = []
    for blocks in (256, 12):
        engine = _engine(tiny_llama_dir, kv_cache_blocks=blocks)
        for i, p in enumerate(prompts):
            engine.add_request(EngineRequest(str(i), p, params))
        outputs = run_all(engine)
        results.append({rid: tokens_of(o) for rid, o in outputs.items()})
        preemptions = engine.scheduler.num_preemptions
    assert preemptions > 0
    assert results[0] == results[1]
    assert all(len(t) == 12 for t in results[1].values())


def test_max_tokens_finishes_a_request_with_length(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir, kv_cache_blocks=64)
    engine.add_request(EngineRequest("n", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True)))
    outputs = run_all(engine)["n"]
    assert [o.finish_reason for o in outputs] == [None, None, "length"]
    assert outputs[-1].num_output_tokens == 3


def test_bf16_engine_tracks_the_fp32_engine_on_a_mixed_batch(
    tiny_llama_dir: Path, adapter_dirs: list[Path]
) -> None:
    first_logits = []
    for dtype in (torch.float32, torch.bfloat16):
        engine = LLMEngine(
            EngineConfig(model_dir=tiny_llama_dir, dtype=dtype, kv_block_size=4, kv_cache_blocks=64)
        )
        weights = load_weights(adapter_dirs[0], dtype)
        engine.load_adapter(weights)
        engine.add_request(EngineRequest("lora", list(range(100, 110)), GREEDY, weights.digest))
        engine.add_request(EngineRequest("base", list(range(200, 207)), GREEDY))
        engine.step()
        logits, rids = engine.runner.last_logits
        first_logits.append(logits[[rids.index("lora"), rids.index("base")]].float())
        assert all(len(tokens_of(o)) == 3 for o in run_all(engine).values())  # 1 from the first step
    scale = first_logits[0].abs().max()
    assert (first_logits[0] - first_logits[1]).abs().max() <= 0.05 * scale
