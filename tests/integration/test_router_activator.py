"""The router as activator: a base model with no live worker holds its requests until one comes up.

A real registry process, the router in this test's event loop, and synthetic workers started (as an
autoscaler would start them) after the request arrived, at the address the router already watches.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from bench.synthetic_worker import expected_token_ids, start_synthetic_worker
from loraplex.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from services.common.config import RouterSettings
from services.common.net import free_port
from services.common.tls import Role
from services.devtools.tiny_model import TINY_LLAMA
from services.router.server import Router, start_router
from tests.fixtures.registry import RegistryProcess

NEVER_STARTED = "smollm2-135m-instruct"  # in the catalog; no test here starts a worker for it


def _gauge(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"base_model": model}) or 0.0


@pytest.fixture
async def activator(
    registry: RegistryProcess, tmp_path: Path
) -> AsyncIterator[tuple[Router, inference_pb2_grpc.InferenceServiceStub, str, int]]:
    """A router watching a worker address where nothing listens yet: (router, stub, api key, port)."""
    name = f"act-{uuid.uuid4().hex[:10]}"
    with registry.admin() as c:
        c.create_tenant(name)
        secret = c.create_api_key(name).secret
    worker_port = free_port()
    settings = RouterSettings.from_env(
        {
            "LORAPLEX_HOME": str(tmp_path),
            **registry.certs.env(Role.ROUTER),
            **registry.certs.router_public_env(),
            "LORAPLEX_REGISTRY": registry.target,
            "LORAPLEX_ROUTER_LISTEN": "127.0.0.1:0",
            "LORAPLEX_HTTP_LISTEN": "",
            "LORAPLEX_WORKERS": f"127.0.0.1:{worker_port}",
            "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
            "LORAPLEX_WORKER_REFRESH_S": "0.1",
            "LORAPLEX_ROUTER_SHIP_INTERVAL_S": "0.1",
            "LORAPLEX_ROUTER_COLD_QUEUE": "4",
            "LORAPLEX_ROUTER_COLD_WAIT_S": "30",
        }
    )
    router = await start_router(settings)
    ca = registry.certs.files(Role.ROUTER).ca.read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{router.port}", creds) as channel:
            yield router, inference_pb2_grpc.InferenceServiceStub(channel), secret, worker_port
    finally:
        await router.running.drain(1.0)


def _request(model: str, max_tokens: int = 4) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=model,
        prompt=common_pb2.Prompt(text="wake up"),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )


async def _collect(
    call: grpc.aio.UnaryStreamCall,
) -> tuple[list[inference_pb2.GenerateResponse], grpc.StatusCode, str]:
    events = []
    try:
        async for e in call:
            events.append(e)
    except grpc.aio.AioRpcError:
        pass
    return events, await call.code(), await call.details() or ""


async def _until(predicate: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_request_waits_for_a_worker_started_after_it_and_completes(
    registry: RegistryProcess, activator: tuple[Router, inference_pb2_grpc.InferenceServiceStub, str, int]
) -> None:
    router, stub, secret, port = activator
    md = (("authorization", f"Bearer {secret}"),)
    assert router.cold is not None
    calls = [stub.Generate(_request(TINY_LLAMA), metadata=md, timeout=30) for _ in range(2)]
    results = [asyncio.ensure_future(_collect(c)) for c in calls]
    await _until(lambda: router.cold is not None and router.cold.pending(TINY_LLAMA) == 2)
    # What an autoscaler watches: held requests, not counted as in flight; no live worker.
    assert _gauge("loraplex_router_pending_requests", TINY_LLAMA) == 2
    assert _gauge("loraplex_router_live_workers", TINY_LLAMA) == 0
    assert not any(r.done() for r in results)
    # The autoscaler starts a worker at the address the router watches.
    started = time.monotonic()
    worker = await start_synthetic_worker(
        "cold-1", TINY_LLAMA, tls=registry.certs.files(Role.WORKER), port=port
    )
    try:
        done = await asyncio.wait_for(asyncio.gather(*results), 15)
        elapsed = time.monotonic() - started
    finally:
        await worker.server.stop(0)
    for events, code, details in done:
        assert code == grpc.StatusCode.OK, details
        tokens = [t for e in events if e.HasField("delta") for t in e.delta.token_ids]
        assert tokens == expected_token_ids(4)
        assert events[-1].finished.worker_id == "cold-1"
    assert len(worker.worker.requests) == 2
    # Dispatched on the worker's first snapshot (refresh 0.1 s), not on the 0.5 s re-check or later.
    assert elapsed < 3.0
    assert router.cold.pending(TINY_LLAMA) == 0
    assert _gauge("loraplex_router_pending_requests", TINY_LLAMA) == 0


async def test_overflow_is_refused_at_once_naming_the_model(
    activator: tuple[Router, inference_pb2_grpc.InferenceServiceStub, str, int],
) -> None:
    router, stub, secret, _ = activator
    md = (("authorization", f"Bearer {secret}"),)
    held = [stub.Generate(_request(NEVER_STARTED), metadata=md, timeout=20) for _ in range(4)]
    results = [asyncio.ensure_future(_collect(c)) for c in held]
    await _until(lambda: router.cold is not None and router.cold.pending(NEVER_STARTED) == 4)
    started = time.monotonic()
    _, code, details = await _collect(stub.Generate(_request(NEVER_STARTED), metadata=md, timeout=20))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert NEVER_STARTED in details and "LORAPLEX_ROUTER_COLD_QUEUE" in details
    assert time.monotonic() - started < 2.0
    for c in held:
        c.cancel()
    await asyncio.gather(*results, return_exceptions=True)
    # Cancelled waiters leave the queue (and the gauge) at once.
    await _until(lambda: router.cold is not None and router.cold.pending(NEVER_STARTED) == 0)
    assert _gauge("loraplex_router_pending_requests", NEVER_STARTED) == 0


async def test_wait_cap_ends_in_unavailable_and_caller_deadline_in_deadline_exceeded(
    activator: tuple[Router, inference_pb2_grpc.InferenceServiceStub, str, int],
) -> None:
    router, stub, secret, _ = activator
    md = (("authorization", f"Bearer {secret}"),)
    assert router.cold is not None
    router.cold.max_wait_s = 0.6
    started = time.monotonic()
    _, code, details = await _collect(stub.Generate(_request(NEVER_STARTED), metadata=md, timeout=20))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert f"no worker for base model {NEVER_STARTED!r} came up within 0.6s" in details
    assert 0.5 < time.monotonic() - started < 3.0
    router.cold.max_wait_s = 30.0
    started = time.monotonic()
    _, code, _ = await _collect(stub.Generate(_request(NEVER_STARTED), metadata=md, timeout=0.7))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3.0
    await _until(lambda: router.cold is not None and router.cold.pending(NEVER_STARTED) == 0)
