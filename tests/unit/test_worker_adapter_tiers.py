"""The adapter loader carrying out the tier policy on the tiny Llama with real PEFT adapters and tiny
byte budgets: pins hold under pressure, demotion keeps the device layout, disk budgets delete
files, a restart takes over the cache within budget, keep_warm survives idle expiry, a cold load
writes its disk copy behind it, DEVICE counts the bytes the engine really holds."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.adapter_files import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    SafetensorsHeader,
    adapter_digest,
    read_safetensors_header,
)
from services.worker.adapters import (
    AdapterLoader,
    AdaptersBusy,
    AdapterSpec,
    AdapterTooLarge,
    AdapterUnreadable,
    Tier,
    fetch_to_cache,
)
from services.worker.adapters.sizing import planned_device_bytes
from services.worker.async_engine import AsyncEngine
from services.worker.engine.adapter_slots import DeviceAdapter
from services.worker.engine.config import EngineConfig
from services.worker.engine.llm_engine import EngineRequest, LLMEngine
from services.worker.engine.sampling import SamplingParams
from services.worker.tiers import TierBudgets
from tests.engine_support import load_weights

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173]
BIG = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def engine(tiny_llama_dir: Path) -> AsyncIterator[AsyncEngine]:
    config = EngineConfig(model_dir=tiny_llama_dir, dtype=torch.float32, device="cpu", kv_cache_blocks=64)
    engine = AsyncEngine(await asyncio.to_thread(LLMEngine, config))
    engine.start()
    yield engine
    await engine.shutdown()


@pytest.fixture
def specs(worker_tiny_adapters: dict[str, Path]) -> dict[str, AdapterSpec]:
    """The tiny adapters in a file:// store, with their file bytes as the registry reports them."""
    return {kind: stored_spec(path, f"{kind}@1") for kind, path in worker_tiny_adapters.items()}


def stored_spec(path: Path, label: str) -> AdapterSpec:
    """An adapter directory as a file:// store, with its file bytes as the registry reports them."""
    return AdapterSpec(
        digest=adapter_digest(path),
        uri=path.as_uri(),
        label=label,
        size_bytes=sum((path / name).stat().st_size for name in ADAPTER_FILES),
    )


@pytest.fixture
def device_bytes(engine: AsyncEngine, worker_tiny_adapters: dict[str, Path]) -> dict[str, int]:
    """What each tiny adapter occupies on DEVICE (and HOST) in the fp32 engine: what those
    budgets count, unlike the file bytes DISK counts."""
    return {
        kind: planned_device_bytes(
            read_safetensors_header(path / ADAPTER_WEIGHTS).tensors, engine.linear_shape, torch.float32
        )
        for kind, path in worker_tiny_adapters.items()
    }


MakeLoader = Callable[..., Awaitable[AdapterLoader]]


@pytest.fixture
async def make_loader(engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[MakeLoader]:
    made: list[AdapterLoader] = []

    async def make(
        device: int = BIG, host: int = BIG, disk: int = BIG, ttl: float = 300.0, clock: Clock | None = None
    ) -> AdapterLoader:
        loader = AdapterLoader(
            engine,
            tmp_path / "worker-cache",
            base_model="",
            dtype=torch.float32,
            budgets=TierBudgets(device_bytes=device, host_bytes=host, disk_bytes=disk),
            idle_ttl_s=ttl,
            max_adapter_bytes=8 << 20,  # the edge adapter's embeddings are 3 MiB
            clock=clock or Clock(),
            expire_every_s=3600,  # the tests call expire_idle themselves
        )
        await loader.start()
        made.append(loader)
        return loader

    yield make
    for loader in made:
        await loader.close()


async def greedy(engine: AsyncEngine, digest: str, request_id: str) -> list[int]:
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    stream = await engine.add_request(EngineRequest(request_id, PROMPT, sampling, digest))
    return [t async for out in stream for t in out.new_token_ids]


async def test_budget_pressure_never_evicts_an_adapter_a_request_holds(
    engine: AsyncEngine, make_loader: MakeLoader, specs: dict[str, AdapterSpec], device_bytes: dict[str, int]
) -> None:
    qv, mlp = specs["qv"], specs["mlp"]
    loader = await make_loader(device=max(device_bytes["qv"], device_bytes["mlp"]))  # one at a time
    held = await loader.acquire(qv)
    with pytest.raises(AdaptersBusy, match=r"adapter mlp@1 cannot be loaded now: .*retry shortly"):
        await loader.acquire(mlp, wait_s=0.05)
    assert (await engine.resident_adapters()) == [qv.digest]
    # A request that may wait does, and gets the device once the holder lets go.
    waiting = asyncio.create_task(loader.acquire(mlp, wait_s=10))
    await asyncio.sleep(0.1)
    assert not waiting.done() and (await engine.resident_adapters()) == [qv.digest]
    loader.release(held)
    lease = await asyncio.wait_for(waiting, 10)
    assert lease.source_tier == Tier.OBJECT_STORE and lease.load_ms >= 100
    assert (await engine.resident_adapters()) == [mlp.digest]
    assert loader.policy.tier_of(qv.digest) == Tier.HOST  # demoted, not dropped
    loader.release(lease)


async def test_host_demotion_and_reload_give_the_same_greedy_output_as_a_fresh_load(
    engine: AsyncEngine, make_loader: MakeLoader, specs: dict[str, AdapterSpec], device_bytes: dict[str, int]
) -> None:
    dora, mlp = specs["dora"], specs["mlp"]  # DoRA: its folded factor must survive the round trip
    loader = await make_loader(device=max(device_bytes["dora"], device_bytes["mlp"]))
    fresh = await loader.acquire(dora)
    expected = await greedy(engine, dora.digest, "fresh")
    loader.release(fresh)
    loader.release(await loader.acquire(mlp))  # no room for both: dora moves to host
    await loader.settle()
    assert loader.policy.tier_of(dora.digest) == Tier.HOST and dora.digest in loader.host
    assert (await engine.resident_adapters()) == [mlp.digest]
    back = await loader.acquire(dora)
    assert back.source_tier == Tier.HOST and back.cold_start
    assert dora.digest not in loader.host  # moved to the device, not copied
    assert await greedy(engine, dora.digest, "from-host") == expected
    loader.release(back)
    # And the same again from the disk copy alone (an eviction drops device and host copies).
    assert await loader.evict(dora.digest)
    assert loader.policy.tier_of(dora.digest) == Tier.DISK
    from_disk = await loader.acquire(dora)
    assert from_disk.source_tier == Tier.DISK
    assert await greedy(engine, dora.digest, "from-disk") == expected
    loader.release(from_disk)


async def test_a_cold_load_writes_its_disk_copy_behind_and_a_failed_write_only_costs_a_refetch(
    engine: AsyncEngine, make_loader: MakeLoader, specs: dict[str, AdapterSpec], tmp_path: Path
) -> None:
    qv, mlp = specs["qv"], specs["mlp"]
    loader = await make_loader()
    cache = tmp_path / "worker-cache"
    lease = await loader.acquire(qv)
    assert lease.source_tier == Tier.OBJECT_STORE and (await engine.resident_adapters()) == [qv.digest]
    await loader.settle()  # the disk copy follows the load; verified bytes, renamed into place
    assert adapter_digest(cache / qv.digest[7:]) == qv.digest
    loader.release(lease)

    # A disk that refuses the write: the load still succeeds from memory; the missing copy is
    # fetched again (from the object store) when the adapter next needs it.
    blocker = cache / mlp.digest[7:]
    blocker.write_text("a file where the adapter's directory should go")  # root ignores chmod
    lease = await loader.acquire(mlp)
    await loader.settle()
    assert lease.source_tier == Tier.OBJECT_STORE and not blocker.is_dir()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging left behind
    loader.release(lease)
    blocker.unlink()
    assert await loader.evict(mlp.digest)
    again = await loader.acquire(mlp)
    assert again.source_tier == Tier.OBJECT_STORE and adapter_digest(cache / mlp.digest[7:]) == mlp.digest
    loader.release(again)


async def test_a_copy_fetched_only_to_learn_the_size_of_a_refused_adapter_is_not_kept(
    make_loader: MakeLoader, specs: dict[str, AdapterSpec], tmp_path: Path, device_bytes: dict[str, int]
) -> None:
    qv = specs["qv"]
    loader = await make_loader(device=device_bytes["qv"] - 1)
    unsized = AdapterSpec(**{**qv.__dict__, "size_bytes": 0})  # the size is learnt by fetching
    with pytest.raises(AdapterTooLarge, match="DEVICE budget"):
        await loader.acquire(unsized)
    assert not (tmp_path / "worker-cache" / qv.digest[7:]).exists()
    assert loader.policy.resident_bytes(Tier.DISK) == 0


async def test_a_copy_fetched_to_learn_the_size_of_an_adapter_this_model_cannot_hold_is_not_kept(
    make_loader: MakeLoader, worker_tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    # Verified files (the digest matches) whose weights name a layer the tiny model lacks: the
    # device size cannot be planned, after a fetch that ran only to learn the file size.
    odd = tmp_path / "odd-adapter"
    shutil.copytree(worker_tiny_adapters["qv"], odd)
    tensors = load_file(odd / ADAPTER_WEIGHTS)
    name = next(iter(tensors))
    tensors[re.sub(r"layers\.\d+\.", "layers.99.", name)] = tensors.pop(name)
    save_file(tensors, odd / ADAPTER_WEIGHTS)
    spec = AdapterSpec(digest=adapter_digest(odd), uri=odd.as_uri(), label="odd@1", size_bytes=0)
    loader = await make_loader()
    with pytest.raises(AdapterUnreadable, match=r"odd@1 cannot be read: .*layer 99"):
        await loader.acquire(spec)
    assert not (tmp_path / "worker-cache" / spec.digest[7:]).exists()
    assert loader.policy.known_size(spec.digest) is None
    assert loader.policy.resident_bytes(Tier.DISK) == 0


async def test_disk_budget_deletes_the_evicted_adapters_directory(
    make_loader: MakeLoader, specs: dict[str, AdapterSpec], tmp_path: Path
) -> None:
    kinds = ["qv", "dora", "attn_rs"]
    budget = sum(specs[k].size_bytes for k in kinds) - 1  # one of the three must go
    loader = await make_loader(disk=budget)
    for kind in kinds:
        assert loader.prefetch(specs[kind], Tier.DISK) == Tier.OBJECT_STORE
        await loader.settle()
    on_disk = {k for k in kinds if (tmp_path / "worker-cache" / specs[k].digest[7:]).is_dir()}
    assert on_disk == {k for k in kinds if loader.policy.tier_of(specs[k].digest) == Tier.DISK}
    assert len(on_disk) == 2 and "attn_rs" in on_disk
    assert loader.policy.resident_bytes(Tier.DISK) <= budget
    assert not [p for p in (tmp_path / "worker-cache").iterdir() if p.name.startswith(".")]


async def test_restart_takes_over_the_disk_cache_within_budget_oldest_deleted(
    make_loader: MakeLoader, specs: dict[str, AdapterSpec], tmp_path: Path
) -> None:
    cache = tmp_path / "worker-cache"
    kinds = ["qv", "dora", "attn_rs"]  # oldest first
    for age, kind in enumerate(reversed(kinds)):
        _, path = fetch_to_cache(specs[kind], cache, max_bytes=1 << 20)
        os.utime(path, (1_000_000 - age * 100, 1_000_000 - age * 100))
    (cache / ".fetch-crashed").mkdir()
    budget = specs["dora"].size_bytes + specs["attn_rs"].size_bytes
    loader = await make_loader(disk=budget)
    assert sorted(p.name for p in cache.iterdir()) == sorted(specs[k].digest[7:] for k in ["dora", "attn_rs"])
    assert loader.policy.tier_of(specs["dora"].digest) == Tier.DISK
    assert loader.policy.tier_of(specs["attn_rs"].digest) == Tier.DISK
    assert loader.policy.tier_of(specs["qv"].digest) == Tier.OBJECT_STORE
    assert loader.policy.resident_bytes(Tier.DISK) == budget
    lease = await loader.acquire(specs["attn_rs"])
    assert lease.source_tier == Tier.DISK
    loader.release(lease)


async def test_keep_warm_adapter_survives_idle_expiry_while_another_is_demoted(
    engine: AsyncEngine, make_loader: MakeLoader, specs: dict[str, AdapterSpec]
) -> None:
    clock = Clock()
    loader = await make_loader(ttl=60.0, clock=clock)
    warm = AdapterSpec(**{**specs["qv"].__dict__, "keep_warm": True})
    cold = specs["mlp"]
    for spec in (warm, cold):
        loader.release(await loader.acquire(spec))
    clock.now += 59
    await loader.expire_idle()
    assert set(await engine.resident_adapters()) == {warm.digest, cold.digest}
    clock.now += 2
    await loader.expire_idle()
    assert (await engine.resident_adapters()) == [warm.digest]
    assert loader.policy.tier_of(cold.digest) == Tier.HOST and cold.digest in loader.host
    held, _ = loader.view()
    pinned = {h.digest: h.pinned for h in held}
    assert pinned == {warm.digest: True, cold.digest: False}
    # keep_warm is what the latest reference says: once cleared, the adapter scales to zero too.
    loader.release(await loader.acquire(specs["qv"]))
    clock.now += 61
    await loader.expire_idle()
    assert (await engine.resident_adapters()) == []


async def test_an_eviction_the_engine_refuses_leaves_the_accounting_matching_the_engine(
    engine: AsyncEngine, make_loader: MakeLoader, specs: dict[str, AdapterSpec]
) -> None:
    """A request still runs on the adapter when its lease is gone (the real race: the servicer lets
    go as the stream ends, the engine frees the sequence a step later). The engine refuses the
    removal; the policy must count the device copy again, not plan on bytes that are in use."""
    qv = specs["qv"]
    loader = await make_loader()
    loader.release(await loader.acquire(qv))
    sampling = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)
    await engine.add_request(EngineRequest("still-running", PROMPT, sampling, qv.digest))
    assert await loader.evict(qv.digest) is False
    assert loader.policy.tier_of(qv.digest) == Tier.DEVICE
    sizes = loader.policy.known_size(qv.digest)
    assert sizes is not None and loader.resident_bytes()["device"] == sizes.device_bytes
    assert await engine.resident_adapters() == [qv.digest]
    engine.abort("still-running")
    assert await loader.evict(qv.digest) is True
    assert loader.policy.tier_of(qv.digest) == Tier.DISK and loader.resident_bytes()["device"] == 0
    assert await engine.resident_adapters() == []


def _engine_layout_bytes(adapter: DeviceAdapter) -> int:
    """The bytes of every tensor the engine holds for a prepared adapter (slots and edges)."""
    tensors = [t for d in (adapter.a, adapter.b_t, adapter.dora_scale) for t in d.values()]
    tensors += [t for e in (adapter.embed, adapter.lm_head) if e is not None for t in e.tensors()]
    return sum(t.nbytes for t in tensors)


@pytest.fixture
def mixed(
    specs: dict[str, AdapterSpec], worker_tiny_adapters: dict[str, Path], tiny_edge_adapters: dict[str, Path]
) -> dict[str, tuple[AdapterSpec, Path]]:
    """qv (rank 4, padded to 8), dora, mlp (rank 16) and one with edge LoRA beside attention."""
    edge = tiny_edge_adapters["edges-attn"]
    out = {k: (specs[k], worker_tiny_adapters[k]) for k in ("qv", "dora", "mlp")}
    out["edges-attn"] = (stored_spec(edge, "edges-attn@1"), edge)
    return out


async def test_device_resident_bytes_are_the_bytes_the_engine_holds_for_its_adapters(
    engine: AsyncEngine, make_loader: MakeLoader, mixed: dict[str, tuple[AdapterSpec, Path]]
) -> None:
    loader = await make_loader()
    held = 0
    for spec, path in mixed.values():
        loader.release(await loader.acquire(spec))
        held += _engine_layout_bytes(engine.prepare_adapter(load_weights(path, torch.float32)))
    assert sorted(await engine.resident_adapters()) == sorted(s.digest for s, _ in mixed.values())
    files = sum(s.size_bytes for s, _ in mixed.values())
    assert loader.resident_bytes() == {"device": held, "host": 0, "disk": files}
    assert held != files
    # WatchState reports each adapter with the bytes of its tier.
    rows, _ = loader.view()
    assert sum(r.size_bytes for r in rows) == held


async def test_a_device_budget_that_fits_by_file_bytes_but_not_by_slot_bytes_evicts_or_refuses(
    engine: AsyncEngine, make_loader: MakeLoader, mixed: dict[str, tuple[AdapterSpec, Path]]
) -> None:
    three = [mixed[k][0] for k in ("qv", "dora", "mlp")]
    device = {
        s.digest: _engine_layout_bytes(engine.prepare_adapter(load_weights(mixed[k][1], torch.float32)))
        for k, s in zip(("qv", "dora", "mlp"), three, strict=True)
    }
    budget = sum(s.size_bytes for s in three)
    assert sum(device.values()) > budget >= max(device.values())  # fits by files, not by slots
    loader = await make_loader(device=budget, host=0)
    leases = [await loader.acquire(s) for s in three[:2]]
    with pytest.raises(AdaptersBusy):  # both held: no room for the third's slot bytes
        await loader.acquire(three[2], wait_s=0.1)
    for lease in leases:
        loader.release(lease)
    loader.release(await loader.acquire(three[2]))  # now one of the others leaves the device
    resident = await engine.resident_adapters()
    assert three[2].digest in resident and len(resident) < 3
    assert loader.resident_bytes()["device"] == sum(device[d] for d in resident) <= budget


async def test_a_load_planned_from_a_header_the_verified_files_contradict_fails_and_leaves_nothing(
    engine: AsyncEngine,
    make_loader: MakeLoader,
    worker_tiny_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    # The race the check is for: the object's weights change between the ranged header read and
    # the verified download. The store holds a smaller adapter's weights while the header is
    # read, and the adapter's own (the digest's) again before the download.
    store = tmp_path / "store-mlp"
    shutil.copytree(worker_tiny_adapters["mlp"], store)
    spec = stored_spec(store, "mlp@1")
    own = (store / ADAPTER_WEIGHTS).read_bytes()
    shutil.copy(worker_tiny_adapters["qv"] / ADAPTER_WEIGHTS, store / ADAPTER_WEIGHTS)
    loader = await make_loader()
    read_header = loader.fetcher.weights_header

    async def header_then_restored(s: AdapterSpec) -> SafetensorsHeader:
        header = await read_header(s)
        (store / ADAPTER_WEIGHTS).write_bytes(own)
        return header

    loader.fetcher.weights_header = header_then_restored  # type: ignore[method-assign,assignment]
    with pytest.raises(AdapterUnreadable, match=r"mlp@1 occupies \d+ bytes .* not the \d+ bytes its header"):
        await loader.acquire(spec)
    await loader.settle()
    assert (await engine.resident_adapters()) == []
    assert loader.policy.resident_bytes(Tier.DEVICE) == 0 and loader.policy.resident_bytes(Tier.HOST) == 0
    # The verified copy itself is sound: asked again, the adapter loads from what is now on disk.
    loader.fetcher.weights_header = read_header  # type: ignore[method-assign]
    lease = await loader.acquire(spec)
    assert (await engine.resident_adapters()) == [spec.digest]
    loader.release(lease)
