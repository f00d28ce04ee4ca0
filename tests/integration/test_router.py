"""The router over real gRPC: a real registry process (auth, adapters, change feed, usage ledger),
synthetic workers that emit deterministic tokens, and the router in this test's event loop.

Billing is checked where it lands: rows in the registry's usage ledger (PostgreSQL).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.synthetic_worker import (
    RunningSyntheticWorker,
    expected_token_ids,
    start_synthetic_worker,
)
from loraplex.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from services.common.config import RouterSettings
from services.common.health import wait_serving
from services.common.net import free_port
from services.common.tls import Role, aio_channel
from services.devtools.tiny_model import TINY_LLAMA
from services.router.registry_view import (
    CHANNEL_OPTIONS,
    UNAVAILABLE_PUSHBACK_MS,
    RegistryUnavailable,
    RegistryView,
)
from services.router.server import Router, start_router
from services.router.servicer import SPOOL_PROBE_S
from services.router.shipper import Shipper
from services.router.spool import Spool, read_segment
from services.worker.server import RunningWorker
from tests.fixtures.registry import RegistryProcess
from tests.fixtures.tls import ServiceCerts

OTHER_MODEL = "smollm2-135m-instruct"
AUTH_TTL_S = 1.0


@dataclass
class Tenant:
    tenant_id: str
    name: str
    secret: str
    key_id: str


@dataclass
class Stack:
    registry: RegistryProcess
    router: Router
    workers: list[RunningSyntheticWorker]
    stub: inference_pb2_grpc.InferenceServiceStub
    a: Tenant
    b: Tenant
    adapter_dir: Path

    def reset(self) -> None:
        for w in self.workers:
            w.worker.reset()
        for h in self.router.pool.handles():
            h.down_until = 0.0


def _router_tls(registry: RegistryProcess) -> dict[str, str]:
    """A router's identity toward workers and the registry, and TLS on its public endpoint."""
    return {**registry.certs.env(Role.ROUTER), **registry.certs.router_public_env()}


def _public(target: str, certs: ServiceCerts) -> grpc.aio.Channel:
    """A tenant's channel to the router: TLS checked against the CA, no client certificate."""
    ca = certs.files(Role.ROUTER).ca.read_bytes()
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))


def _tenant(registry: RegistryProcess) -> Tenant:
    name = f"r-{uuid.uuid4().hex[:10]}"
    with registry.admin() as c:
        t = c.create_tenant(name)
        key = c.create_api_key(name)
    return Tenant(t.tenant_id, name, key.secret, key.api_key.key_id)


@pytest.fixture(scope="module")
async def stack(
    registry: RegistryProcess, worker_tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    a, b = _tenant(registry), _tenant(registry)
    adapter_dir = worker_tiny_adapters["qv"]
    with registry.admin() as c:
        c.upload_adapter(adapter_dir, tenant=a.name, name="bot", base_model=TINY_LLAMA)
        c.upload_adapter(worker_tiny_adapters["mlp"], tenant=a.name, name="bot", base_model=TINY_LLAMA)
        c.archive_adapter("bot@2", tenant=a.name)
        # Exists, but no version is servable: every one archived.
        c.upload_adapter(adapter_dir, tenant=a.name, name="retired", base_model=TINY_LLAMA)
        c.archive_adapter("retired@1", tenant=a.name)
        c.upload_adapter(adapter_dir, tenant=b.name, name="secret-sauce", base_model=TINY_LLAMA)
    worker_tls = registry.certs.files(Role.WORKER)
    workers = [await start_synthetic_worker(f"syn-{i}", TINY_LLAMA, tls=worker_tls) for i in range(2)]
    settings = RouterSettings.from_env(
        {
            "LORAPLEX_HOME": str(tmp_path_factory.mktemp("router-home")),
            **_router_tls(registry),
            "LORAPLEX_REGISTRY": registry.target,
            "LORAPLEX_ROUTER_LISTEN": "127.0.0.1:0",
            "LORAPLEX_HTTP_LISTEN": "",  # the HTTP door has tests of its own
            "LORAPLEX_WORKERS": ",".join(w.address for w in workers),
            "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
            "LORAPLEX_AUTH_CACHE_TTL_S": str(AUTH_TTL_S),
            "LORAPLEX_ROUTER_SHIP_INTERVAL_S": "0.1",
            "LORAPLEX_MAX_INFLIGHT": "64",
        }
    )
    router = await start_router(settings)
    async with _public(f"127.0.0.1:{router.port}", registry.certs) as channel:
        s = Stack(
            registry, router, workers, inference_pb2_grpc.InferenceServiceStub(channel), a, b, adapter_dir
        )
        yield s
    await router.running.drain(1.0)
    for w in workers:
        await w.server.stop(0)


@pytest.fixture
def s(stack: Stack) -> Stack:
    stack.reset()
    return stack


def _md(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def _request(**fields: Any) -> inference_pb2.GenerateRequest:
    fields.setdefault("prompt", common_pb2.Prompt(text="hello there router"))
    max_tokens = fields.pop("max_tokens", 5)
    return inference_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(max_tokens=max_tokens), **fields)


@dataclass
class Result:
    events: list[inference_pb2.GenerateResponse]
    code: grpc.StatusCode
    details: str
    trailing: dict[str, str]

    @property
    def tokens(self) -> list[int]:
        return [t for e in self.events if e.HasField("delta") for t in e.delta.token_ids]


async def _generate(s: Stack, secret: str | None, req: inference_pb2.GenerateRequest, **kw: Any) -> Result:
    call = s.stub.Generate(req, metadata=_md(secret) if secret else (), **kw)
    events: list[inference_pb2.GenerateResponse] = []
    try:
        async for e in call:
            events.append(e)
    except grpc.aio.AioRpcError:
        pass
    trailing = {k: v for k, v in (await call.trailing_metadata() or ()) if isinstance(v, str)}
    return Result(events, await call.code(), await call.details() or "", trailing)


def _ledger(s: Stack, request_id: str, tenant: Tenant | None = None) -> list[dict[str, Any]]:
    """Ledger rows with this request id: of one tenant, or (tenant None) of every tenant."""
    with psycopg.connect(s.registry.database_url) as conn:
        cur = conn.execute(
            "SELECT tenant_id::text, api_key_id::text, base_model, adapter_id::text, adapter_version,"
            " input_tokens, output_tokens, finish_reason, worker_id FROM usage_records"
            " WHERE request_id = %s AND (%s::uuid IS NULL OR tenant_id = %s::uuid)",
            (request_id, tenant and tenant.tenant_id, tenant and tenant.tenant_id),
        )
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


async def _billed(
    s: Stack, request_id: str, timeout_s: float = 15.0, tenant: Tenant | None = None
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = _ledger(s, request_id, tenant)
        if rows:
            assert len(rows) == 1
            return rows[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"request {request_id} never reached the usage ledger")


# -- the happy path and billing ----------------------------------------------------------------


async def test_stream_is_started_deltas_finished_and_billed_once_per_request_id(s: Stack) -> None:
    rid = f"client-{uuid.uuid4().hex}"
    r = await _generate(s, s.a.secret, _request(request_id=rid, adapter="bot", max_tokens=7))
    assert r.code == grpc.StatusCode.OK, r.details
    kinds = [e.WhichOneof("event") for e in r.events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and set(kinds[1:-1]) == {"delta"}
    started = r.events[0].started
    assert (started.request_id, started.model) == (rid, TINY_LLAMA)
    assert (started.adapter.name, started.adapter.version) == ("bot", 1)
    assert r.tokens == expected_token_ids(7)
    finished = r.events[-1].finished
    assert finished.usage.output_tokens == 7 and finished.worker_id.startswith("syn-")
    # The worker got the router's request with the client's id and the resolved adapter version.
    seen = [req for w in s.workers for req in w.worker.requests]
    assert [(q.request_id, q.adapter.name, q.adapter.version, q.tenant_id) for q in seen] == [
        (rid, "bot", 1, s.a.tenant_id)
    ]
    assert seen[0].adapter.digest == started.adapter.digest and seen[0].adapter.uri

    row = await _billed(s, rid)
    assert row == {
        "tenant_id": s.a.tenant_id,
        "api_key_id": s.a.key_id,
        "base_model": TINY_LLAMA,
        "adapter_id": started.adapter.adapter_id,
        "adapter_version": 1,
        "input_tokens": 3,
        "output_tokens": 7,
        "finish_reason": "length",
        "worker_id": finished.worker_id,
    }
    # The replay attack: the same id again streamed a fresh generation that was never billed.
    again = await _generate(s, s.a.secret, _request(request_id=rid, adapter="bot", max_tokens=7))
    assert again.code == grpc.StatusCode.ALREADY_EXISTS, again.details
    assert f"request_id {rid!r} was already used" in again.details and "new request_id" in again.details
    assert again.events == []
    assert len([req for w in s.workers for req in w.worker.requests]) == 1  # no second generation
    await asyncio.sleep(0.5)
    await s.router.shipper.ship_once()
    assert len(_ledger(s, rid)) == 1


async def test_an_id_billed_through_another_router_is_refused_from_the_ledger(s: Stack) -> None:
    """This router never saw the id: the registry's ledger (within the window) is what refuses it."""
    rid = f"elsewhere-{uuid.uuid4().hex}"
    record = _records(s.a, 1)[0]
    record.request_id = rid
    async with s.registry.certs.aio_channel(s.registry.target, Role.ROUTER) as channel:
        await usage_pb2_grpc.UsageServiceStub(channel).RecordUsage(
            usage_pb2.RecordUsageRequest(records=[record])
        )
    r = await _generate(s, s.a.secret, _request(request_id=rid, adapter="bot"))
    assert r.code == grpc.StatusCode.ALREADY_EXISTS, r.details
    assert not any(w.worker.requests for w in s.workers)
    # Tenant B may use the same id: the lookup is by (tenant, id), and B learns nothing about A.
    b = await _generate(s, s.b.secret, _request(request_id=rid, adapter="secret-sauce", max_tokens=3))
    assert b.code == grpc.StatusCode.OK, b.details
    assert (await _billed(s, rid, tenant=s.b))["output_tokens"] == 3
    assert [row["output_tokens"] for row in _ledger(s, rid, s.a)] == [record.usage.output_tokens]


async def test_a_duplicate_sent_while_the_first_is_in_flight_is_refused(s: Stack) -> None:
    for w in s.workers:
        w.worker.token_delay_s = 0.02
    rid = f"concurrent-{uuid.uuid4().hex}"
    first = s.stub.Generate(_request(request_id=rid, adapter="bot", max_tokens=30), metadata=_md(s.a.secret))
    assert (await first.read()).WhichOneof("event") == "started"
    second = await _generate(s, s.a.secret, _request(request_id=rid, adapter="bot", max_tokens=30))
    assert second.code == grpc.StatusCode.ALREADY_EXISTS, second.details
    assert "in flight" in second.details
    # Another tenant's request with the same id runs beside it.
    other = await _generate(s, s.b.secret, _request(request_id=rid, adapter="secret-sauce", max_tokens=2))
    assert other.code == grpc.StatusCode.OK, other.details
    last = None
    while (msg := await first.read()) != grpc.aio.EOF:
        last = msg
    assert last is not None and last.finished.usage.output_tokens == 30
    assert (await _billed(s, rid, tenant=s.a))["output_tokens"] == 30
    assert (await _billed(s, rid, tenant=s.b))["output_tokens"] == 2
    assert len(_ledger(s, rid)) == 2


async def test_an_id_refused_before_any_work_may_be_retried(s: Stack) -> None:
    rid = f"retry-{uuid.uuid4().hex}"
    for w in s.workers:
        w.worker.refuse = grpc.StatusCode.UNAVAILABLE
    refused = await _generate(s, s.a.secret, _request(request_id=rid, adapter="bot"))
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    s.reset()
    retried = await _generate(s, s.a.secret, _request(request_id=rid, adapter="bot", max_tokens=4))
    assert retried.code == grpc.StatusCode.OK, retried.details
    assert (await _billed(s, rid))["output_tokens"] == 4


async def test_a_client_id_is_refused_while_the_ledger_cannot_be_asked(s: Stack) -> None:
    view = s.router.registry
    live = view._usage
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as dead:
        view._usage = usage_pb2_grpc.UsageServiceStub(dead)  # the ledger lookup fails
        try:
            rid = f"unchecked-{uuid.uuid4().hex}"
            r = await _generate(s, s.a.secret, _request(request_id=rid, adapter="bot"))
            assert r.code == grpc.StatusCode.UNAVAILABLE
            assert "cannot check whether request_id" in r.details and "send no request_id" in r.details
            # The client retries when the router next tries the registry, not on a blind backoff.
            assert int(r.trailing["grpc-retry-pushback-ms"]) == UNAVAILABLE_PUSHBACK_MS
            assert not any(w.worker.requests for w in s.workers)
            # An id the router chooses cannot repeat: it needs no lookup and still runs.
            fresh = await _generate(s, s.a.secret, _request(adapter="bot"))
            assert fresh.code == grpc.StatusCode.OK, fresh.details
        finally:
            view._usage = live
    # The refused id was never run, so it is free once the registry answers again.
    assert (
        await _generate(s, s.a.secret, _request(request_id=rid, adapter="bot"))
    ).code == grpc.StatusCode.OK


async def test_output_tokens_are_billed_as_forwarded_whatever_the_worker_reports(s: Stack) -> None:
    for w in s.workers:
        w.worker.reported_output_tokens = 1  # a lying (or buggy) worker
    rid = f"lying-{uuid.uuid4().hex}"
    r = await _generate(s, s.a.secret, _request(request_id=rid, adapter="bot", max_tokens=9))
    assert r.code == grpc.StatusCode.OK, r.details
    assert len(r.tokens) == 9
    assert r.events[-1].finished.usage.output_tokens == 9  # the client sees what it is billed for
    assert (await _billed(s, rid))["output_tokens"] == 9


async def test_a_failed_spool_write_ends_the_stream_with_an_error_not_a_finished(
    s: Stack, tmp_path: Path
) -> None:
    failing = True

    def fsync(fd: int) -> None:
        if failing:
            raise OSError(errno.EIO, "simulated disk failure")
        os.fsync(fd)

    settings = RouterSettings.from_env(
        {
            "LORAPLEX_HOME": str(tmp_path),
            **_router_tls(s.registry),
            "LORAPLEX_REGISTRY": s.registry.target,
            "LORAPLEX_ROUTER_LISTEN": "127.0.0.1:0",
            "LORAPLEX_HTTP_LISTEN": "",  # the HTTP door has tests of its own
            "LORAPLEX_WORKERS": ",".join(w.address for w in s.workers),
            "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
        }
    )
    router = await start_router(settings, fsync=fsync)
    rid = f"unspooled-{uuid.uuid4().hex}"
    try:
        async with _public(f"127.0.0.1:{router.port}", s.registry.certs) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            call = stub.Generate(
                _request(request_id=rid, adapter="bot", max_tokens=5), metadata=_md(s.a.secret)
            )
            events = []
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for e in call:
                    events.append(e)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "could not record usage" in (err.value.details() or "")
            assert not any(e.HasField("finished") for e in events)
            # Once the disk works again (the router refuses everything until then), the id is
            # still spent: tokens did run under it, so it is not generated again.
            failing = False
            await asyncio.sleep(SPOOL_PROBE_S * 1.5)
            again = stub.Generate(_request(request_id=rid, adapter="bot"), metadata=_md(s.a.secret))
            with pytest.raises(grpc.aio.AioRpcError) as replay:
                _ = [e async for e in again]
            assert replay.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        failing = False
        await router.running.drain(1.0)


async def test_a_worker_silent_mid_stream_past_the_token_timeout_fails_the_stream_and_bills_the_tokens(
    s: Stack, tmp_path: Path
) -> None:
    settings = RouterSettings.from_env(
        {
            "LORAPLEX_HOME": str(tmp_path),
            **_router_tls(s.registry),
            "LORAPLEX_REGISTRY": s.registry.target,
            "LORAPLEX_ROUTER_LISTEN": "127.0.0.1:0",
            "LORAPLEX_WORKERS": ",".join(w.address for w in s.workers),
            "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
            "LORAPLEX_ROUTER_SHIP_INTERVAL_S": "0.1",
            "LORAPLEX_ROUTER_TOKEN_TIMEOUT_S": "1",
        }
    )
    router = await start_router(settings)
    for w in s.workers:
        w.worker.hang_after = 3  # three tokens, then nothing (a hung or SIGSTOPped worker)
    rid = f"silent-{uuid.uuid4().hex}"
    try:
        async with _public(f"127.0.0.1:{router.port}", s.registry.certs) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            call = stub.Generate(
                _request(request_id=rid, adapter="bot", max_tokens=10), metadata=_md(s.a.secret), timeout=60
            )
            tokens: list[int] = []
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for e in call:
                    tokens.extend(e.delta.token_ids)
            waited = time.monotonic() - began
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "sent nothing for 1s after 3 tokens" in (err.value.details() or "")
            assert "billed" in (err.value.details() or "")
            assert tokens == expected_token_ids(3)
            assert waited < 10, "the client waited for its deadline instead of the token timeout"
        row = await _billed(s, rid)
        assert row["output_tokens"] == 3
        assert row["finish_reason"] == "error"
        assert sum(w.worker.cancelled for w in s.workers) == 1  # the hung call was cancelled
    finally:
        s.reset()
        await router.running.drain(1.0)


async def test_long_fast_stream_arrives_whole_and_in_order(s: Stack) -> None:
    call = s.stub.Generate(_request(adapter="bot", max_tokens=500), metadata=_md(s.a.secret))
    ids: list[int] = []
    text = []
    async for e in call:
        if e.HasField("delta"):
            ids.extend(e.delta.token_ids)
            text.append(e.delta.text)
        else:
            last = e
    assert ids == expected_token_ids(500)
    assert "".join(text) == "".join(f"t{i} " for i in range(500))
    assert last.finished.usage.output_tokens == 500


async def test_request_without_id_gets_a_fresh_uuid_and_the_bare_model_needs_no_adapter(s: Stack) -> None:
    r = await _generate(s, s.a.secret, _request(model=TINY_LLAMA, max_tokens=2))
    assert r.code == grpc.StatusCode.OK, r.details
    rid = r.events[0].started.request_id
    assert str(uuid.UUID(rid)) == rid
    assert not r.events[0].started.HasField("adapter")
    row = await _billed(s, rid)
    assert (row["adapter_id"], row["adapter_version"], row["output_tokens"]) == (None, None, 2)


async def test_list_models_shows_only_the_callers_ready_adapters(s: Stack) -> None:
    resp = await s.stub.ListModels(inference_pb2.ListModelsRequest(), metadata=_md(s.a.secret))
    models = {m.name: m for m in resp.models}
    assert {TINY_LLAMA, OTHER_MODEL} <= set(models)
    assert [(a.name, a.version) for a in models[TINY_LLAMA].adapters] == [("bot", 1)]
    assert models[TINY_LLAMA].input_price_per_mtok == pytest.approx(0.1)
    other = await s.stub.ListModels(inference_pb2.ListModelsRequest(), metadata=_md(s.b.secret))
    assert [a.name for m in other.models for a in m.adapters] == ["secret-sauce"]


# -- admission errors --------------------------------------------------------------------------


async def test_missing_or_unknown_api_key_is_unauthenticated(s: Stack) -> None:
    for secret in (None, "lpx_not-a-real-key"):
        r = await _generate(s, secret, _request(adapter="bot"))
        assert r.code == grpc.StatusCode.UNAUTHENTICATED, r.details
        assert not r.events
    assert not any(w.worker.requests for w in s.workers)


async def test_another_tenants_adapter_is_reported_exactly_like_a_missing_one(s: Stack) -> None:
    theirs = await _generate(s, s.a.secret, _request(adapter="secret-sauce"))
    missing = await _generate(s, s.a.secret, _request(adapter="no-such-adapter"))
    assert theirs.code == missing.code == grpc.StatusCode.NOT_FOUND
    assert theirs.details.replace("secret-sauce", "X") == missing.details.replace("no-such-adapter", "X")
    by_id = await _generate(s, s.b.secret, _request(adapter="secret-sauce"))
    assert by_id.code == grpc.StatusCode.OK, by_id.details
    foreign_id = by_id.events[0].started.adapter.adapter_id
    r = await _generate(s, s.a.secret, _request(adapter=foreign_id))
    assert r.code == grpc.StatusCode.NOT_FOUND
    # A's name with no READY version is FAILED_PRECONDITION for A, and still NOT_FOUND for B.
    retired = await _generate(s, s.b.secret, _request(adapter="retired"))
    assert retired.code == grpc.StatusCode.NOT_FOUND and "ARCHIVED" not in retired.details


@pytest.mark.parametrize(
    ("fields", "code", "phrase"),
    [
        ({"adapter": "bot@2"}, grpc.StatusCode.FAILED_PRECONDITION, "archived"),
        (
            {"adapter": "retired"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "no READY version to serve; its versions: @1 ARCHIVED",
        ),
        ({"adapter": "bot", "model": OTHER_MODEL}, grpc.StatusCode.FAILED_PRECONDITION, "base model"),
        ({"adapter": "bot@zero"}, grpc.StatusCode.INVALID_ARGUMENT, "version"),
        ({"adapter": "bot", "request_id": "x" * 129}, grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        ({"adapter": "bot", "request_id": "tab\there"}, grpc.StatusCode.INVALID_ARGUMENT, "printable"),
        ({"adapter": "bot", "prompt": common_pb2.Prompt()}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "model is required"),
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
        ({"adapter": "bot", "max_tokens": 100_000}, grpc.StatusCode.INVALID_ARGUMENT, "context length"),
    ],
)
async def test_bad_requests_are_refused_before_any_worker_sees_them(
    s: Stack, fields: dict[str, Any], code: grpc.StatusCode, phrase: str
) -> None:
    r = await _generate(s, s.a.secret, _request(**fields))
    assert r.code == code, r.details
    assert phrase in r.details
    assert not any(w.worker.requests for w in s.workers)


async def test_revoked_key_stops_working_within_the_auth_cache_ttl(s: Stack) -> None:
    t = _tenant(s.registry)
    with s.registry.admin() as c:
        c.upload_adapter(s.adapter_dir, tenant=t.name, name="bot", base_model=TINY_LLAMA)
    assert (await _generate(s, t.secret, _request(adapter="bot"))).code == grpc.StatusCode.OK
    with s.registry.admin() as c:
        c.revoke_api_key(t.key_id)
    await asyncio.sleep(AUTH_TTL_S + 0.2)
    r = await _generate(s, t.secret, _request(adapter="bot"))
    assert r.code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_new_version_is_served_once_the_change_feed_reports_it(s: Stack) -> None:
    t = _tenant(s.registry)
    with s.registry.admin() as c:
        c.upload_adapter(s.adapter_dir, tenant=t.name, name="evolving", base_model=TINY_LLAMA)
    first = await _generate(s, t.secret, _request(adapter="evolving"))
    assert first.events[0].started.adapter.version == 1
    with s.registry.admin() as c:
        c.upload_adapter(s.adapter_dir, tenant=t.name, name="evolving", base_model=TINY_LLAMA)
    deadline = time.monotonic() + 10
    version = 1
    while version == 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        version = (
            (await _generate(s, t.secret, _request(adapter="evolving"))).events[0].started.adapter.version
        )
    assert version == 2


async def test_registry_outage_keeps_confirmed_keys_and_resolved_adapters_working(s: Stack) -> None:
    async with s.registry.certs.aio_channel(s.registry.target, Role.ROUTER) as live:
        view = RegistryView(live, auth_ttl_s=0.0, adapter_ttl_s=0.0, stale_s=60.0)
        principal = await view.authenticate(s.a.secret)
        adapter = await view.resolve_adapter(s.a.tenant_id, "bot")
        async with s.registry.certs.aio_channel(f"127.0.0.1:{free_port()}", Role.ROUTER) as dead:
            view._stub = registry_pb2_grpc.AdapterRegistryServiceStub(dead)  # the registry goes away
            assert await view.authenticate(s.a.secret) == principal
            assert (await view.resolve_adapter(s.a.tenant_id, "bot")).ref.digest == adapter.ref.digest
            with pytest.raises(RegistryUnavailable):
                await view.authenticate(s.b.secret)  # never confirmed: no stale entry to fall back on
            with pytest.raises(RegistryUnavailable):
                await view.resolve_adapter(s.a.tenant_id, "bot@1")
            view._stale = 0.0
            with pytest.raises(RegistryUnavailable):
                await view.authenticate(s.a.secret)


# -- routing and the streaming proxy -----------------------------------------------------------


async def test_an_adapter_keeps_going_to_the_same_worker(s: Stack) -> None:
    for _ in range(4):
        assert (await _generate(s, s.a.secret, _request(adapter="bot"))).code == grpc.StatusCode.OK
    counts = sorted(len(w.worker.requests) for w in s.workers)
    assert counts == [0, 4]


async def test_the_worker_gets_the_adapters_keep_warm_flag(s: Stack) -> None:
    t = _tenant(s.registry)
    with s.registry.admin() as c:
        c.upload_adapter(s.adapter_dir, tenant=t.name, name="warm", base_model=TINY_LLAMA, keep_warm=True)
    assert (await _generate(s, t.secret, _request(adapter="warm"))).code == grpc.StatusCode.OK
    seen = [req for w in s.workers for req in w.worker.requests]
    assert [(q.adapter.name, q.adapter.keep_warm) for q in seen] == [("warm", True)]


@pytest.mark.parametrize(("policy", "split"), [("round_robin", [2, 2]), ("affinity", [0, 4])])
async def test_the_policy_setting_picks_the_routing_policy(
    s: Stack, tmp_path: Path, policy: str, split: list[int]
) -> None:
    settings = RouterSettings.from_env(
        {
            "LORAPLEX_HOME": str(tmp_path),
            **_router_tls(s.registry),
            "LORAPLEX_REGISTRY": s.registry.target,
            "LORAPLEX_ROUTER_LISTEN": "127.0.0.1:0",
            "LORAPLEX_HTTP_LISTEN": "",  # the HTTP door has tests of its own
            "LORAPLEX_WORKERS": ",".join(w.address for w in s.workers),
            "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
            "LORAPLEX_ROUTER_POLICY": policy,
        }
    )
    router = await start_router(settings)
    try:
        async with _public(f"127.0.0.1:{router.port}", s.registry.certs) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for _ in range(4):
                [e async for e in stub.Generate(_request(adapter="bot"), metadata=_md(s.a.secret))]
    finally:
        await router.running.drain(1.0)
    assert sorted(len(w.worker.requests) for w in s.workers) == split


@pytest.mark.parametrize("refusal", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
async def test_worker_refusing_before_the_first_token_fails_over_to_the_next(
    s: Stack, refusal: grpc.StatusCode
) -> None:
    await _generate(s, s.a.secret, _request(adapter="bot"))
    home = next(w for w in s.workers if w.worker.requests)
    other = next(w for w in s.workers if w is not home)
    s.reset()
    home.worker.refuse = refusal
    r = await _generate(s, s.a.secret, _request(adapter="bot", max_tokens=4))
    assert r.code == grpc.StatusCode.OK, r.details
    assert r.tokens == expected_token_ids(4)
    assert r.events[-1].finished.worker_id == other.worker.worker_id
    assert len(home.worker.requests) == 1 and len(other.worker.requests) == 1
    assert [e.WhichOneof("event") for e in r.events].count("started") == 1


async def test_failure_after_tokens_ends_with_unavailable_and_bills_the_partial_output(s: Stack) -> None:
    for w in s.workers:
        w.worker.fail_after = 3
    rid = f"partial-{uuid.uuid4().hex}"
    r = await _generate(s, s.a.secret, _request(request_id=rid, adapter="bot", max_tokens=10))
    assert r.code == grpc.StatusCode.UNAVAILABLE
    assert r.tokens == expected_token_ids(3)
    assert sum(len(w.worker.requests) for w in s.workers) == 1  # no failover after a token
    row = await _billed(s, rid)
    assert (row["output_tokens"], row["finish_reason"]) == (3, "error")
    assert row["input_tokens"] > 0  # from the worker's Started: the prompt was processed


async def test_client_cancellation_cancels_the_worker_call_and_bills_what_was_streamed(s: Stack) -> None:
    for w in s.workers:
        w.worker.token_delay_s = 0.02
    rid = f"cancel-{uuid.uuid4().hex}"
    call = s.stub.Generate(_request(request_id=rid, adapter="bot", max_tokens=500), metadata=_md(s.a.secret))
    received = 0
    async for e in call:
        received += len(e.delta.token_ids)
        if received >= 3:
            break
    call.cancel()
    deadline = time.monotonic() + 5
    while sum(w.worker.cancelled for w in s.workers) == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert sum(w.worker.cancelled for w in s.workers) == 1
    assert sum(w.worker.completed for w in s.workers) == 0
    row = await _billed(s, rid)
    assert row["finish_reason"] == "cancelled"
    assert 3 <= row["output_tokens"] < 100
    assert s.router.servicer.inflight == 0


async def test_deadline_reaches_the_worker_as_remaining_time_and_ends_the_stream(s: Stack) -> None:
    for w in s.workers:
        w.worker.token_delay_s = 0.05
    rid = f"deadline-{uuid.uuid4().hex}"
    r = await _generate(s, s.a.secret, _request(request_id=rid, adapter="bot", max_tokens=500), timeout=0.5)
    assert r.code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadlines = [d for w in s.workers for d in w.worker.deadlines]
    # The remaining time, not the client's whole timeout again (the wire format rounds up a little).
    assert len(deadlines) == 1 and deadlines[0] is not None and 0 < deadlines[0] <= 0.51
    row = await _billed(s, rid)
    assert row["finish_reason"] in ("deadline_exceeded", "cancelled") and row["output_tokens"] > 0


async def test_all_workers_at_capacity_is_resource_exhausted_with_retry_pushback(s: Stack) -> None:
    for w in s.workers:
        w.worker.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
    r = await _generate(s, s.a.secret, _request(adapter="bot"))
    assert r.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(r.trailing["grpc-retry-pushback-ms"]) > 0
    assert sum(len(w.worker.requests) for w in s.workers) == 2


async def test_router_inflight_limit_sheds_load_with_retry_pushback(s: Stack) -> None:
    servicer = s.router.servicer
    limit = servicer._max_inflight
    servicer._max_inflight = 1
    try:
        for w in s.workers:
            w.worker.token_delay_s = 0.05
        slow = s.stub.Generate(_request(adapter="bot", max_tokens=200), metadata=_md(s.a.secret))
        await slow.read()  # started: the slow stream holds the only slot
        r = await _generate(s, s.a.secret, _request(adapter="bot"))
        assert r.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "in flight" in r.details and "grpc-retry-pushback-ms" in r.trailing
        slow.cancel()
    finally:
        servicer._max_inflight = limit


async def test_workers_registered_in_the_registry_are_discovered_and_served(s: Stack, tmp_path: Path) -> None:
    worker_tls = s.registry.certs.files(Role.WORKER)
    extra = await start_synthetic_worker(f"discovered-{uuid.uuid4().hex[:6]}", TINY_LLAMA, tls=worker_tls)
    with s.registry.as_role(Role.WORKER) as c:  # a worker registers itself, with its own certificate
        c.stub.RegisterWorker(
            registry_pb2.RegisterWorkerRequest(
                worker=registry_pb2.Worker(
                    worker_id=extra.worker.worker_id, address=extra.address, base_model=TINY_LLAMA
                )
            ),
            metadata=c.metadata,
        )
    settings = RouterSettings.from_env(
        {
            "LORAPLEX_HOME": str(tmp_path),
            **_router_tls(s.registry),
            "LORAPLEX_REGISTRY": s.registry.target,
            "LORAPLEX_ROUTER_LISTEN": "127.0.0.1:0",
            "LORAPLEX_HTTP_LISTEN": "",  # the HTTP door has tests of its own
        }
    )
    router = await start_router(settings)
    try:
        async with _public(f"127.0.0.1:{router.port}", s.registry.certs) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            events = [e async for e in stub.Generate(_request(adapter="bot"), metadata=_md(s.a.secret))]
        assert events[-1].finished.worker_id == extra.worker.worker_id
    finally:
        await router.running.drain(1.0)
        await extra.server.stop(0)


async def test_a_real_worker_serves_a_registered_adapter_through_the_router(
    s: Stack, tiny_worker: RunningWorker, tmp_path: Path
) -> None:
    settings = RouterSettings.from_env(
        {
            "LORAPLEX_HOME": str(tmp_path),
            **_router_tls(s.registry),
            "LORAPLEX_REGISTRY": s.registry.target,
            "LORAPLEX_ROUTER_LISTEN": "127.0.0.1:0",
            "LORAPLEX_HTTP_LISTEN": "",  # the HTTP door has tests of its own
            "LORAPLEX_WORKERS": f"127.0.0.1:{tiny_worker.port}",
            "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
            "LORAPLEX_ROUTER_SHIP_INTERVAL_S": "0.1",
        }
    )
    router = await start_router(settings)
    rid = f"real-{uuid.uuid4().hex}"
    try:
        async with _public(f"127.0.0.1:{router.port}", s.registry.certs) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            req = _request(request_id=rid, adapter="bot", max_tokens=6)
            req.sampling.ignore_eos = True
            events = [e async for e in stub.Generate(req, metadata=_md(s.a.secret))]
            # The replay attack end to end: the same id again generates nothing and bills nothing.
            replay = stub.Generate(req, metadata=_md(s.a.secret))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                _ = [e async for e in replay]
            assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "already used" in (refused.value.details() or "")
            # Tenant B may use the same id on the same worker; its usage is its own.
            other = stub.Generate(
                _request(request_id=rid, model=TINY_LLAMA, max_tokens=2), metadata=_md(s.b.secret)
            )
            other_events = [e async for e in other]
    finally:
        await router.running.drain(1.0)
    assert other_events[-1].finished.usage.output_tokens == 2
    assert (await _billed(s, rid, tenant=s.b))["output_tokens"] == 2
    assert events[0].started.adapter.name == "bot"
    finished = events[-1].finished
    tokens = [t for e in events if e.HasField("delta") for t in e.delta.token_ids]
    assert len(tokens) == finished.usage.output_tokens == 6
    row = await _billed(s, rid, tenant=s.a)
    assert (row["input_tokens"], row["output_tokens"]) == (finished.usage.input_tokens, 6)
    assert row["input_tokens"] > 0 and row["worker_id"] == finished.worker_id


async def test_no_worker_for_the_base_model_waits_until_the_callers_deadline(s: Stack) -> None:
    # The router holds the request for a worker to come up (tests/integration/test_router_activator.py),
    # but never past the caller's deadline.
    started = time.monotonic()
    r = await _generate(s, s.a.secret, _request(model=OTHER_MODEL), timeout=0.8)
    assert r.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.7 < time.monotonic() - started < 5.0
    assert s.router.cold is not None and s.router.cold.pending(OTHER_MODEL) == 0


# -- the spool and the shipper against the real ledger -------------------------------------------


async def test_full_spool_refuses_new_requests_rather_than_lose_billing(s: Stack) -> None:
    spool = s.router.spool
    cap = spool.max_bytes
    spool.max_bytes = 0
    try:
        r = await _generate(s, s.a.secret, _request(adapter="bot"))
        assert r.code == grpc.StatusCode.UNAVAILABLE
        assert "usage" in r.details
        assert int(r.trailing["grpc-retry-pushback-ms"]) == UNAVAILABLE_PUSHBACK_MS
        assert not any(w.worker.requests for w in s.workers)
    finally:
        spool.max_bytes = cap
    assert (await _generate(s, s.a.secret, _request(adapter="bot"))).code == grpc.StatusCode.OK


async def test_a_failing_spool_disk_refuses_new_streams_until_it_can_write_again(
    s: Stack, tmp_path: Path
) -> None:
    disk_full = False

    def fsync(fd: int) -> None:
        if disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)

    settings = RouterSettings.from_env(
        {
            "LORAPLEX_HOME": str(tmp_path),
            **_router_tls(s.registry),
            "LORAPLEX_REGISTRY": s.registry.target,
            "LORAPLEX_ROUTER_LISTEN": "127.0.0.1:0",
            "LORAPLEX_WORKERS": ",".join(w.address for w in s.workers),
            "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
            "LORAPLEX_ROUTER_SHIP_INTERVAL_S": "0.1",
        }
    )
    router = await start_router(settings, fsync=fsync)
    try:
        async with _public(f"127.0.0.1:{router.port}", s.registry.certs) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            async def generate(request_id: str) -> tuple[grpc.StatusCode, str, list[Any]]:
                call = stub.Generate(_request(request_id=request_id, adapter="bot"), metadata=_md(s.a.secret))
                events: list[Any] = []
                try:
                    async for e in call:
                        events.append(e)
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or "", events
                return grpc.StatusCode.OK, "", events

            disk_full = True
            # The stream whose record hits the full disk ends with an error, never an unbilled Finished.
            code, details, events = await generate(f"full-{uuid.uuid4().hex}")
            assert code == grpc.StatusCode.UNAVAILABLE and "could not record usage" in details
            assert not any(e.HasField("finished") for e in events)
            # From then on nothing new starts: refused before reaching a worker, with a sentence.
            before = sum(len(w.worker.requests) for w in s.workers)
            for _ in range(3):
                code, details, _ = await generate(f"refused-{uuid.uuid4().hex}")
                assert code == grpc.StatusCode.UNAVAILABLE
                assert "cannot write usage records to its disk" in details
                await asyncio.sleep(0.3)
            assert sum(len(w.worker.requests) for w in s.workers) == before
            assert router.spool.failing

            disk_full = False  # space again: the next probe finds it and requests run and bill
            rid = f"healed-{uuid.uuid4().hex}"
            deadline = time.monotonic() + 5
            while (code := (await generate(rid))[0]) != grpc.StatusCode.OK and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert code == grpc.StatusCode.OK
            assert (await _billed(s, rid))["output_tokens"] == 5
    finally:
        disk_full = False
        await router.running.drain(1.0)


async def _router_process(
    s: Stack, spool_dir: Path, ship_interval_s: float, checkpoint_s: float = 1.0
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        "LORAPLEX_ROUTER_CHECKPOINT_S": str(checkpoint_s),
        **s.registry.env,
        "LORAPLEX_ROUTER_LISTEN": f"127.0.0.1:{port}",
        "LORAPLEX_HTTP_LISTEN": "",  # the HTTP door has tests of its own
        "LORAPLEX_SPOOL_DIR": str(spool_dir),
        "LORAPLEX_WORKERS": ",".join(w.address for w in s.workers),
        "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
        "LORAPLEX_ROUTER_SHIP_INTERVAL_S": str(ship_interval_s),
        "LORAPLEX_WORKER_REFRESH_S": "0.2",
        **_router_tls(s.registry),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "router", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(spool_dir.parent / f"router-{port}.log").open("wb"),
    )
    target = f"127.0.0.1:{port}"
    # Wait without blocking the event loop: the synthetic workers live on it and must answer probes.
    async with _public(target, s.registry.certs) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, "router exited during startup"
            try:
                resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, target
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    proc.kill()
    raise TimeoutError("router process did not start")


async def test_records_spooled_by_a_killed_router_are_billed_once_after_restart(
    s: Stack, tmp_path: Path
) -> None:
    proc, target = await _router_process(s, tmp_path, ship_interval_s=3600)
    ids = [f"killed-{uuid.uuid4().hex}-{i}" for i in range(3)]
    try:
        async with _public(target, s.registry.certs) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for rid in ids:
                events: list[inference_pb2.GenerateResponse] = []
                for _ in range(50):  # until the new router has probed the workers
                    call = stub.Generate(_request(request_id=rid, adapter="bot"), metadata=_md(s.a.secret))
                    try:
                        events = [e async for e in call]
                        break
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                        await asyncio.sleep(0.1)
                assert events[-1].finished.usage.output_tokens == 5
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert all(not _ledger(s, rid) for rid in ids)  # spooled, not shipped, when it died
    # Restarted: the ids are refused (from its spool's backlog, or the ledger once shipped).
    proc, target = await _router_process(s, tmp_path, ship_interval_s=3600)
    try:
        async with _public(target, s.registry.certs) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            replay = stub.Generate(_request(request_id=ids[0], adapter="bot"), metadata=_md(s.a.secret))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                _ = [e async for e in replay]
            assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        proc.terminate()  # a clean stop ships the spool
        proc.wait()
    rows = [await _billed(s, rid) for rid in ids]
    assert [r["output_tokens"] for r in rows] == [5, 5, 5]


async def test_a_router_killed_mid_stream_bills_the_streamed_tokens_once_after_restart(
    s: Stack, tmp_path: Path
) -> None:
    for w in s.workers:
        w.worker.token_delay_s = 0.02
    proc, target = await _router_process(s, tmp_path, ship_interval_s=3600, checkpoint_s=0.1)
    rid = f"midstream-{uuid.uuid4().hex}"
    received = 0
    try:
        async with _public(target, s.registry.certs) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for _ in range(50):  # until the new router has probed the workers
                call = stub.Generate(
                    _request(request_id=rid, adapter="bot", max_tokens=400), metadata=_md(s.a.secret)
                )
                try:
                    async for e in call:
                        received += len(e.delta.token_ids)
                        if received >= 40:
                            proc.send_signal(signal.SIGKILL)  # mid-stream, no chance to bill
                            break
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    await asyncio.sleep(0.1)
            call.cancel()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert received >= 40
    assert not _ledger(s, rid)
    proc, _ = await _router_process(s, tmp_path, ship_interval_s=0.1)
    try:
        row = await _billed(s, rid)
    finally:
        proc.terminate()
        proc.wait()
    # Billed once, for what was streamed up to the last checkpoint (0.1 s ~ 5 tokens here).
    assert row["finish_reason"] == "error"
    assert received - 15 <= row["output_tokens"] <= received
    assert row["input_tokens"] > 0


async def test_a_checkpoint_never_counts_the_message_being_sent(s: Stack, tmp_path: Path) -> None:
    """A router killed between writing a checkpoint and the client reading the message it covers
    would bill tokens never delivered (the chaos soak caught one: billed 1 token, received 0, the
    retry refused as a replay). So at every message the client reads, the router's checkpoint on
    disk counts at most the tokens of the messages before it."""
    for w in s.workers:
        w.worker.token_delay_s = 0.3
    proc, target = await _router_process(s, tmp_path, ship_interval_s=3600, checkpoint_s=0.01)
    inflight = tmp_path / "inflight"
    rid = f"checkpoint-{uuid.uuid4().hex}"
    seen: list[tuple[int, int]] = []  # (tokens received, largest count checkpointed)
    try:
        async with _public(target, s.registry.certs) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for _ in range(50):  # until the new router has probed the workers
                call = stub.Generate(
                    _request(request_id=rid, adapter="bot", max_tokens=5), metadata=_md(s.a.secret)
                )
                received = 0
                try:
                    async for e in call:
                        if not e.delta.token_ids:
                            continue
                        received += len(e.delta.token_ids)
                        await asyncio.sleep(0.1)  # the router's checkpoint write, if any, lands
                        counts = [
                            usage_pb2.UsageRecord.FromString(p.read_bytes()).usage.output_tokens
                            for p in inflight.glob("*.inflight")
                        ]
                        seen.append((received, max(counts, default=0)))
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    await asyncio.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait()
    assert [r for r, _ in seen] == [1, 2, 3, 4, 5]
    assert all(checkpointed <= received - 1 for received, checkpointed in seen), seen
    assert any(checkpointed > 0 for _, checkpointed in seen), seen  # checkpoints were written


def _records(tenant: Tenant, n: int) -> list[usage_pb2.UsageRecord]:
    now = time.time()
    out = []
    for i in range(n):
        r = usage_pb2.UsageRecord(
            request_id=f"spooled-{uuid.uuid4().hex}-{i}",
            tenant_id=tenant.tenant_id,
            api_key_id=tenant.key_id,
            base_model=TINY_LLAMA,
            usage=common_pb2.Usage(input_tokens=2, output_tokens=i),
            finish_reason=common_pb2.FINISH_REASON_EOS,
            worker_id="w",
        )
        r.started_at.FromNanoseconds(int(now * 1e9))
        r.finished_at.FromNanoseconds(int(now * 1e9))
        out.append(r)
    return out


async def test_shipper_keeps_records_while_the_registry_is_down_and_replays_them_after_restart(
    s: Stack, tmp_path: Path
) -> None:
    records = _records(s.a, 7)
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.append_many([r.SerializeToString() for r in records])
    async with s.registry.certs.aio_channel(f"127.0.0.1:{free_port()}", Role.ROUTER) as dead:
        with pytest.raises(grpc.aio.AioRpcError):
            await Shipper(spool, dead, batch=3).ship_once(timeout_s=1.0)
    assert [len(read_segment(seg).records) for seg in spool.seal()] == [7]
    spool.close()

    restarted = Spool(tmp_path, max_bytes=1 << 30)  # a new process finds the segment on disk
    async with s.registry.certs.aio_channel(s.registry.target, Role.ROUTER) as channel:
        shipped = await Shipper(restarted, channel, batch=3).ship_once()
    assert shipped == 7
    assert restarted.seal() == [] and restarted.size_bytes == 0
    assert all(len(_ledger(s, r.request_id)) == 1 for r in records)


async def test_the_shipper_ships_as_soon_as_the_registry_is_reachable_again_not_after_its_backoff(
    s: Stack, tmp_path: Path
) -> None:
    records = _records(s.a, 3)
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.append_many([r.SerializeToString() for r in records])
    registry_host, registry_port = s.registry.target.rsplit(":", 1)

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(registry_host, int(registry_port))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    # The registry's address answers nothing at first (the registry is down), then it is back.
    port = free_port()
    channel = aio_channel(f"127.0.0.1:{port}", s.registry.certs.files(Role.ROUTER), CHANNEL_OPTIONS)
    # After the first failed round the next is 60 s away: only the reconnect can ship in time.
    shipper = Shipper(spool, channel, interval_s=30.0, max_backoff_s=60.0)
    task = asyncio.create_task(shipper.run())
    proxy = None
    try:
        await asyncio.sleep(2.5)  # a few failed connection attempts: the reconnect backoff grows
        assert spool.size_bytes > 0
        proxy = await asyncio.start_server(forward, "127.0.0.1", port)
        back = time.monotonic()
        while spool.size_bytes and time.monotonic() - back < 10:
            await asyncio.sleep(0.1)
        took = time.monotonic() - back
        assert spool.size_bytes == 0
        # The channel retries at most every RECONNECT_MAX_BACKOFF_MS (1 s); allow a loaded machine.
        assert took < 5, took
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close()
        if proxy is not None:
            proxy.close()
        spool.close()
    assert all(len(_ledger(s, r.request_id)) == 1 for r in records)


async def test_a_record_the_ledger_refuses_is_quarantined_and_does_not_block_the_rest(
    s: Stack, tmp_path: Path
) -> None:
    good = _records(s.a, 2)
    bad = usage_pb2.UsageRecord(request_id="bad-" + uuid.uuid4().hex, tenant_id=s.a.tenant_id)
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.append_many([good[0].SerializeToString(), bad.SerializeToString(), good[1].SerializeToString()])
    async with s.registry.certs.aio_channel(s.registry.target, Role.ROUTER) as channel:
        assert await Shipper(spool, channel).ship_once() == 2
    assert spool.seal() == []
    assert read_segment(tmp_path / "rejected.log").records == [bad.SerializeToString()]
    assert all(len(_ledger(s, r.request_id)) == 1 for r in good)


async def test_sigterm_lets_a_stream_in_flight_finish_and_ships_its_record(s: Stack, tmp_path: Path) -> None:
    for w in s.workers:
        w.worker.token_delay_s = 0.02
    proc, target = await _router_process(s, tmp_path, ship_interval_s=3600)
    rid = f"drain-{uuid.uuid4().hex}"
    try:
        async with _public(target, s.registry.certs) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for _ in range(50):
                call = stub.Generate(
                    _request(request_id=rid, adapter="bot", max_tokens=40), metadata=_md(s.a.secret)
                )
                try:
                    await call.read()  # started: the stream is in flight
                    break
                except grpc.aio.AioRpcError as exc:  # until the new router has probed the workers
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    await asyncio.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            last = None
            while (event := await call.read()) is not grpc.aio.EOF:
                last = event
        assert isinstance(last, inference_pb2.GenerateResponse)
        assert last.finished.usage.output_tokens == 40
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Shipped on the way out, though the ship interval had not come round.
    assert (await _billed(s, rid, timeout_s=1.0))["output_tokens"] == 40
    assert not list(tmp_path.glob("seg-*"))


# -- the CLI process ---------------------------------------------------------------------------


def test_router_serve_reports_health_and_drains_on_sigterm(registry: RegistryProcess, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **registry.env,
        "LORAPLEX_ROUTER_LISTEN": f"127.0.0.1:{port}",
        "LORAPLEX_HTTP_LISTEN": "",  # the HTTP door has tests of its own
        "LORAPLEX_SPOOL_DIR": str(tmp_path / "spool"),
        **_router_tls(registry),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "router", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # The public endpoint serves TLS with the router certificate; health answers a checked client.
        wait_serving(f"127.0.0.1:{port}", tls=registry.certs.files(Role.OPERATOR), proc=proc)
        with registry.certs.channel(f"127.0.0.1:{port}", Role.OPERATOR) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="loraplex.v1.InferenceService"))
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (tmp_path / "spool").is_dir()


def test_router_refuses_to_start_without_a_certificate(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["LORAPLEX_HOME"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "router", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "loraplex certs init" in proc.stderr and "LORAPLEX_TLS_CERT" in proc.stderr
