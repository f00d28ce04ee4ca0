"""The usage ledger over real gRPC and PostgreSQL: idempotent ingest, exports that parse back to
what was recorded, filters, boundaries, summaries, auth, and batches rejected as a whole.

Each test uses its own tenants and its own far-future time window, so tests share the session
database without seeing each other's records.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import grpc
import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.v1 import common_pb2, usage_pb2
from services.client.registry import RegistryClient
from services.client.usage import UsageClient, timestamp
from services.common.config import RegistrySettings
from services.common.model_spec import BaseModelSpec, TargetModule
from services.common.tls import Role
from services.registry.convert import base_model_pb
from services.registry.server import start_registry
from services.registry.usage_ledger import TimeRange, export_csv_pages, export_pages
from tests.fixtures.tls import ServiceCerts

ADMIN_TOKEN = "usage-test-admin-token-0123"
MODEL = "usage-test-model"
# USD per million tokens.
INPUT_PRICE, OUTPUT_PRICE = Decimal("0.15"), Decimal("0.6")


@dataclass
class Registry:
    target: str
    database_url: str
    certs: ServiceCerts

    def usage(self, token: str | None = ADMIN_TOKEN, role: Role = Role.OPERATOR) -> UsageClient:
        return UsageClient(self.target, token, tls=self.certs.files(role), timeout_s=60)

    def admin(self) -> RegistryClient:
        return RegistryClient(self.target, ADMIN_TOKEN, tls=self.certs.files(Role.OPERATOR))

    def tenant(self) -> tuple[str, str]:
        """A fresh tenant: (id, name)."""
        name = f"u-{uuid.uuid4().hex[:10]}"
        with self.admin() as c:
            t = c.create_tenant(name)
        return t.tenant_id, name

    def ledger_count(self, request_ids: list[str]) -> int:
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM usage_records WHERE request_id = ANY(%s)", (request_ids,)
            ).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture(scope="module")
def registry(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, certs: ServiceCerts
) -> Iterator[Registry]:
    """A registry on its own event loop in a thread, so tests can call it with blocking clients."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO base_models (name, architecture, num_layers, context_length, hidden_size,"
            " vocab_size, target_modules, layers_prefix, input_price_per_mtok, output_price_per_mtok)"
            " VALUES (%s, 'llama', 1, 2048, 64, 1000, '[]', 'model.layers', %s, %s)"
            " ON CONFLICT (name) DO NOTHING",
            (MODEL, INPUT_PRICE, OUTPUT_PRICE),
        )
        conn.execute(
            "INSERT INTO base_model_prices (base_model, effective_from, input_price_per_mtok,"
            " output_price_per_mtok) VALUES (%s, '-infinity', %s, %s) ON CONFLICT DO NOTHING",
            (MODEL, INPUT_PRICE, OUTPUT_PRICE),
        )
    home = tmp_path_factory.mktemp("usage-registry")
    settings = RegistrySettings(
        home=home,
        listen="127.0.0.1:0",
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        adapter_store=(home / "store").as_uri(),
        allowed_buckets=(),
        allowed_file_roots=(),
        max_adapter_rank=64,
        max_adapter_bytes=1 << 20,
        tls=certs.files(Role.REGISTRY),
    )
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict[str, object] = {}

    async def serve() -> None:
        try:
            running = await start_registry(settings)
        except BaseException as exc:
            state["error"] = exc
            started.set()
            raise
        stop = asyncio.Event()
        state["port"], state["stop"] = running.port, stop
        started.set()
        await stop.wait()
        await running.drain(1.0)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(60), "registry did not start within 60 s"
    error = state.get("error")
    if isinstance(error, BaseException):
        raise RuntimeError("registry failed to start") from error
    try:
        yield Registry(f"127.0.0.1:{state['port']}", database_url, certs)
    finally:
        stop = state["stop"]
        assert isinstance(stop, asyncio.Event)
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def window() -> datetime:
    """The start of a fresh one-week window, far from every other test's."""
    return datetime(2031, 1, 1, tzinfo=UTC) + timedelta(weeks=uuid.uuid4().int % 5000)


def record(
    tenant_id: str,
    finished_at: datetime,
    *,
    request_id: str | None = None,
    input_tokens: int = 100,
    cached: int = 10,
    output_tokens: int = 20,
    adapter_id: str = "",
) -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord(
        request_id=request_id or f"req-{uuid.uuid4().hex}",
        tenant_id=tenant_id,
        api_key_id=str(uuid.uuid4()),
        base_model=MODEL,
        adapter_id=adapter_id,
        adapter_version=3 if adapter_id else 0,
        usage=common_pb2.Usage(
            input_tokens=input_tokens, cached_input_tokens=cached, output_tokens=output_tokens
        ),
        finish_reason=common_pb2.FINISH_REASON_EOS,
        ttft_ms=12.5,
        duration_ms=250.25,
        worker_id="worker-a",
        cold_start=True,
        started_at=timestamp(finished_at - timedelta(milliseconds=250)),
        finished_at=timestamp(finished_at),
    )


def amount(r: usage_pb2.UsageRecord) -> Decimal:
    return (r.usage.input_tokens * INPUT_PRICE + r.usage.output_tokens * OUTPUT_PRICE) / 1_000_000


def varied(tenant_id: str, start: datetime, n: int) -> list[usage_pb2.UsageRecord]:
    adapter = str(uuid.uuid4())
    return [
        record(
            tenant_id,
            start + timedelta(seconds=37 * i, microseconds=i),
            input_tokens=50 + 7 * i,
            cached=i % 50,
            output_tokens=1 + 13 * i,
            adapter_id=adapter if i % 3 else "",
        )
        for i in range(n)
    ]


def export(registry: Registry, fmt: str, start: datetime, end: datetime, tenant: str = "") -> list[bytes]:
    with registry.usage() as c:
        return list(c.export(fmt, start, end, tenant))


def test_duplicate_request_ids_are_recorded_and_billed_once(registry: Registry) -> None:
    tenant_id, _ = registry.tenant()
    start = window()
    first, second = record(tenant_id, start), record(tenant_id, start + timedelta(seconds=1))
    with registry.usage() as c:
        resp = c.record([first, second, first])
        again = c.record([first, second])
    assert (resp.inserted, resp.duplicates) == (2, 1)
    assert (again.inserted, again.duplicates) == (0, 2)
    assert registry.ledger_count([first.request_id, second.request_id]) == 2
    with registry.usage() as c:
        (row,) = c.summarize(start, start + timedelta(days=1), tenant_id)
    assert row.requests == 2 and row.input_tokens == 200


def test_tenant_ids_are_accepted_in_any_case_and_exported_canonical(registry: Registry) -> None:
    tenant_id, _ = registry.tenant()
    start = window()
    with registry.usage() as c:
        assert c.record([record(tenant_id.upper(), start)]).inserted == 1
    (line,) = b"".join(export(registry, "jsonl", start, start + timedelta(days=1), tenant_id)).splitlines()
    assert json.loads(line)["tenant_id"] == tenant_id


def test_csv_export_parses_back_to_the_recorded_tokens_and_amounts(registry: Registry) -> None:
    tenant_id, name = registry.tenant()
    start = window()
    records = varied(tenant_id, start, 300)
    with registry.usage() as c:
        assert c.record(records).inserted == 300
    body = b"".join(export(registry, "csv", start, start + timedelta(weeks=1), name)).decode()
    rows = list(csv.DictReader(io.StringIO(body)))
    assert [r["request_id"] for r in rows] == [r.request_id for r in records]
    assert sum(int(r["input_tokens"]) for r in rows) == sum(r.usage.input_tokens for r in records)
    assert sum(int(r["cached_input_tokens"]) for r in rows) == sum(
        r.usage.cached_input_tokens for r in records
    )
    assert sum(int(r["output_tokens"]) for r in rows) == sum(r.usage.output_tokens for r in records)
    assert sum(Decimal(r["amount_usd"]) for r in rows) == sum(amount(r) for r in records)
    first = rows[0]
    assert (
        first["tenant_id"] == tenant_id and first["finish_reason"] == "eos" and first["cold_start"] == "true"
    )
    assert first["adapter_id"] == "" and first["adapter_version"] == ""
    assert datetime.fromisoformat(first["finished_at"]) == start


def test_jsonl_export_parses_back_to_the_recorded_tokens_and_amounts(registry: Registry) -> None:
    tenant_id, _ = registry.tenant()
    start = window()
    records = varied(tenant_id, start, 200)
    with registry.usage() as c:
        c.record(records)
    lines = b"".join(export(registry, "jsonl", start, start + timedelta(weeks=1), tenant_id)).splitlines()
    objs = [json.loads(line) for line in lines]
    assert {o["request_id"] for o in objs} == {r.request_id for r in records}
    assert sum(o["output_tokens"] for o in objs) == sum(r.usage.output_tokens for r in records)
    assert sum(Decimal(o["amount_usd"]) for o in objs) == sum(amount(r) for r in records)
    assert objs[1]["adapter_version"] == 3 and objs[0]["adapter_id"] is None


def test_cloudevents_export_is_one_valid_event_per_record_in_line_aligned_chunks(registry: Registry) -> None:
    tenant_id, _ = registry.tenant()
    start = window()
    records = varied(tenant_id, start, 300)
    with registry.usage() as c:
        c.record(records)
    chunks = export(registry, "cloudevents", start, start + timedelta(weeks=1), tenant_id)
    # ~800 bytes an event: 300 events need several ~64 KiB chunks, each parseable on its own.
    assert len(chunks) > 1
    assert all(chunk.endswith(b"\n") for chunk in chunks)
    events = [json.loads(line) for chunk in chunks for line in chunk.splitlines()]
    by_id = {f"{tenant_id}/{r.request_id}": r for r in records}
    assert [e["id"] for e in events] == [f"{tenant_id}/{r.request_id}" for r in records]
    for e in events:
        assert e["specversion"] == "1.0" and e["type"] == "loraplex.usage.v1"
        assert e["source"] == "loraplex/registry" and e["datacontenttype"] == "application/json"
        assert e["subject"] == tenant_id
        assert datetime.fromisoformat(e["time"]) == by_id[e["id"]].finished_at.ToDatetime(tzinfo=UTC)
        assert f"{e['subject']}/{e['data']['request_id']}" == e["id"]
    assert sum(Decimal(e["data"]["amount_usd"]) for e in events) == sum(amount(r) for r in records)
    assert sum(e["data"]["input_tokens"] for e in events) == sum(r.usage.input_tokens for r in records)


def test_tenant_filter_exports_only_that_tenants_records(registry: Registry) -> None:
    (a_id, a_name), (b_id, _) = registry.tenant(), registry.tenant()
    start = window()
    mine, theirs = varied(a_id, start, 20), varied(b_id, start, 30)
    with registry.usage() as c:
        c.record(mine + theirs)
    end = start + timedelta(weeks=1)
    for tenant in (a_name, a_id):
        rows = list(
            csv.DictReader(io.StringIO(b"".join(export(registry, "csv", start, end, tenant)).decode()))
        )
        assert {r["request_id"] for r in rows} == {r.request_id for r in mine}
    everyone = list(csv.DictReader(io.StringIO(b"".join(export(registry, "csv", start, end)).decode())))
    assert {r["request_id"] for r in everyone} == {r.request_id for r in mine + theirs}


def test_export_range_includes_its_start_and_excludes_its_end(registry: Registry) -> None:
    tenant_id, _ = registry.tenant()
    start = window()
    end = start + timedelta(hours=1)
    before = record(tenant_id, start - timedelta(microseconds=1), request_id=f"before-{uuid.uuid4()}")
    at_start = record(tenant_id, start, request_id=f"at-start-{uuid.uuid4()}")
    last = record(tenant_id, end - timedelta(microseconds=1), request_id=f"last-{uuid.uuid4()}")
    at_end = record(tenant_id, end, request_id=f"at-end-{uuid.uuid4()}")
    with registry.usage() as c:
        c.record([before, at_start, last, at_end])
    lines = b"".join(export(registry, "jsonl", start, end, tenant_id)).splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == [at_start.request_id, last.request_id]


def test_summary_totals_per_day_and_adapter_match_the_records(registry: Registry) -> None:
    tenant_id, _ = registry.tenant()
    start = window()
    adapter = str(uuid.uuid4())
    day1 = [record(tenant_id, start + timedelta(hours=h), adapter_id=adapter) for h in range(5)]
    day1_base = [record(tenant_id, start + timedelta(hours=h), input_tokens=999) for h in range(3)]
    day2 = [
        record(tenant_id, start + timedelta(days=1, hours=h), adapter_id=adapter, output_tokens=7)
        for h in range(4)
    ]
    with registry.usage() as c:
        c.record(day1 + day1_base + day2)
        rows = c.summarize(start, start + timedelta(weeks=1), tenant_id)
    got = {(r.day, r.adapter_id): r for r in rows}
    d1, d2 = start.date().isoformat(), (start + timedelta(days=1)).date().isoformat()
    assert list(got) == sorted(got) and set(got) == {(d1, ""), (d1, adapter), (d2, adapter)}
    for key, recs in (((d1, adapter), day1), ((d1, ""), day1_base), ((d2, adapter), day2)):
        row = got[key]
        assert row.tenant_id == tenant_id and row.base_model == MODEL
        assert row.requests == len(recs)
        assert row.input_tokens == sum(r.usage.input_tokens for r in recs)
        assert row.cached_input_tokens == sum(r.usage.cached_input_tokens for r in recs)
        assert row.output_tokens == sum(r.usage.output_tokens for r in recs)
        assert row.amount_usd == pytest.approx(float(sum(amount(r) for r in recs)), rel=1e-12)


def test_usage_calls_need_the_admin_token(registry: Registry) -> None:
    tenant_id, name = registry.tenant()
    with registry.admin() as c:
        api_key = c.create_api_key(name).secret
    start = window()
    calls = {
        "record": lambda c: c.record([record(tenant_id, start)]),
        "export": lambda c: list(c.export("csv", start, start + timedelta(days=1))),
        "summary": lambda c: c.summarize(start, start + timedelta(days=1)),
    }
    for token, code in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("not-the-admin-token-at-all", grpc.StatusCode.UNAUTHENTICATED),
        (api_key, grpc.StatusCode.PERMISSION_DENIED),
    ):
        for what, call in calls.items():
            with registry.usage(token) as usage, pytest.raises(grpc.RpcError) as err:
                call(usage)
            assert err.value.code() == code, (what, token)
    with psycopg.connect(registry.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM usage_records WHERE tenant_id = %s", (tenant_id,)).fetchone()
    assert row == (0,)


@pytest.mark.parametrize(
    ("spoil", "code", "phrase"),
    [
        (
            lambda r: setattr(r, "tenant_id", str(uuid.uuid4())),
            grpc.StatusCode.FAILED_PRECONDITION,
            "unknown tenant",
        ),
        (
            lambda r: setattr(r, "base_model", "no-such-model"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "base model",
        ),
        (lambda r: setattr(r, "request_id", ""), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        (lambda r: setattr(r, "request_id", "x" * 129), grpc.StatusCode.INVALID_ARGUMENT, "128"),
        (lambda r: setattr(r, "request_id", "line\nbreak"), grpc.StatusCode.INVALID_ARGUMENT, "printable"),
        (lambda r: setattr(r, "tenant_id", "acme"), grpc.StatusCode.INVALID_ARGUMENT, "not a UUID"),
        (
            lambda r: r.usage.MergeFrom(common_pb2.Usage(cached_input_tokens=1000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "cached",
        ),
        (lambda r: setattr(r, "finish_reason", 0), grpc.StatusCode.INVALID_ARGUMENT, "finish_reason"),
        (lambda r: setattr(r, "ttft_ms", float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "ttft_ms"),
        (lambda r: r.ClearField("finished_at"), grpc.StatusCode.INVALID_ARGUMENT, "finished_at"),
        (lambda r: setattr(r, "adapter_version", 2), grpc.StatusCode.INVALID_ARGUMENT, "adapter_version"),
    ],
)
def test_a_batch_with_one_bad_record_records_nothing(registry: Registry, spoil, code, phrase) -> None:
    tenant_id, _ = registry.tenant()
    start = window()
    batch = [record(tenant_id, start + timedelta(seconds=i)) for i in range(50)]
    spoil(batch[37])
    with registry.usage() as c, pytest.raises(grpc.RpcError) as err:
        c.record(batch)
    assert err.value.code() == code
    assert phrase in (err.value.details() or "")
    assert registry.ledger_count([r.request_id for r in batch]) == 0


def test_a_batch_over_ten_thousand_records_is_refused(registry: Registry) -> None:
    tenant_id, _ = registry.tenant()
    start = window()
    one = record(tenant_id, start)
    batch = [usage_pb2.UsageRecord(request_id=f"{one.request_id}-{i}") for i in range(10_001)]
    with registry.usage() as c, pytest.raises(grpc.RpcError) as err:
        c.record(batch)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "10000" in (err.value.details() or "")


def test_export_rejects_a_missing_format_an_empty_range_and_an_unknown_tenant(registry: Registry) -> None:
    start = window()
    with registry.usage() as c:
        stub, md = c._stub, c._metadata
        cases = [
            (usage_pb2.ExportUsageRequest(start=timestamp(start)), grpc.StatusCode.INVALID_ARGUMENT),
            (
                usage_pb2.ExportUsageRequest(
                    start=timestamp(start), end=timestamp(start), format=usage_pb2.EXPORT_FORMAT_CSV
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                usage_pb2.ExportUsageRequest(tenant="no-such-tenant", format=usage_pb2.EXPORT_FORMAT_CSV),
                grpc.StatusCode.NOT_FOUND,
            ),
        ]
        for req, code in cases:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.ExportUsage(req, metadata=md, timeout=30))
            assert err.value.code() == code


async def test_keyset_pages_return_every_record_once_in_order(
    registry: Registry, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    tenant_id, _ = registry.tenant()
    start = window()
    # Equal finish times make the request id the tie-breaker across page boundaries; ids that CSV
    # must quote check that the next page's key is read back from the page exactly.
    records = [
        record(
            tenant_id, start + timedelta(seconds=i // 4), request_id=f'{i:03d}, "q" {uuid.uuid4().hex[:6]}'
        )
        for i in range(53)
    ]
    with registry.usage() as c:
        await asyncio.to_thread(c.record, records)
    window_ = TimeRange(start, start + timedelta(days=1))
    pages = [p async for p in export_pages(session_factory, window_, uuid.UUID(tenant_id), page_size=5)]
    ids = [row[0] for page in pages for row in page]
    expected = sorted(records, key=lambda r: (r.finished_at.ToDatetime(), r.request_id))
    assert ids == [r.request_id for r in expected]
    assert [len(p) for p in pages] == [5] * 10 + [3]
    csv_pages = [
        p async for p in export_csv_pages(session_factory, window_, uuid.UUID(tenant_id), page_size=5)
    ]
    assert [row[0] for row in csv.reader(io.StringIO(b"".join(csv_pages).decode()))] == ids
    assert [p.count(b"\n") for p in csv_pages] == [5] * 10 + [3]


def test_cli_exports_to_a_file_and_prints_a_json_summary(registry: Registry, tmp_path: Path) -> None:
    tenant_id, name = registry.tenant()
    start = window()
    records = varied(tenant_id, start, 40)
    with registry.usage() as c:
        c.record(records)
    env = {
        **os.environ,
        "LORAPLEX_REGISTRY": registry.target,
        "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN,
        **registry.certs.env(Role.OPERATOR),
    }
    period = ["--from", start.isoformat(), "--to", (start + timedelta(weeks=1)).isoformat(), "--tenant", name]
    out = tmp_path / "usage.csv"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", "usage", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = cli("export", *period, "--format", "csv", "--output", str(out))
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 40 and not (tmp_path / "usage.csv.partial").exists()
    summary = cli("summary", *period, "--json")
    assert summary.returncode == 0, summary.stderr
    totals = json.loads(summary.stdout)
    assert sum(int(r["requests"]) for r in totals) == 40
    assert sum(int(r["output_tokens"]) for r in totals) == sum(r.usage.output_tokens for r in records)
    bad = cli("export", "--from", "yesterday", "--to", "2031-01-01")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


def test_two_tenants_may_use_one_request_id_and_each_is_billed_once(registry: Registry) -> None:
    (a_id, a_name), (b_id, b_name) = registry.tenant(), registry.tenant()
    start = window()
    shared = f"shared-{uuid.uuid4().hex}"
    a_rec = record(a_id, start, request_id=shared, output_tokens=5)
    b_rec = record(b_id, start + timedelta(seconds=1), request_id=shared, output_tokens=7)
    with registry.usage() as c:
        first = c.record([a_rec, b_rec])
        again = c.record([b_rec, a_rec])
    # On the old ledger (request_id alone) tenant B's record was a "duplicate" of A's: unbilled.
    assert (first.inserted, first.duplicates) == (2, 0)
    assert (again.inserted, again.duplicates) == (0, 2)
    end = start + timedelta(days=1)
    for name, expected in ((a_name, 5), (b_name, 7)):
        rows = [
            json.loads(line)
            for chunk in export(registry, "jsonl", start, end, name)
            for line in chunk.splitlines()
        ]
        assert [(r["request_id"], r["output_tokens"]) for r in rows] == [(shared, expected)]
    # CloudEvents ids stay unique (consumers deduplicate on source + id).
    chunks = export(registry, "cloudevents", start, end)
    events = [json.loads(line) for chunk in chunks for line in chunk.splitlines()]
    assert sorted(e["id"] for e in events) == sorted(f"{t}/{shared}" for t in (a_id, b_id))


async def test_keyset_pages_keep_rows_of_tenants_sharing_an_id_and_finish_time(
    registry: Registry, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    """Pages end between rows with the same (finished_at, request_id): none is lost or repeated."""
    start = window()
    span = TimeRange(start, start + timedelta(days=1))
    shared = f"same-{uuid.uuid4().hex}"
    tenants = [registry.tenant()[0] for _ in range(3)]
    with registry.usage() as c:
        c.record([record(t, start, request_id=shared) for t in tenants])
    by_rows = [
        str(r[1]) async for page in export_pages(session_factory, span, None, page_size=1) for r in page
    ]
    by_csv = [
        row[1]
        async for data in export_csv_pages(session_factory, span, None, page_size=1)
        for row in csv.reader(io.StringIO(data.decode()))
    ]
    assert by_rows == by_csv == sorted(t.lower() for t in tenants)


def test_lookup_finds_only_this_tenants_ids_within_the_window(registry: Registry) -> None:
    (a_id, _), (b_id, _) = registry.tenant(), registry.tenant()
    now = datetime.now(UTC)
    recent, old, unknown = (f"{k}-{uuid.uuid4().hex}" for k in ("recent", "old", "unknown"))
    with registry.usage() as c:
        c.record([record(a_id, now - timedelta(seconds=10), request_id=recent)])
        c.record([record(a_id, now - timedelta(days=2), request_id=old)])
        assert c.lookup(a_id, [recent, old, unknown], window_s=86_400) == [recent]
        assert sorted(c.lookup(a_id, [recent, old, unknown], window_s=0)) == sorted([recent, old])
        # Tenant B learns nothing about A's ids.
        assert c.lookup(b_id, [recent, old], window_s=0) == []
        with pytest.raises(grpc.RpcError) as bad:
            c.lookup("not-a-uuid", [recent])
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as many:
            c.lookup(a_id, [str(i) for i in range(1001)])
        assert many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with registry.usage(token=None) as c, pytest.raises(grpc.RpcError) as anon:
        c.lookup(a_id, [recent])
    assert anon.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_price_change_does_not_reprice_recorded_usage(registry: Registry) -> None:
    """Each row is billed at the price in force when it finished, even one shipped after the change."""
    spec = BaseModelSpec(
        name=f"priced-{uuid.uuid4().hex[:8]}",
        architecture="llama",
        num_layers=1,
        context_length=2048,
        hidden_size=64,
        vocab_size=1000,
        target_modules=(TargetModule("q_proj", "self_attn.q_proj", 64, 64),),
        layers_prefix="model.layers",
    )
    tenant_id, name = registry.tenant()
    before = datetime.now(UTC) - timedelta(seconds=5)

    def priced(at: datetime) -> usage_pb2.UsageRecord:
        r = record(tenant_id, at, input_tokens=1_000_000, cached=0, output_tokens=1_000_000)
        r.base_model = spec.name
        return r

    with registry.admin() as rc:
        rc.upsert_base_model(base_model_pb(spec, 1.0, 2.0))
    early = priced(before)
    backlog = priced(before + timedelta(seconds=1))  # finished before the change, shipped after it
    with registry.usage() as c:
        c.record([early])
    with registry.admin() as rc:
        rc.upsert_base_model(base_model_pb(spec, 10.0, 20.0))
    late = priced(datetime.now(UTC) + timedelta(seconds=1))
    with registry.usage() as c:
        c.record([backlog, late])
    span = (before - timedelta(minutes=1), datetime.now(UTC) + timedelta(minutes=1))
    rows = [
        json.loads(line) for chunk in export(registry, "jsonl", *span, name) for line in chunk.splitlines()
    ]
    amounts = {r["request_id"]: Decimal(r["amount_usd"]) for r in rows}
    assert amounts == {
        early.request_id: Decimal(3),
        backlog.request_id: Decimal(3),
        late.request_id: Decimal(30),
    }
    csv_rows = list(csv.DictReader(io.StringIO(b"".join(export(registry, "csv", *span, name)).decode())))
    assert {r["request_id"]: Decimal(r["amount_usd"]) for r in csv_rows} == amounts
    with registry.usage() as c:
        summary = c.summarize(*span, tenant_id)
    assert sum(Decimal(str(r.amount_usd)) for r in summary) == Decimal(36)
