"""Adapter tiers through the worker's gRPC API: a bad adapter or a hung object store fails only its
own requests, and WatchState follows an adapter through Evict, Prefetch(HOST) and Generate."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loraplex.v1 import common_pb2, worker_pb2
from services.common.adapter_files import ADAPTER_FILES, digest_hex
from services.devtools.tiny_model import TINY_LLAMA
from tests.fixtures.worker import AdapterStore, serving, worker_settings
from tests.integration.test_worker_service import Stub, gen_request, generate, status_of

DEVICE, HOST = common_pb2.ADAPTER_TIER_DEVICE, common_pb2.ADAPTER_TIER_HOST
DISK = common_pb2.ADAPTER_TIER_DISK


def sized(ref: common_pb2.AdapterRef, adapter_dir: Path) -> common_pb2.AdapterRef:
    """The reference as the registry sends it: with the files' size."""
    out = common_pb2.AdapterRef()
    out.CopyFrom(ref)
    out.size_bytes = sum((adapter_dir / name).stat().st_size for name in ADAPTER_FILES)
    return out


@pytest.fixture
def refs(
    adapter_store: AdapterStore, worker_tiny_adapters: dict[str, Path]
) -> dict[str, common_pb2.AdapterRef]:
    return {
        kind: sized(adapter_store.publish(path, base_model=TINY_LLAMA, name=kind), path)
        for kind, path in worker_tiny_adapters.items()
    }


async def snapshot(stub: Stub) -> worker_pb2.WorkerState:
    call = stub.WatchState(worker_pb2.WatchStateRequest())
    first = await call.read()
    call.cancel()
    return first.snapshot


async def wait_tier(stub: Stub, digest: str, tier: int, timeout_s: float = 5.0) -> worker_pb2.ResidentAdapter:
    """Follow WatchState until the adapter is reported at `tier` and no load of it runs."""
    call = stub.WatchState(worker_pb2.WatchStateRequest())
    adapters: dict[str, worker_pb2.ResidentAdapter] = {}
    loading: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                msg = await call.read()
                kind = msg.WhichOneof("update")
                if kind == "snapshot":
                    adapters = {a.digest: a for a in msg.snapshot.adapters}
                    loading = list(msg.snapshot.loading)
                elif kind == "delta":
                    adapters.update({a.digest: a for a in msg.delta.upserted})
                    for gone in msg.delta.removed:
                        adapters.pop(gone, None)
                    loading = list(msg.delta.loading)
                if digest in adapters and adapters[digest].tier == tier and digest not in loading:
                    return adapters[digest]
    finally:
        call.cancel()


async def test_digest_mismatch_fails_only_that_adapter_and_leaves_nothing(
    loraplex_home: Path, tiny_llama_dir: Path, refs: dict[str, common_pb2.AdapterRef]
) -> None:
    bad = common_pb2.AdapterRef()
    bad.CopyFrom(refs["qv"])  # the qv files, under a digest they do not hash to
    bad.digest = "sha256:" + "ef" * 32
    async with serving(worker_settings(loraplex_home, TINY_LLAMA)) as (worker, stub):
        good_out, bad_err = await asyncio.gather(
            generate(stub, gen_request(adapter=refs["mlp"], max_tokens=4)),
            status_of(stub, gen_request(adapter=bad, max_tokens=4)),
        )
        assert good_out.finished is not None and good_out.finished.usage.output_tokens == 4
        assert bad_err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert bad.digest in (bad_err.details() or "") and "do not match" in (bad_err.details() or "")
        state = await snapshot(stub)
        assert [a.digest for a in state.adapters] == [refs["mlp"].digest]
        assert bad.digest not in state.loading
        cache = worker.loader.cache_dir
        assert sorted(p.name for p in cache.iterdir()) == [digest_hex(refs["mlp"].digest)]
        assert bad.digest not in worker.loader.host
        assert bad.digest not in (await worker.engine.resident_adapters())
        # The good adapter is untouched and the bad one fails the same way again.
        assert (await status_of(stub, gen_request(adapter=bad))).code() == grpc.StatusCode.FAILED_PRECONDITION
        warm = await generate(stub, gen_request(adapter=refs["mlp"], max_tokens=1))
        assert warm.finished is not None and not warm.finished.timings.cold_start


@pytest.fixture
def silent_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3 endpoint that accepts connections and never answers."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "loraplex-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "loraplex-test-secret")
    try:
        yield endpoint
    finally:
        server.close()


async def test_a_hung_object_store_fails_its_adapter_without_stalling_others(
    loraplex_home: Path, tiny_llama_dir: Path, refs: dict[str, common_pb2.AdapterRef], silent_s3: str
) -> None:
    stuck = common_pb2.AdapterRef()
    stuck.CopyFrom(refs["attn_rs"])
    stuck.uri = f"s3://adapters/{digest_hex(stuck.digest)}"
    settings = worker_settings(loraplex_home, TINY_LLAMA, object_store_timeout_s=1.0)
    async with serving(settings) as (worker, stub):
        started = time.monotonic()
        hung = asyncio.create_task(status_of(stub, gen_request(adapter=stuck, max_tokens=2)))
        await asyncio.sleep(0.2)  # its fetch is waiting on the silent store now
        other = await generate(stub, gen_request(adapter=refs["qv"], max_tokens=2))
        assert other.finished is not None and other.finished.timings.cold_start
        assert not hung.done(), "the hung fetch should still be waiting"
        err = await asyncio.wait_for(hung, 15)
        elapsed = time.monotonic() - started
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        details = err.details() or ""
        assert "attn_rs@1 cannot be fetched" in details and "retry later" in details, details
        assert elapsed < 10
        state = await snapshot(stub)
        assert stuck.digest not in {a.digest for a in state.adapters} | set(state.loading)
        assert not (worker.loader.cache_dir / digest_hex(stuck.digest)).exists()


async def test_watch_state_follows_an_adapter_through_evict_prefetch_and_generate(
    loraplex_home: Path, tiny_llama_dir: Path, refs: dict[str, common_pb2.AdapterRef]
) -> None:
    ref = refs["dora"]
    async with serving(worker_settings(loraplex_home, TINY_LLAMA)) as (worker, stub):
        first = await generate(stub, gen_request(adapter=ref, max_tokens=4, ignore_eos=True))
        on_device = await wait_tier(stub, ref.digest, DEVICE)
        # Each tier reports the bytes it counts: the engine's layout on DEVICE, the files on DISK.
        sizes = worker.loader.policy.known_size(ref.digest)
        assert sizes is not None and sizes.device_bytes is not None
        assert on_device.size_bytes == sizes.device_bytes != ref.size_bytes
        assert on_device.adapter_id == "id-dora"
        assert not on_device.pinned and on_device.in_flight == 0

        assert (await stub.EvictAdapter(worker_pb2.EvictAdapterRequest(digest=ref.digest))).evicted
        on_disk = await wait_tier(stub, ref.digest, DISK)
        assert on_disk.size_bytes == ref.size_bytes

        reply = await stub.PrefetchAdapter(
            worker_pb2.PrefetchAdapterRequest(adapter=ref, tier=common_pb2.ADAPTER_TIER_HOST)
        )
        assert reply.current_tier == DISK
        await wait_tier(stub, ref.digest, HOST)

        again = await generate(stub, gen_request(adapter=ref, max_tokens=4, ignore_eos=True))
        assert again.finished is not None
        assert again.finished.timings.adapter_source_tier == HOST and again.finished.timings.cold_start
        assert again.token_ids == first.token_ids
        await wait_tier(stub, ref.digest, DEVICE)

        state = await snapshot(stub)
        estimates = {e.tier: e for e in state.load_estimates}
        assert estimates[HOST].samples == 1 and estimates[HOST].p50_ms > 0
        assert estimates[common_pb2.ADAPTER_TIER_OBJECT_STORE].samples == 1


async def test_evict_refuses_an_adapter_in_use_and_prefetch_rejects_object_store(
    loraplex_home: Path, tiny_llama_dir: Path, refs: dict[str, common_pb2.AdapterRef]
) -> None:
    ref = refs["qv"]
    async with serving(worker_settings(loraplex_home, TINY_LLAMA)) as (_, stub):
        busy = stub.Generate(gen_request(adapter=ref, max_tokens=200, ignore_eos=True))
        async for msg in busy:
            if msg.WhichOneof("event") == "delta":
                break
        pinned = await wait_tier(stub, ref.digest, DEVICE)
        assert pinned.pinned and pinned.in_flight == 1
        assert not (await stub.EvictAdapter(worker_pb2.EvictAdapterRequest(digest=ref.digest))).evicted
        busy.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PrefetchAdapter(
                worker_pb2.PrefetchAdapterRequest(adapter=ref, tier=common_pb2.ADAPTER_TIER_OBJECT_STORE)
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
