"""Tenant limits, revocation and input bounds through a real router: a real registry process (limits,
change feed, usage ledger), synthetic workers that record what reaches them, routers in this loop.

The auth cache TTL here is 5 minutes: a revoked key that stops working within a second was
stopped by the change feed, not by the cache expiring.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from bench.synthetic_worker import RunningSyntheticWorker, start_synthetic_worker
from loraplex.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2, registry_pb2_grpc
from services.common.config import RouterSettings
from services.common.net import free_port
from services.common.tls import Role
from services.devtools.tiny_model import TINY_LLAMA
from services.router.registry_view import RegistryView, Unauthenticated
from services.router.server import Router, start_router
from tests.fixtures.registry import RegistryProcess

AUTH_TTL_S = 300.0
MIB = 1 << 20


@dataclass
class Tenant:
    tenant_id: str
    name: str
    secret: str
    key_id: str


@dataclass
class Result:
    code: grpc.StatusCode
    details: str
    trailing: dict[str, str]
    tokens: int


@dataclass
class Stack:
    registry: RegistryProcess
    workers: list[RunningSyntheticWorker]
    router: Router
    stub: inference_pb2_grpc.InferenceServiceStub
    home: Path

    def seen_by_workers(self) -> int:
        return sum(len(w.worker.requests) for w in self.workers)


def _settings(
    s: RegistryProcess, home: Path, workers: list[RunningSyntheticWorker], **env: str
) -> RouterSettings:
    return RouterSettings.from_env(
        {
            "LORAPLEX_HOME": str(home),
            **s.certs.env(Role.ROUTER),
            **s.certs.router_public_env(),
            "LORAPLEX_REGISTRY": s.target,
            "LORAPLEX_ROUTER_LISTEN": "127.0.0.1:0",
            "LORAPLEX_HTTP_LISTEN": "",  # the HTTP door has tests of its own
            "LORAPLEX_WORKERS": ",".join(w.address for w in workers),
            "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
            "LORAPLEX_AUTH_CACHE_TTL_S": str(AUTH_TTL_S),
            "LORAPLEX_ROUTER_SHIP_INTERVAL_S": "0.1",
            "LORAPLEX_ROUTER_QUOTA_REFRESH_S": "0.2",
            **env,
        }
    )


@asynccontextmanager
async def _router(
    settings: RouterSettings,
) -> AsyncIterator[tuple[Router, inference_pb2_grpc.InferenceServiceStub]]:
    router = await start_router(settings)
    await asyncio.wait_for(router.registry.watch_connected.wait(), 10)
    try:
        ca = settings.tls.ca.read_bytes() if settings.tls is not None else None
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(f"127.0.0.1:{router.port}", credentials) as channel:
            yield router, inference_pb2_grpc.InferenceServiceStub(channel)
    finally:
        await router.running.drain(1.0)


@pytest.fixture(scope="module")
async def stack(registry: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    worker_tls = registry.certs.files(Role.WORKER)
    workers = [await start_synthetic_worker(f"lim-{i}", TINY_LLAMA, tls=worker_tls) for i in range(2)]
    home = tmp_path_factory.mktemp("limits-router")
    async with _router(_settings(registry, home, workers)) as (router, stub):
        yield Stack(registry, workers, router, stub, home)
    for w in workers:
        await w.server.stop(0)


@pytest.fixture
def s(stack: Stack) -> Stack:
    for w in stack.workers:
        w.worker.reset()
    return stack


def _tenant(registry: RegistryProcess, **limits: int) -> Tenant:
    name = f"lim-{uuid.uuid4().hex[:10]}"
    with registry.admin() as c:
        t = c.create_tenant(name)
        if limits:
            c.set_tenant_limits(name, **limits)
        key = c.create_api_key(name)
    return Tenant(t.tenant_id, name, key.secret, key.api_key.key_id)


def _request(
    max_tokens: int = 5, prompt: str = "one two three", stop: list[str] | None = None
) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=TINY_LLAMA,
        prompt=common_pb2.Prompt(text=prompt),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, stop=stop or []),
    )


async def _generate(
    stub: inference_pb2_grpc.InferenceServiceStub, secret: str, req: inference_pb2.GenerateRequest
) -> Result:
    call = stub.Generate(req, metadata=(("authorization", f"Bearer {secret}"),))
    tokens = 0
    try:
        async for e in call:
            tokens += len(e.delta.token_ids)
    except grpc.aio.AioRpcError:
        pass
    trailing = {k: v for k, v in (await call.trailing_metadata() or ()) if isinstance(v, str)}
    return Result(await call.code(), await call.details() or "", trailing, tokens)


async def _rest(call: Any) -> list[inference_pb2.GenerateResponse]:
    """The remaining events of a call already read from with read()."""
    events = []
    while (e := await call.read()) is not grpc.aio.EOF:
        events.append(e)
    return events


async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _ledger_tokens(s: Stack, tenant: Tenant) -> int:
    with psycopg.connect(s.registry.database_url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(input_tokens + output_tokens), 0) FROM usage_records WHERE tenant_id = %s",
            (tenant.tenant_id,),
        ).fetchone()
    return int(row[0]) if row else 0


def _limits_seen(router: Router, tenant: Tenant) -> Any:
    info = router.registry._tenants.get(tenant.tenant_id)
    return info.limits if info is not None else None


# -- input bounds --------------------------------------------------------------------------------


async def test_a_6_mib_prompt_is_refused_at_once_and_no_worker_sees_it(s: Stack) -> None:
    t = _tenant(s.registry)
    assert (await _generate(s.stub, t.secret, _request())).code == grpc.StatusCode.OK  # key cached
    for w in s.workers:
        w.worker.reset()
    started = time.perf_counter()
    r = await _generate(s.stub, t.secret, _request(prompt="x" * (6 * MIB)))
    elapsed = time.perf_counter() - started
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT, r.details
    assert f"at most {MIB} bytes" in r.details
    assert elapsed < 0.5, f"refused only after {elapsed:.2f}s"
    assert s.seen_by_workers() == 0


@pytest.mark.parametrize(
    ("req", "phrase"),
    [
        (
            inference_pb2.GenerateRequest(
                model=TINY_LLAMA,
                prompt=common_pb2.Prompt(
                    chat=common_pb2.ChatPrompt(
                        messages=[common_pb2.ChatMessage(role="user", content="hi")] * 257
                    )
                ),
            ),
            "at most 256",
        ),
        (_request(stop=["s"] * 9), "at most 8 stop strings"),
        (_request(stop=["s" * 257]), "at most 256 bytes"),
        (
            inference_pb2.GenerateRequest(
                model=TINY_LLAMA,
                prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIdsPrompt(ids=[1] * 100_000)),
            ),
            "context length",
        ),
        (_request(max_tokens=1_000_000), "context length"),
    ],
)
async def test_each_input_bound_is_invalid_argument_before_any_worker(
    s: Stack, req: inference_pb2.GenerateRequest, phrase: str
) -> None:
    t = _tenant(s.registry)
    r = await _generate(s.stub, t.secret, req)
    assert r.code == grpc.StatusCode.INVALID_ARGUMENT and phrase in r.details, r.details
    assert s.seen_by_workers() == 0


# -- revocation ------------------------------------------------------------------------------------


async def test_a_revoked_key_is_refused_within_one_second(s: Stack) -> None:
    t = _tenant(s.registry)
    assert (await _generate(s.stub, t.secret, _request())).code == grpc.StatusCode.OK
    with s.registry.admin() as c:
        c.revoke_api_key(t.key_id)
    revoked_at = time.monotonic()
    while True:
        r = await _generate(s.stub, t.secret, _request())
        elapsed = time.monotonic() - revoked_at
        if r.code == grpc.StatusCode.UNAUTHENTICATED:
            break
        assert r.code == grpc.StatusCode.OK
        assert elapsed < 1.0, "the revoked key still worked after 1 s"
        await asyncio.sleep(0.02)
    assert elapsed < 1.0
    assert "revoked" in r.details


async def test_a_stream_open_at_revocation_runs_to_its_end(s: Stack) -> None:
    t = _tenant(s.registry)
    for w in s.workers:
        w.worker.token_delay_s = 0.02
    call = s.stub.Generate(_request(max_tokens=60), metadata=(("authorization", f"Bearer {t.secret}"),))
    await call.read()  # started
    with s.registry.admin() as c:
        c.revoke_api_key(t.key_id)
    await _until(lambda: s.router.registry._revoked.get(t.key_id) is not None, 2.0)
    events = await _rest(call)
    assert await call.code() == grpc.StatusCode.OK
    assert events[-1].finished.usage.output_tokens == 60
    assert (await _generate(s.stub, t.secret, _request())).code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_key_seen_revoked_is_never_served_from_the_stale_cache(s: Stack) -> None:
    t = _tenant(s.registry)
    async with s.registry.certs.aio_channel(s.registry.target, Role.ROUTER) as live:
        view = RegistryView(live, auth_ttl_s=0.0, stale_s=300.0)
        await view.authenticate(t.secret)
        with s.registry.admin() as c:
            revoked = c.revoke_api_key(t.key_id)
        view.apply_change(registry_pb2.WatchAdaptersResponse(revision=1, revoked_api_key=revoked))
        async with s.registry.certs.aio_channel(f"127.0.0.1:{free_port()}", Role.ROUTER) as dead:
            view._stub = registry_pb2_grpc.AdapterRegistryServiceStub(dead)  # the registry goes away
            with pytest.raises(Unauthenticated):
                await view.authenticate(t.secret)


# -- limits ------------------------------------------------------------------------------------------


async def test_requests_per_s_over_the_limit_is_resource_exhausted_with_pushback(s: Stack) -> None:
    t = _tenant(s.registry, requests_per_s=3)
    started = time.monotonic()
    results = await asyncio.gather(*(_generate(s.stub, t.secret, _request(max_tokens=1)) for _ in range(12)))
    elapsed = time.monotonic() - started
    admitted = sum(r.code == grpc.StatusCode.OK for r in results)
    # The burst of 3, plus what 3/s refills while the burst is served (nothing, on a quick machine).
    assert 3 <= admitted <= 3 + int(3 * elapsed), (admitted, elapsed)
    refused = next(r for r in results if r.code != grpc.StatusCode.OK)
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"tenant {t.name!r} is over its limit of 3 requests/s; retry in" in refused.details
    pushback = int(refused.trailing["grpc-retry-pushback-ms"])
    assert 0 < pushback <= 334
    await asyncio.sleep(0.34)
    assert (await _generate(s.stub, t.secret, _request(max_tokens=1))).code == grpc.StatusCode.OK


async def test_a_long_stream_holds_the_tenants_only_concurrency_slot(s: Stack) -> None:
    t = _tenant(s.registry, max_concurrent=1)
    other = _tenant(s.registry, max_concurrent=1)
    for w in s.workers:
        w.worker.token_delay_s = 0.02
    call = s.stub.Generate(_request(max_tokens=50), metadata=(("authorization", f"Bearer {t.secret}"),))
    await call.read()  # started: the stream holds the slot
    second = await _generate(s.stub, t.secret, _request(max_tokens=1))
    assert second.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its limit of 1 concurrent requests" in second.details
    assert int(second.trailing["grpc-retry-pushback-ms"]) > 0
    # Another tenant is not affected.
    assert (await _generate(s.stub, other.secret, _request(max_tokens=1))).code == grpc.StatusCode.OK
    await _rest(call)
    assert await call.code() == grpc.StatusCode.OK
    assert (await _generate(s.stub, t.secret, _request(max_tokens=1))).code == grpc.StatusCode.OK


async def test_a_cancelled_stream_releases_its_slot(s: Stack) -> None:
    t = _tenant(s.registry, max_concurrent=1)
    for w in s.workers:
        w.worker.token_delay_s = 0.05
    call = s.stub.Generate(_request(max_tokens=100), metadata=(("authorization", f"Bearer {t.secret}"),))
    await call.read()
    call.cancel()
    await _until(lambda: s.router.servicer._limit_gate.limiter.inflight(t.tenant_id) == 0, 5.0)  # type: ignore[union-attr]
    assert (await _generate(s.stub, t.secret, _request(max_tokens=1))).code == grpc.StatusCode.OK


async def test_tokens_per_min_is_charged_with_what_streams_consumed(s: Stack) -> None:
    t = _tenant(s.registry, tokens_per_min=40)
    # Each request consumes 3 input (words, as the synthetic worker counts) + 20 output tokens.
    first = await _generate(s.stub, t.secret, _request(max_tokens=20))
    second = await _generate(s.stub, t.secret, _request(max_tokens=20))
    assert (first.code, second.code) == (grpc.StatusCode.OK, grpc.StatusCode.OK)  # 46 of 40: in debt
    third = await _generate(s.stub, t.secret, _request(max_tokens=1))
    assert third.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"tenant {t.name!r} is over its limit of 40 tokens/min; retry in" in third.details
    # 6 tokens of debt at 40/min: about 9 s.
    assert 5000 <= int(third.trailing["grpc-retry-pushback-ms"]) <= 9001


async def test_a_limit_change_reaches_a_router_that_already_knows_the_key(s: Stack) -> None:
    t = _tenant(s.registry)
    assert (await _generate(s.stub, t.secret, _request(max_tokens=1))).code == grpc.StatusCode.OK
    with s.registry.admin() as c:
        c.set_tenant_limits(t.name, requests_per_s=1)

    def seen() -> bool:
        limits = _limits_seen(s.router, t)
        return limits is not None and limits.requests_per_s == 1

    await _until(seen, 2.0)
    codes = [(await _generate(s.stub, t.secret, _request(max_tokens=1))).code for _ in range(3)]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 2, codes


async def test_the_monthly_quota_is_shared_through_the_ledger(s: Stack, tmp_path: Path) -> None:
    t = _tenant(s.registry, monthly_tokens=40)
    first = await _generate(s.stub, t.secret, _request(max_tokens=20))
    second = await _generate(s.stub, t.secret, _request(max_tokens=20))  # 23 < 40: admitted
    assert (first.code, second.code) == (grpc.StatusCode.OK, grpc.StatusCode.OK)
    third = await _generate(s.stub, t.secret, _request(max_tokens=1))
    assert third.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"tenant {t.name!r} has used 46 of its 40 monthly tokens" in third.details
    assert int(third.trailing["grpc-retry-pushback-ms"]) > 0
    # Once this router's records are in the ledger (shipped every 0.1 s here), a second router that
    # has served nothing for this tenant refuses it from the shared ledger.
    await _until(lambda: _ledger_tokens(s, t) == 46, 10.0)
    async with _router(_settings(s.registry, tmp_path, s.workers)) as (_, stub2):
        refused = await _generate(stub2, t.secret, _request(max_tokens=1))
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "has used 46 of its 40 monthly tokens" in refused.details


async def test_two_routers_with_half_shares_admit_no_more_than_the_rate_together(
    s: Stack, tmp_path: Path
) -> None:
    t = _tenant(s.registry, requests_per_s=4)
    half = {"LORAPLEX_ROUTER_LIMIT_SHARE": "0.5"}
    async with (
        _router(_settings(s.registry, tmp_path / "a", s.workers, **half)) as (_, stub_a),
        _router(_settings(s.registry, tmp_path / "b", s.workers, **half)) as (_, stub_b),
    ):
        started = time.monotonic()
        results = await asyncio.gather(
            *(
                _generate(stub, t.secret, _request(max_tokens=1))
                for _ in range(10)
                for stub in (stub_a, stub_b)
            )
        )
        elapsed = time.monotonic() - started
    admitted = sum(r.code == grpc.StatusCode.OK for r in results)
    refused = [r for r in results if r.code != grpc.StatusCode.OK]
    assert all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    # A burst of 2 per router (4 in all) plus what 4/s refills while the burst is served.
    assert 4 <= admitted <= 4 + int(4 * elapsed) + 1, (admitted, elapsed)
