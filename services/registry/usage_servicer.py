"""UsageService: gRPC messages to ledger queries and export encodings. Admin token on every call."""

from __future__ import annotations

import asyncio
import math
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loraplex.v1 import common_pb2, usage_pb2, usage_pb2_grpc
from services.common.grpc_errors import status_errors
from services.registry import errors, queries
from services.registry.callers import ROUTER_CALLS, Authenticator
from services.registry.usage_export import ExportFormat, LineChunker, encode_rows, header
from services.registry.usage_ledger import (
    MAX_BATCH,
    TimeRange,
    UnknownReference,
    export_csv_pages,
    export_pages,
    insert_usage_batch,
    lookup_requests,
    summarize,
    tenant_tokens,
)

ERRORS: dict[type[BaseException], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    UnknownReference: grpc.StatusCode.FAILED_PRECONDITION,
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
}

MAX_REQUEST_ID = 128
_FORMATS = {
    usage_pb2.EXPORT_FORMAT_CSV: ExportFormat.CSV,
    usage_pb2.EXPORT_FORMAT_JSONL: ExportFormat.JSONL,
    usage_pb2.EXPORT_FORMAT_CLOUDEVENTS: ExportFormat.CLOUDEVENTS,
}
# Stored and exported as "eos", "stop", "length", "cancelled", "deadline_exceeded", "error".
_FINISH_REASONS = {
    value: name.removeprefix("FINISH_REASON_").lower()
    for name, value in common_pb2.FinishReason.items()
    if value != common_pb2.FINISH_REASON_UNSPECIFIED
}


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def _uuid(where: str, field: str, value: str, *, optional: bool) -> str | None:
    """The canonical lower-case text of a UUID (asyncpg encodes it; uuid.UUID costs ~1 us a call)."""
    if not value and optional:
        return None
    if _UUID.fullmatch(value) is None:
        raise ValueError(f"usage record {where!r}: {field} {value!r} is not a UUID")
    return value.lower()


def _time(where: str, field: str, ts: Timestamp) -> datetime:
    # Timestamp.ToDatetime validates and rounds in Python; this is the same value at a fifth the cost.
    try:
        return _EPOCH + (ts.seconds * 1_000_000 + ts.nanos // 1000) * _US
    except OverflowError:
        raise ValueError(f"usage record {where!r}: {field} is out of range") from None


def record_row(r: Any) -> tuple[Any, ...]:
    """One UsageRecord message as a ledger row (usage_ledger.INSERT_COLUMNS order), or ValueError.

    On the ingest path of every request: the checks are cheap and a message is built only on failure.
    """
    rid = r.request_id
    if not rid or len(rid) > MAX_REQUEST_ID or not rid.isprintable():
        raise ValueError(
            f"request_id {rid[:MAX_REQUEST_ID]!r} must be 1 to {MAX_REQUEST_ID} printable characters"
        )

    def bad(problem: str) -> ValueError:
        return ValueError(f"usage record {rid!r}: {problem}")

    # Printable free text keeps every exported line one record (CSV quotes but keeps line breaks).
    if not r.base_model or not r.base_model.isprintable():
        raise bad("base_model is required and must be printable")
    if len(r.worker_id) > MAX_REQUEST_ID or not r.worker_id.isprintable():
        raise bad(f"worker_id must be at most {MAX_REQUEST_ID} printable characters")
    u = r.usage
    if u.cached_input_tokens > u.input_tokens:
        raise bad("cached_input_tokens exceeds input_tokens")
    reason = _FINISH_REASONS.get(r.finish_reason)
    if reason is None:
        raise bad("finish_reason must be set")
    ttft, duration = r.ttft_ms, r.duration_ms
    if not (0 <= ttft < math.inf and 0 <= duration < math.inf):
        raise bad("ttft_ms and duration_ms must be finite and >= 0")
    if not (r.HasField("started_at") and r.HasField("finished_at")):
        raise bad("started_at and finished_at are required")
    started, finished = _time(rid, "started_at", r.started_at), _time(rid, "finished_at", r.finished_at)
    if finished < started:
        raise bad("finished_at is before started_at")
    adapter_id = _uuid(rid, "adapter_id", r.adapter_id, optional=True)
    if (adapter_id is None) != (r.adapter_version == 0):
        raise bad("adapter_id and adapter_version go together (both empty for the bare base model)")
    return (
        rid,
        _uuid(rid, "tenant_id", r.tenant_id, optional=False),
        _uuid(rid, "api_key_id", r.api_key_id, optional=True),
        r.base_model,
        adapter_id,
        r.adapter_version or None,
        u.input_tokens,
        u.cached_input_tokens,
        u.output_tokens,
        reason,
        ttft,
        duration,
        r.worker_id or None,
        r.cold_start,
        started,
        finished,
    )


def _window(request: Any) -> TimeRange:
    """An unset start or end leaves that side open."""

    def at(field: str) -> Any:
        ts: Timestamp = getattr(request, field)
        return ts.ToDatetime(tzinfo=UTC) if request.HasField(field) else None

    window = TimeRange(at("start"), at("end"))
    if window.start is not None and window.end is not None and window.end <= window.start:
        raise ValueError("end must be after start: the range is [start, end)")
    return window


@status_errors(ERRORS)
class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    def __init__(
        self, admin_token: str, sessions: async_sessionmaker[AsyncSession], *, plaintext: bool = False
    ) -> None:
        self._auth = Authenticator(admin_token, sessions, plaintext=plaintext)
        self._sessions = sessions

    async def _admin(self, context: grpc.aio.ServicerContext) -> None:
        await self._auth.require_admin(context)

    async def _tenant_id(self, tenant: str) -> uuid.UUID | None:
        if not tenant:
            return None
        async with self._sessions() as s:
            return await queries.tenant_id_of(s, tenant)

    async def RecordUsage(self, request: Any, context: Any) -> usage_pb2.RecordUsageResponse:
        # Routers ship what they metered; the operator may too (backfills, tests).
        await self._auth.caller(context, ROUTER_CALLS)
        if len(request.records) > MAX_BATCH:
            raise ValueError(
                f"a batch holds at most {MAX_BATCH} records, not {len(request.records)}; split it"
            )
        rows = [record_row(r) for r in request.records]
        async with self._sessions.begin() as s:
            inserted, duplicates = await insert_usage_batch(s, rows)
        return usage_pb2.RecordUsageResponse(inserted=inserted, duplicates=duplicates)

    async def LookupRequests(self, request: Any, context: Any) -> usage_pb2.LookupRequestsResponse:
        # The router asks this before generating a client-chosen request id: the same caller,
        # and so the same authorization, as RecordUsage.
        await self._auth.caller(context, ROUTER_CALLS)
        if _UUID.fullmatch(request.tenant_id) is None:
            raise ValueError(f"tenant_id {request.tenant_id[:64]!r} is not a UUID")
        async with self._sessions() as s:
            found = await lookup_requests(s, request.tenant_id, list(request.request_ids), request.window_s)
        return usage_pb2.LookupRequestsResponse(found=found)

    async def TenantTokens(self, request: Any, context: Any) -> usage_pb2.TenantTokensResponse:
        # The router reads a tenant's month-to-date tokens for its monthly quota: router or admin.
        await self._auth.caller(context, ROUTER_CALLS)
        if _UUID.fullmatch(request.tenant_id) is None:
            raise ValueError(f"tenant_id {request.tenant_id[:64]!r} is not a UUID")
        if not request.HasField("since"):
            raise ValueError("since is required: the start of the period to sum")
        async with self._sessions() as s:
            tokens = await tenant_tokens(s, request.tenant_id, request.since.ToDatetime(tzinfo=UTC))
        return usage_pb2.TenantTokensResponse(tokens=tokens)

    async def ExportUsage(self, request: Any, context: Any) -> AsyncIterator[usage_pb2.ExportUsageResponse]:
        await self._admin(context)
        fmt = _FORMATS.get(request.format)
        if fmt is None:
            raise ValueError(
                "format is required: EXPORT_FORMAT_CSV, EXPORT_FORMAT_JSONL or EXPORT_FORMAT_CLOUDEVENTS"
            )
        window = _window(request)
        tenant_id = await self._tenant_id(request.tenant)
        chunker = LineChunker()
        for chunk in chunker.feed(header(fmt)):
            yield usage_pb2.ExportUsageResponse(data=chunk)
        if fmt is ExportFormat.CSV:
            async for data in export_csv_pages(self._sessions, window, tenant_id):
                for chunk in chunker.feed(data):
                    yield usage_pb2.ExportUsageResponse(data=chunk)
        else:
            async for page in export_pages(self._sessions, window, tenant_id):
                # In a thread so the event loop keeps serving other calls while a page is encoded.
                data = await asyncio.to_thread(encode_rows, page, fmt)
                for chunk in chunker.feed(data):
                    yield usage_pb2.ExportUsageResponse(data=chunk)
        for chunk in chunker.flush():
            yield usage_pb2.ExportUsageResponse(data=chunk)

    async def SummarizeUsage(self, request: Any, context: Any) -> usage_pb2.SummarizeUsageResponse:
        await self._admin(context)
        window = _window(request)
        tenant_id = await self._tenant_id(request.tenant)
        async with self._sessions() as s:
            rows = await summarize(s, window, tenant_id)
        return usage_pb2.SummarizeUsageResponse(
            rows=[
                usage_pb2.UsageSummaryRow(
                    tenant_id=r.tenant_id,
                    base_model=r.base_model,
                    adapter_id=r.adapter_id,
                    day=r.day,
                    requests=r.requests,
                    input_tokens=r.input_tokens,
                    cached_input_tokens=r.cached_input_tokens,
                    output_tokens=r.output_tokens,
                    amount_usd=float(r.amount_usd or 0),
                    amount_usd_decimal=str(r.amount_usd or 0),
                )
                for r in rows
            ]
        )
