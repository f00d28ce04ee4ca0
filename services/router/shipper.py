"""Ships spooled usage records to the registry's UsageService, oldest segment first.

A segment is deleted only after every batch cut from it was acknowledged by RecordUsage; a failure
leaves it in place and the next round (after a backoff) sends it again. Re-sent records are
harmless: the ledger is idempotent on (tenant, request id).

A registry that comes back after an outage is noticed by the channel's reconnects (at most a
second apart, registry_view.CHANNEL_OPTIONS), not by this loop's backoff: the channel turning
READY wakes the shipper, so a backlog (and a full spool's refusals) ends within about a second of
the registry's return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from loraplex.v1 import usage_pb2, usage_pb2_grpc
from services.router import metrics
from services.router.spool import Spool, read_segment

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0


class Shipper:
    def __init__(
        self,
        spool: Spool,
        channel: grpc.aio.Channel,
        *,
        batch: int = 500,
        interval_s: float = 1.0,
        # Short: a full spool refuses traffic until a round succeeds, so after a registry outage
        # the next try must come within seconds (one small RPC per router per try is cheap).
        max_backoff_s: float = 5.0,
    ) -> None:
        self._spool = spool
        self._channel = channel
        self._stub = usage_pb2_grpc.UsageServiceStub(channel)
        self._batch = batch
        self._interval = interval_s
        self._max_backoff = max_backoff_s
        self._wake = asyncio.Event()
        # Monotonic start time of the last shipping round that succeeded: every record spooled
        # before it is in the ledger (the monthly quota stops counting those tokens locally).
        self.confirmed_through = 0.0

    def wake(self) -> None:
        """Ship now rather than at the next interval."""
        self._wake.set()

    async def ship_once(self, *, timeout_s: float = CALL_TIMEOUT_S) -> int:
        """Sends every record spooled so far; returns how many the registry acknowledged.

        Raises grpc.aio.AioRpcError when a batch fails; what was acknowledged before stays deleted.
        """
        shipped = 0
        for segment in await asyncio.to_thread(self._spool.seal):
            contents = await asyncio.to_thread(read_segment, segment)
            records = _decode(contents.records, segment.name)
            for start in range(0, len(records), self._batch):
                shipped += await self._send(records[start : start + self._batch], timeout_s)
            await asyncio.to_thread(self._spool.delete, segment)
            metrics.SPOOL_BYTES.set(self._spool.size_bytes)
        return shipped

    async def _send(self, records: list[usage_pb2.UsageRecord], timeout_s: float) -> int:
        """Ships one batch; a batch the ledger refuses as invalid is retried record by record and
        the refused records are quarantined, so one bad record cannot block billing forever."""
        request = usage_pb2.RecordUsageRequest(records=records)
        try:
            resp = await self._stub.RecordUsage(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            if len(records) == 1:
                path = await asyncio.to_thread(self._spool.quarantine, [records[0].SerializeToString()])
                metrics.QUARANTINED.inc()
                log.critical(
                    "the ledger refused usage record %r (%s); kept in %s",
                    records[0].request_id,
                    exc.details(),
                    path,
                )
                return 0
            shipped = 0
            for record in records:
                shipped += await self._send([record], timeout_s)
            return shipped
        metrics.SHIPPED.inc(len(records))
        if resp.duplicates:
            log.info("registry already had %d of %d shipped usage records", resp.duplicates, len(records))
        return len(records)

    async def run(self) -> None:
        """Runs until cancelled: ships every interval, backing off while the registry fails."""
        watcher = asyncio.create_task(self._wake_on_reconnect(), name="usage-shipper-reconnect")
        try:
            await self._ship_forever()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _wake_on_reconnect(self) -> None:
        # try_to_connect: a channel that went IDLE after failures keeps reconnecting.
        state = self._channel.get_state(try_to_connect=True)
        while True:
            await self._channel.wait_for_state_change(state)
            state = self._channel.get_state(try_to_connect=True)
            if state == grpc.ChannelConnectivity.READY and self._spool.size_bytes:
                log.info("registry reachable again: shipping %d spooled bytes now", self._spool.size_bytes)
                self.wake()

    def _backoff(self, delay: float) -> float:
        # A full spool refuses every new stream: retry each interval then, one small RPC a second.
        cap = self._interval if self._spool.full else self._max_backoff
        return min(cap, max(self._interval, delay * 2))

    async def _ship_forever(self) -> None:
        delay = self._interval
        while True:
            try:
                started = time.monotonic()
                await self.ship_once()
                self.confirmed_through = started
                delay = self._interval
            except grpc.aio.AioRpcError as exc:
                metrics.SHIP_FAILURES.inc()
                delay = self._backoff(delay)
                log.warning(
                    "cannot ship usage (%s: %s); %d bytes spooled, retrying in %.1fs",
                    exc.code().name,
                    exc.details(),
                    self._spool.size_bytes,
                    delay,
                )
            except Exception:
                metrics.SHIP_FAILURES.inc()
                delay = self._backoff(delay)
                log.exception("usage shipping failed; retrying in %.1fs", delay)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)


def _decode(payloads: list[bytes], segment: str) -> list[usage_pb2.UsageRecord]:
    records = []
    for payload in payloads:
        try:
            records.append(usage_pb2.UsageRecord.FromString(payload))
        except DecodeError:
            # The CRC matched, so these are the bytes that were written: a bug, not a torn write.
            log.critical("spool segment %s holds a record that is not a UsageRecord; skipping it", segment)
    return records
