"""Adapters live in slot buffers: batch membership changes copy only the changed adapters' slots,
steady decoding copies nothing, and the answers do not depend on where an adapter's slot is."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.engine import ModelShapes, random_weights
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import EngineRequest, LLMEngine
from services.worker.engine.sampling import SamplingParams
from tests.engine_support import run_all, tokens_of

PROMPT = [11, 12, 13, 14]


def make_engine(model_dir: Path, slots: int) -> LLMEngine:
    return LLMEngine(
        EngineConfig(model_dir=model_dir, dtype=torch.float32, kv_cache_blocks=256, max_adapter_slots=slots)
    )


def request(rid: str, digest: str, tokens: int) -> EngineRequest:
    return EngineRequest(rid, PROMPT, SamplingParams(max_tokens=tokens, temperature=0.0), digest)


def alone(model_dir: Path, weights_of: dict, digest: str, tokens: int) -> list[int]:
    engine = make_engine(model_dir, 1)
    engine.load_adapter(weights_of[digest])
    engine.add_request(request("alone", digest, tokens))
    return tokens_of(run_all(engine)["alone"])


def test_one_adapter_leaving_and_one_joining_copies_their_slots_not_the_batch(tiny_llama_dir: Path) -> None:
    shapes = ModelShapes.of(tiny_llama_dir)
    weights = [
        random_weights(shapes, f"d{i:02}", 8, seed=i, dtype=torch.float32, targets=("q_proj", "v_proj"))
        for i in range(34)
    ]
    by_digest = {w.digest: w for w in weights}
    engine = make_engine(tiny_llama_dir, 40)
    for w in weights:
        engine.load_adapter(w)
    pool = engine.runner.lora.slots
    (group,) = pool.groups.values()
    # 32 running adapters, the last 32 installed, so the first step must bring them to the front.
    running = [w.digest for w in weights[2:]]
    for i, d in enumerate(running):
        engine.add_request(request(f"r{i}", d, 2 if i == 0 else 5))
    outputs: dict[str, list] = {}

    def step() -> int:
        before = pool.stats.bytes_copied
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        return pool.stats.bytes_copied - before

    step()  # prefill: all 32 join
    assert step() == 0  # a steady decode step copies nothing
    while "r0" not in outputs or outputs["r0"][-1].finish_reason is None:
        assert step() == 0
    # r0's adapter leaves, the first (never run) adapter joins: its slot and the leaver's change.
    joiner = weights[0].digest
    engine.add_request(request("joiner", joiner, 4))
    copied = step()
    assert copied == 2 * group.slot_bytes
    assert copied < 32 * group.slot_bytes / 8  # a restack would copy all 32
    assert group.table.members == 32
    while engine.has_unfinished():
        step()
    # Swapped slots still hold the right weights: the same answers as each adapter alone.
    assert tokens_of(outputs["joiner"]) == alone(tiny_llama_dir, by_digest, joiner, 4)
    assert tokens_of(outputs["r5"]) == alone(tiny_llama_dir, by_digest, running[5], 5)
    assert engine.stats().slot_bytes_copied_total == pool.stats.bytes_copied


def test_removal_keeps_slots_dense_and_the_host_copy_exact(tiny_llama_dir: Path) -> None:
    shapes = ModelShapes.of(tiny_llama_dir)
    weights = [random_weights(shapes, f"e{i:02}", 16, seed=100 + i, dtype=torch.float32) for i in range(20)]
    engine = make_engine(tiny_llama_dir, 20)
    for w in weights:
        engine.load_adapter(w)
    (group,) = engine.runner.lora.slots.groups.values()
    capacity = group.table.capacity
    removed = engine.remove_adapter(weights[3].digest)
    # The returned adapter holds its own weights, for the host tier.
    key = (0, "q_proj")
    module = weights[3].tensors[key]
    assert torch.allclose(removed.a[key][: module.rank], module.a)
    for w in weights[4:15]:
        engine.remove_adapter(w.digest)
    assert len(group) == 8 and group.table.slack <= group.table.growth() and group.table.capacity < capacity
    assert engine.stats().slot_capacity_slack_bytes == group.table.slack * group.slot_bytes
    # The survivors (one moved into each hole) still answer as they do alone.
    survivor = weights[19].digest
    engine.add_request(request("s", survivor, 4))
    by_digest = {w.digest: w for w in weights}
    assert tokens_of(run_all(engine)["s"]) == alone(tiny_llama_dir, by_digest, survivor, 4)


def test_two_thousand_resident_adapters_serve_a_batch_spread_over_the_pool(tiny_llama_dir: Path) -> None:
    shapes = ModelShapes.of(tiny_llama_dir)
    targets = ("q_proj", "v_proj")
    weights = [
        random_weights(shapes, f"p{i:04}", 8, seed=i, dtype=torch.float32, targets=targets)
        for i in range(2000)
    ]
    engine = make_engine(tiny_llama_dir, 2000)
    for w in weights:
        engine.load_adapter(w)
    (group,) = engine.runner.lora.slots.groups.values()
    assert len(group) == 2000 and group.table.slack <= group.table.growth()
    picked = [weights[i].digest for i in range(7, 2000, 250)]
    for i, d in enumerate(picked):
        engine.add_request(request(f"q{i}", d, 3))
    outputs = run_all(engine)
    by_digest = {w.digest: w for w in weights}
    for i in (0, len(picked) - 1):
        assert tokens_of(outputs[f"q{i}"]) == alone(tiny_llama_dir, by_digest, picked[i], 3)


def test_the_slot_views_a_step_reads_follow_the_buffers_when_they_are_reallocated(
    tiny_llama_dir: Path,
) -> None:
    shapes = ModelShapes.of(tiny_llama_dir)
    weights = [
        random_weights(shapes, f"v{i:02}", 8, seed=50 + i, dtype=torch.float32, targets=("q_proj", "v_proj"))
        for i in range(12)
    ]
    first = weights[0].digest
    engine = make_engine(tiny_llama_dir, 40)
    engine.load_adapter(weights[0])
    engine.add_request(request("before", first, 3))
    run_all(engine)  # the group's views of slots [0, 1) are now kept
    (group,) = engine.runner.lora.slots.groups.values()
    capacity = group.table.capacity
    for w in weights[1:]:
        engine.load_adapter(w)
    assert group.table.capacity > capacity  # new, larger buffers
    engine.add_request(request("after", first, 3))
    outputs = run_all(engine)
    key = group.modules[0]
    a, b = group.weights(1)[key]
    assert a.untyped_storage().data_ptr() == group.a[key].untyped_storage().data_ptr()
    assert b.untyped_storage().data_ptr() == group.b[key].untyped_storage().data_ptr()
    assert tokens_of(outputs["after"]) == alone(tiny_llama_dir, {first: weights[0]}, first, 3)
