"""The router on pushed worker state, against real workers over sockets: two `loraplex worker serve`
processes on the tiny Llama (registered in a real registry, discovered by the router), plus an
in-process worker that joins late.

Tests run in file order on one module stack; the last one SIGKILLs a worker.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from loraplex.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2, worker_pb2
from services.common.adapter_files import adapter_digest
from services.common.config import RouterSettings
from services.common.health import wait_serving
from services.common.net import free_port
from services.common.tls import Role
from services.devtools.tiny_model import TINY_LLAMA
from services.router.policy import Residency, WorkerView, rendezvous_order
from services.router.server import Router, start_router
from tests.fixtures.registry import RegistryProcess
from tests.fixtures.worker import (
    TINY_B_SCALE,
    TINY_KINDS,
    build_adapter,
    serving,
    worker_home,
    worker_settings,
)

WORKER_IDS = ("rw-a", "rw-b")
LATE_ID = "rw-late"
STALE_S = 3.0


@dataclass
class Stack:
    registry: RegistryProcess
    router: Router
    stub: inference_pb2_grpc.InferenceServiceStub
    tenant: str
    secret: str
    procs: dict[str, subprocess.Popen[bytes]]
    adapters: dict[str, Path]


def _spawn_worker(
    registry: RegistryProcess, models_home: Path, worker_id: str
) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    home = worker_home(models_home, TINY_LLAMA)
    env = {
        **os.environ,
        "LORAPLEX_HOME": str(home),
        "LORAPLEX_WORKER_LISTEN": f"127.0.0.1:{port}",
        "LORAPLEX_WORKER_ID": worker_id,
        "LORAPLEX_DEVICE": "cpu",
        "LORAPLEX_DTYPE": "float32",
        "LORAPLEX_KV_CACHE_BLOCKS": "128",
        "LORAPLEX_REGISTRY": registry.target,
        # The registry's store: the one place this worker may fetch adapters from.
        "LORAPLEX_ADAPTER_STORE": registry.store_dir.as_uri(),
        **registry.certs.env(Role.WORKER),
    }
    log = (home / "worker.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "loraplex"), "worker", "serve", "--model", TINY_LLAMA],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, f"127.0.0.1:{port}", home


@pytest.fixture(scope="module")
async def stack(
    registry: RegistryProcess,
    loraplex_home: Path,
    tiny_llama_dir: Path,
    worker_tiny_adapters: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    tenant = f"ws-{uuid.uuid4().hex[:10]}"
    with registry.admin() as c:
        c.create_tenant(tenant)
        secret = c.create_api_key(tenant).secret
        c.upload_adapter(worker_tiny_adapters["qv"], tenant=tenant, name="bot", base_model=TINY_LLAMA)
    spawned = {wid: _spawn_worker(registry, loraplex_home, wid) for wid in WORKER_IDS}
    procs = {wid: p for wid, (p, _, _) in spawned.items()}
    try:
        for proc, address, _ in spawned.values():
            await asyncio.to_thread(
                wait_serving, address, tls=registry.certs.files(Role.ROUTER), proc=proc, timeout_s=180
            )
        settings = RouterSettings.from_env(
            {
                "LORAPLEX_HOME": str(tmp_path_factory.mktemp("router-ws-home")),
                **registry.certs.env(Role.ROUTER),
                "LORAPLEX_REGISTRY": registry.target,
                "LORAPLEX_ROUTER_LISTEN": "127.0.0.1:0",
                "LORAPLEX_HTTP_LISTEN": "",  # the HTTP door has tests of its own
                "LORAPLEX_WORKER_REFRESH_S": "0.2",
                "LORAPLEX_ROUTER_WORKER_STALE_S": str(STALE_S),
                "LORAPLEX_ROUTER_KEEP_WARM_S": "0.2",
                "LORAPLEX_ROUTER_SHIP_INTERVAL_S": "0.1",
            }
        )
        router = await start_router(settings)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:  # public, plaintext
                s = Stack(
                    registry,
                    router,
                    inference_pb2_grpc.InferenceServiceStub(channel),
                    tenant,
                    secret,
                    procs,
                    worker_tiny_adapters,
                )
                await _until(lambda: set(WORKER_IDS) <= router.pool.live_ids(), 30, "both workers routable")
                yield s
        finally:
            await router.running.drain(1.0)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for _, _, home in spawned.values():
            shutil.rmtree(home, ignore_errors=True)


async def _until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `predicate` held; fails the test after `timeout_s`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def _views(s: Stack) -> dict[str, WorkerView]:
    return {v.worker_id: v for v in s.router.pool.views()}


def _on_device(s: Stack, digest: str) -> set[str]:
    return {w for w, v in _views(s).items() if v.accepting and v.residency.get(digest) is Residency.DEVICE}


def _request(adapter: str, max_tokens: int = 4) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        adapter=adapter,
        prompt=common_pb2.Prompt(text="hello there router"),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


async def _generate(s: Stack, req: inference_pb2.GenerateRequest) -> tuple[grpc.StatusCode, str]:
    """(status, worker id that finished it)."""
    call = s.stub.Generate(req, metadata=(("authorization", f"Bearer {s.secret}"),), timeout=30)
    worker = ""
    try:
        async for e in call:
            if e.HasField("finished"):
                worker = e.finished.worker_id
    except grpc.aio.AioRpcError:
        pass
    return await call.code(), worker


def _upload(s: Stack, kind: str, name: str, **kw: Any) -> registry_pb2.Adapter:
    with s.registry.admin() as c:
        return c.upload_adapter(s.adapters[kind], tenant=s.tenant, name=name, base_model=TINY_LLAMA, **kw)


async def test_keep_warm_adapter_reaches_a_device_without_any_request_and_leaves_when_archived(
    stack: Stack, loraplex_home: Path, tiny_llama_dir: Path
) -> None:
    # Bytes no other test registers: a READY adapter of another tenant with the same digest (the
    # session's registry holds every module's adapters) would rightly keep it on the device.
    stack.adapters["always-on"] = build_adapter(
        tiny_llama_dir,
        TINY_KINDS["mlp"],
        loraplex_home / "worker-test-adapters" / TINY_LLAMA / "mlp-router-keep-warm",
        b_scale=TINY_B_SCALE,
        seed=98,
    )
    digest = adapter_digest(stack.adapters["always-on"])
    assert not _on_device(stack, digest)
    _upload(stack, "always-on", "always-on", keep_warm=True)
    await _until(lambda: bool(_on_device(stack, digest)), 20, "keep-warm adapter on a device")
    # On one worker: its rendezvous home, where its requests go (nobody held it before).
    live = [v for v in _views(stack).values() if v.accepting]
    assert _on_device(stack, digest) == {rendezvous_order(digest, live)[0].worker_id}
    code, worker = await _generate(stack, _request("always-on"))
    assert code == grpc.StatusCode.OK and {worker} == _on_device(stack, digest)

    # Archived: the router stops keeping it warm and hints the eviction, which overrides the
    # worker's keep_warm pin; the disk copy stays.
    with stack.registry.admin() as c:
        c.archive_adapter("always-on@1", tenant=stack.tenant)
    await _until(lambda: not _on_device(stack, digest), 10, "archived keep-warm adapter evicted")
    assert digest not in stack.router.warmer.book.warm_refs()


async def test_an_archived_adapter_is_evicted_from_the_workers_holding_it(
    stack: Stack, loraplex_home: Path, tiny_llama_dir: Path
) -> None:
    fresh = build_adapter(
        tiny_llama_dir,
        TINY_KINDS["qv"],
        loraplex_home / "worker-test-adapters" / TINY_LLAMA / "qv-router-evict",
        b_scale=TINY_B_SCALE,
        seed=99,
    )
    stack.adapters["evict"] = fresh
    digest = _upload(stack, "evict", "short-lived").ref.digest
    code, worker = await _generate(stack, _request("short-lived"))
    assert code == grpc.StatusCode.OK
    await _until(lambda: worker in _on_device(stack, digest), 5, "served adapter reported on device")
    with stack.registry.admin() as c:
        c.archive_adapter("short-lived@1", tenant=stack.tenant)
    # The worker drops it from memory on the router's hint; the disk copy stays.
    await _until(lambda: not _on_device(stack, digest), 10, "archived adapter evicted")
    assert _views(stack)[worker].residency.get(digest) is Residency.DISK


async def test_a_worker_that_joins_late_is_routed_to_as_soon_as_it_reports(
    stack: Stack, loraplex_home: Path, tiny_llama_dir: Path
) -> None:
    # An adapter no other test registers, whose rendezvous home is not the late worker: only its
    # residency can draw traffic. Digests follow the adapters' bytes, so the seed is searched
    # (each home is as likely; a fixed pair of adapters had the late worker as home for both).
    probes = [WorkerView(w, TINY_LLAMA) for w in (*WORKER_IDS, LATE_ID)]
    root = loraplex_home / "worker-test-adapters" / TINY_LLAMA
    for seed in range(70, 90):
        path = build_adapter(
            tiny_llama_dir, TINY_KINDS["attn_rs"], root / f"late-only-{seed}", b_scale=TINY_B_SCALE, seed=seed
        )
        if rendezvous_order(adapter_digest(path), probes)[0].worker_id != LATE_ID:
            break
    stack.adapters["late-only"] = path
    adapter = _upload(stack, "late-only", "late-only")
    digest = adapter.ref.digest
    port = free_port()
    settings = replace(
        worker_settings(loraplex_home, TINY_LLAMA), worker_id=LATE_ID, listen=f"127.0.0.1:{port}"
    )
    async with serving(settings) as (_, worker_stub):
        await worker_stub.PrefetchAdapter(
            worker_pb2.PrefetchAdapterRequest(adapter=adapter.ref, tier=common_pb2.ADAPTER_TIER_DEVICE)
        )
        async for msg in worker_stub.WatchState(worker_pb2.WatchStateRequest()):
            held = msg.snapshot.adapters if msg.HasField("snapshot") else msg.delta.upserted
            if any(a.digest == digest and a.tier == common_pb2.ADAPTER_TIER_DEVICE for a in held):
                break
        assert LATE_ID not in stack.router.pool.live_ids()
        with stack.registry.as_role(Role.WORKER) as c:  # what the worker's own registration sends
            c.stub.RegisterWorker(
                registry_pb2.RegisterWorkerRequest(
                    worker=registry_pb2.Worker(
                        worker_id=LATE_ID, address=f"127.0.0.1:{port}", base_model=TINY_LLAMA
                    )
                ),
                metadata=c.metadata,
            )
        # Discovery every 0.2 s, then the first snapshot: routable well within a second.
        joined = await _until(lambda: LATE_ID in stack.router.pool.live_ids(), 5, "late worker routable")
        assert joined < 2.0
        assert _views(stack)[LATE_ID].residency.get(digest) is Residency.DEVICE
        for _ in range(3):
            code, worker = await _generate(stack, _request("late-only"))
            assert (code, worker) == (grpc.StatusCode.OK, LATE_ID)
    # Its server is gone: the stream breaks and the worker is out of routing at once.
    await _until(lambda: LATE_ID not in stack.router.pool.live_ids(), 1, "stopped worker out of routing")


async def test_a_silent_worker_leaves_routing_after_the_stale_limit_and_returns_with_a_snapshot(
    stack: Stack,
) -> None:
    worker = WORKER_IDS[1]
    proc = stack.procs[worker]
    proc.send_signal(signal.SIGSTOP)  # hung: the TCP connection stays open, nothing is sent
    try:
        out = await _until(
            lambda: worker not in stack.router.pool.live_ids(), STALE_S + 1.5, "silent worker out"
        )
        # Heartbeats come every 2 s: not before the stale limit's worth of silence could pass.
        assert out > 0.5
        code, served_by = await _generate(stack, _request("bot"))
        assert (code, served_by) == (grpc.StatusCode.OK, WORKER_IDS[0])
    finally:
        proc.send_signal(signal.SIGCONT)
    await _until(lambda: worker in stack.router.pool.live_ids(), 5, "resumed worker back in routing")


async def test_a_sigkilled_worker_leaves_routing_within_a_heartbeat_and_no_new_request_fails(
    stack: Stack,
) -> None:
    code, victim = await _generate(stack, _request("bot"))
    assert code == grpc.StatusCode.OK and victim in WORKER_IDS
    survivor = next(w for w in WORKER_IDS if w != victim)
    results: list[tuple[float, grpc.StatusCode, str]] = []  # (started at, status, worker)
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            code, worker = await _generate(stack, _request("bot", max_tokens=8))
            results.append((started, code, worker))

    clients = [asyncio.create_task(client()) for _ in range(3)]
    try:
        await _until(lambda: sum(r[2] == victim for r in results) >= 3, 20, "traffic on the victim")
        killed_at = time.monotonic()
        stack.procs[victim].send_signal(signal.SIGKILL)
        dropped = await _until(
            lambda: victim not in stack.router.pool.live_ids(), STALE_S, "victim out of routing"
        )
        out_at = killed_at + dropped
        await _until(lambda: sum(r[0] > out_at for r in results) >= 10, 20, "traffic after the kill")
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert dropped < 1.0  # the broken stream, not the stale timer
    failed = [r for r in results if r[1] != grpc.StatusCode.OK]
    # Only requests already streaming on the victim when it died may fail; none started after.
    assert all(started < killed_at for started, _, _ in failed), failed
    assert len(failed) <= len(clients)
    after = [r for r in results if r[0] > out_at]
    assert after and all((code, worker) == (grpc.StatusCode.OK, survivor) for _, code, worker in after)
    assert survivor in stack.router.pool.live_ids()
