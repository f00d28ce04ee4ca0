"""The usage ledger's queries: idempotent batch ingest, keyset-paged export, per-day summaries.

These run on asyncpg directly, through the session's connection: the ledger is the registry's
only high-volume table, and SQLAlchemy's per-row overhead would dominate both a 10,000-record
ingest and a million-row export. Both move data with COPY (binary in, CSV out).

Each row is keyed by (tenant_id, request_id): request ids are the client's, unique within a tenant.
At ingest every new row stores the base model's USD-per-million prices in force at its finished_at
(base_model_prices), so a backlog shipped after a price change keeps the old price and changing a
price never reprices history. Amounts are computed in SQL with `numeric`, exactly, from those
stored prices. Cached input tokens are part of input_tokens and are billed at the input price (the
catalog has no separate cached price).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.registry.errors import RegistryError
from services.registry.usage_export import csv_last_key

MAX_BATCH = 10_000
EXPORT_PAGE = 10_000

# Order of the values in each row given to insert_usage_batch.
INSERT_COLUMNS = (
    "request_id",
    "tenant_id",
    "api_key_id",
    "base_model",
    "adapter_id",
    "adapter_version",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "finish_reason",
    "ttft_ms",
    "duration_ms",
    "worker_id",
    "cold_start",
    "started_at",
    "finished_at",
)
# Batches arrive by binary COPY into a per-connection staging table, then one INSERT ... SELECT
# moves them, skipping (tenant, request id) pairs already in the ledger or repeated within the
# batch, and stamps each row with the prices in force when it finished. COPY
# encodes each value in C; unnest() over 16 array parameters cost ~2x more registry CPU per
# record (asyncpg checks every array element against the collections ABCs).
_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS usage_ingest (LIKE usage_records INCLUDING DEFAULTS)"
    " ON COMMIT DELETE ROWS"
)
# The price row in force at finished_at; a record older than the model's first price row (clock
# skew between router and database) takes that first row rather than no price.
_MOVE = f"""
INSERT INTO usage_records ({", ".join(INSERT_COLUMNS)}, input_price_per_mtok, output_price_per_mtok)
SELECT {", ".join("i." + c for c in INSERT_COLUMNS)}, p.input_price_per_mtok, p.output_price_per_mtok
FROM usage_ingest i LEFT JOIN LATERAL (
    (SELECT input_price_per_mtok, output_price_per_mtok FROM base_model_prices
     WHERE base_model = i.base_model AND effective_from <= i.finished_at
     ORDER BY effective_from DESC LIMIT 1)
    UNION ALL
    (SELECT input_price_per_mtok, output_price_per_mtok FROM base_model_prices
     WHERE base_model = i.base_model ORDER BY effective_from LIMIT 1)
    LIMIT 1
) p ON true
ON CONFLICT (tenant_id, request_id) DO NOTHING
"""

_RFC3339 = """'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"""
_AMOUNT = "(u.input_tokens * u.input_price_per_mtok + u.output_tokens * u.output_price_per_mtok)"
# Columns in services.registry.usage_export.EXPORT_COLUMNS order, already in their export form.
_EXPORT_SELECT = f"""
SELECT u.request_id, u.tenant_id::text, u.api_key_id::text, u.base_model, u.adapter_id::text,
       u.adapter_version, u.input_tokens, u.cached_input_tokens, u.output_tokens, u.finish_reason,
       u.ttft_ms, u.duration_ms, u.worker_id, u.cold_start,
       to_char(u.started_at AT TIME ZONE 'UTC', {_RFC3339}),
       to_char(u.finished_at AT TIME ZONE 'UTC', {_RFC3339}),
       trim_scale({_AMOUNT} * 0.000001)::text
FROM usage_records u
"""
# The same columns for COPY ... CSV: booleans spelled as in the JSON formats, NULL as an empty field.
_CSV_SELECT = _EXPORT_SELECT.replace("u.cold_start,", "CASE WHEN u.cold_start THEN 'true' ELSE 'false' END,")
_FINISHED_AT, _TENANT_ID, _REQUEST_ID = 15, 1, 0


class UnknownReference(RegistryError):
    """A record names a tenant or base model the registry does not know; nothing was inserted."""


@dataclass(frozen=True)
class TimeRange:
    """finished_at in [start, end); None is unbounded on that side."""

    start: datetime | None
    end: datetime | None


@dataclass(frozen=True)
class SummaryRow:
    tenant_id: str
    day: str  # UTC, YYYY-MM-DD
    base_model: str
    adapter_id: str  # "" for the bare base model
    requests: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    amount_usd: Decimal | None  # from the prices stored with the records; None when none had a price


async def _driver(s: AsyncSession) -> Any:
    """The asyncpg connection under the session.

    SQLAlchemy begins the session's transaction lazily, at its own first statement: code that
    needs several raw statements to be atomic opens pg.transaction() (a savepoint if one is open).
    """
    conn = await s.connection()
    raw = await conn.get_raw_connection()
    return raw.driver_connection


async def insert_usage_batch(s: AsyncSession, rows: Sequence[Sequence[Any]]) -> tuple[int, int]:
    """Append rows (INSERT_COLUMNS order) to the ledger; (inserted, duplicates).

    All or nothing: a row naming an unknown tenant or base model raises UnknownReference before
    anything is written. Duplicates — (tenant, request id) pairs already in the ledger, or repeated
    within the batch — are counted and skipped.
    """
    if not rows:
        return 0, 0
    if len(rows) > MAX_BATCH:
        raise ValueError(f"a batch holds at most {MAX_BATCH} records, not {len(rows)}; split it")
    pg = await _driver(s)
    await _require_known(pg, "tenants", "id", "uuid", [r[1] for r in rows], "tenant")
    await _require_known(pg, "base_models", "name", "text", [r[3] for r in rows], "base model")
    # The session's transaction starts lazily on SQLAlchemy's first statement, which may not have
    # run: asyncpg's own transaction (a savepoint inside one already open) keeps staging and move
    # together; the staged rows vanish at commit.
    async with pg.transaction():
        await pg.execute(_STAGE)
        await pg.copy_records_to_table("usage_ingest", records=rows, columns=INSERT_COLUMNS)
        status = await pg.execute(_MOVE)  # "INSERT 0 <rows inserted>"
    inserted = int(status.rsplit(" ", 1)[1])
    return inserted, len(rows) - inserted


async def _require_known(pg: Any, table: str, key: str, pg_type: str, values: list[Any], what: str) -> None:
    wanted = set(values)
    found = await pg.fetch(f"SELECT {key} FROM {table} WHERE {key} = ANY($1::{pg_type}[])", list(wanted))
    missing = wanted - {str(r[0]) for r in found}
    if missing:
        names = ", ".join(sorted(map(str, missing))[:5]) + (" ..." if len(missing) > 5 else "")
        raise UnknownReference(
            f"the batch names {len(missing)} unknown {what}(s): {names}; "
            f"nothing was recorded (create the {what} first, then resend the batch)"
        )


def _where(window: TimeRange, tenant_id: uuid.UUID | None, args: list[Any]) -> list[str]:
    conds = []
    if window.start is not None:
        args.append(window.start)
        conds.append(f"u.finished_at >= ${len(args)}")
    if window.end is not None:
        args.append(window.end)
        conds.append(f"u.finished_at < ${len(args)}")
    if tenant_id is not None:
        args.append(tenant_id)
        conds.append(f"u.tenant_id = ${len(args)}")
    return conds


# (finished_at as RFC 3339 text, tenant_id, request_id): where the next page starts. Request ids
# repeat across tenants, so the tenant is part of the key.
Key = tuple[str, str, str]
P = TypeVar("P", list[Any], bytes)


def _page_sql(
    select: str, window: TimeRange, tenant_id: uuid.UUID | None, after: Key | None, limit: int
) -> tuple[str, list[Any]]:
    args: list[Any] = []
    conds = _where(window, tenant_id, args)
    if after is not None:
        args.extend(after)
        n = len(args)
        conds.append(
            f"(u.finished_at, u.tenant_id, u.request_id)"
            f" > (${n - 2}::text::timestamptz, ${n - 1}::uuid, ${n})"
        )
    args.append(limit)
    sql = (
        select
        + (f"WHERE {' AND '.join(conds)}\n" if conds else "")
        + f"ORDER BY u.finished_at, u.tenant_id, u.request_id LIMIT ${len(args)}"
    )
    return sql, args


async def _keyset(
    fetch: Callable[[Key | None], Awaitable[P]], next_key: Callable[[P], Key | None]
) -> AsyncIterator[P]:
    """Keyset pagination with one page of read-ahead.

    Each page is its own short query after the last key of the previous one, so memory stays at
    two pages and no transaction is held open while a slow client reads; the next page is fetched
    while the caller encodes and sends the current one.
    """
    pending = asyncio.ensure_future(fetch(None))
    try:
        while True:
            page = await pending
            key = next_key(page)
            if key is not None:
                pending = asyncio.ensure_future(fetch(key))
            if page:
                yield page
            if key is None:
                return
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pending


def export_pages(
    sessions: async_sessionmaker[AsyncSession],
    window: TimeRange,
    tenant_id: uuid.UUID | None,
    page_size: int = EXPORT_PAGE,
) -> AsyncIterator[list[Any]]:
    """Pages of export rows (usage_export.EXPORT_COLUMNS order) by (finished_at, tenant_id, request_id).

    Records that arrive late for a range already passed are not seen: export closed ranges.
    """

    async def fetch(after: Key | None) -> list[Any]:
        sql, args = _page_sql(_EXPORT_SELECT, window, tenant_id, after, page_size)
        async with sessions() as s:
            rows: list[Any] = await (await _driver(s)).fetch(sql, *args)
            return rows

    def next_key(page: list[Any]) -> Key | None:
        if len(page) < page_size:
            return None
        last = page[-1]
        return (last[_FINISHED_AT], last[_TENANT_ID], last[_REQUEST_ID])

    return _keyset(fetch, next_key)


def export_csv_pages(
    sessions: async_sessionmaker[AsyncSession],
    window: TimeRange,
    tenant_id: uuid.UUID | None,
    page_size: int = EXPORT_PAGE,
) -> AsyncIterator[bytes]:
    """The same rows as export_pages, as CSV lines (no header) written by PostgreSQL's COPY.

    COPY writes CSV in C, with RFC 4180 quoting, and hands over bytes: no per-row Python work,
    which halved the registry CPU of a 1M-row export in bench.usage. Pages run until one comes back
    empty; the next key is read back from the page's last line.
    """

    async def fetch(after: Key | None) -> bytes:
        sql, args = _page_sql(_CSV_SELECT, window, tenant_id, after, page_size)
        parts: list[bytes] = []

        async def sink(data: bytes) -> None:
            parts.append(data)

        async with sessions() as s:
            await (await _driver(s)).copy_from_query(sql, *args, output=sink, format="csv")
        return b"".join(parts)

    def next_key(page: bytes) -> Key | None:
        return csv_last_key(page) if page else None

    return _keyset(fetch, next_key)


async def tenant_tokens(s: AsyncSession, tenant_id: str, since: datetime) -> int:
    """One tenant's input + output tokens with finished_at >= `since` (the tenant_id, finished_at index)."""
    pg = await _driver(s)
    total = await pg.fetchval(
        "SELECT coalesce(sum(input_tokens + output_tokens), 0)::bigint FROM usage_records"
        " WHERE tenant_id = $1::uuid AND finished_at >= $2",
        tenant_id,
        since,
    )
    return int(total)


async def summarize(s: AsyncSession, window: TimeRange, tenant_id: uuid.UUID | None) -> list[SummaryRow]:
    """Totals per (tenant, UTC day, base model, adapter), in that order."""
    args: list[Any] = []
    conds = _where(window, tenant_id, args)
    sql = f"""
SELECT u.tenant_id::text, to_char(u.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, u.base_model,
       coalesce(u.adapter_id::text, '') AS adapter, count(*), sum(u.input_tokens)::bigint,
       sum(u.cached_input_tokens)::bigint, sum(u.output_tokens)::bigint,
       trim_scale(sum({_AMOUNT}) * 0.000001)
FROM usage_records u
{f"WHERE {' AND '.join(conds)}" if conds else ""}
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4
"""
    pg = await _driver(s)
    return [SummaryRow(*r) for r in await pg.fetch(sql, *args)]


MAX_LOOKUP = 1_000


async def lookup_requests(
    s: AsyncSession, tenant_id: str, request_ids: Sequence[str], window_s: int
) -> list[str]:
    """The request ids among `request_ids` the tenant has a record for, finished within the last
    `window_s` seconds (0: ever). One primary-key probe per id."""
    if len(request_ids) > MAX_LOOKUP:
        raise ValueError(f"look up at most {MAX_LOOKUP} request ids at once, not {len(request_ids)}")
    if not request_ids:
        return []
    pg = await _driver(s)
    sql = "SELECT request_id FROM usage_records WHERE tenant_id = $1::uuid AND request_id = ANY($2::text[])"
    args: list[Any] = [tenant_id, list(request_ids)]
    if window_s:
        sql += " AND finished_at >= now() - make_interval(secs => $3)"
        args.append(float(window_s))
    return [r[0] for r in await pg.fetch(sql, *args)]
