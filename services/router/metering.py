"""Usage records for finished streams, written to the spool with group commit.

Many streams end at once under load; each waits for its record to be on disk, but one fsync covers
every record that arrived while the previous fsync ran.
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.v1 import common_pb2, usage_pb2
from services.router import metrics
from services.router.spool import Spool

log = logging.getLogger(__name__)


def usage_record(
    *,
    request_id: str,
    tenant_id: str,
    api_key_id: str,
    base_model: str,
    adapter: common_pb2.AdapterRef | None,
    usage: common_pb2.Usage,
    finish_reason: common_pb2.FinishReason.ValueType,
    ttft_ms: float,
    duration_ms: float,
    worker_id: str,
    cold_start: bool,
    started_at_s: float,
    finished_at_s: float,
) -> usage_pb2.UsageRecord:
    record = usage_pb2.UsageRecord(
        request_id=request_id,
        tenant_id=tenant_id,
        api_key_id=api_key_id,
        base_model=base_model,
        adapter_id=adapter.adapter_id if adapter is not None else "",
        adapter_version=adapter.version if adapter is not None else 0,
        usage=usage,
        finish_reason=finish_reason,
        ttft_ms=ttft_ms,
        duration_ms=duration_ms,
        worker_id=worker_id,
        cold_start=cold_start,
        started_at=_timestamp(started_at_s),
        finished_at=_timestamp(finished_at_s),
    )
    return record


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class SpoolWriter:
    """`await write(record)` returns once the record is fsynced into the spool."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def write(self, record: usage_pb2.UsageRecord) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((record.SerializeToString(), fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        # Shielded: a client that cancels while its record is being written must not lose it.
        await asyncio.shield(fut)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._spool.append_many, [payload for payload, _ in batch])
            except Exception as exc:
                metrics.SPOOL_WRITE_ERRORS.inc(len(batch))
                log.critical("cannot write %d usage record(s) to the spool: %s", len(batch), exc)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                        fut.exception()
                continue
            metrics.SPOOL_BYTES.set(self._spool.size_bytes)
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def drain(self) -> None:
        """Waits until every submitted record is on disk (or failed)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
