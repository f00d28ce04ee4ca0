"""The keep-warm scheduler: every few seconds, prefetch keep-warm adapters and send eviction hints.

The plan is `keep_warm.plan_prefetches` / `plan_evictions` over the pool's live view; this module
only makes the calls: at most `concurrency` at a time, each with a timeout, failures logged and
counted. A prefetch is retried after RETRY_S; an eviction hint every tick until no worker reports
the adapter in memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from loraplex.v1 import common_pb2, registry_pb2, worker_pb2, worker_pb2_grpc
from services.router import metrics
from services.router.keep_warm import Eviction, KeepWarmBook, Prefetch, plan_evictions, plan_prefetches
from services.router.worker_pool import WorkerPool

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0
# A prefetched adapter is not asked for again this soon (it is loading, or its load failed).
RETRY_S = 30.0
MAX_CALLS_PER_TICK = 16
CONCURRENCY = 4


class KeepWarmScheduler:
    def __init__(
        self,
        pool: WorkerPool,
        *,
        interval_s: float,
        eps: float,
        kv_full: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.book = KeepWarmBook()
        self._pool = pool
        self._interval = interval_s
        self._eps = eps
        self._kv_full = kv_full
        self._clock = clock
        self._last_sent: dict[str, float] = {}
        self._gate = asyncio.Semaphore(CONCURRENCY)

    def on_adapter_change(self, adapter: registry_pb2.Adapter) -> None:
        self.book.apply(adapter)

    async def run(self) -> None:
        """Runs until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.tick()
            except Exception:
                log.exception("keep-warm tick failed")

    async def tick(self) -> None:
        now = self._clock()
        refs = self.book.warm_refs()
        # Forget digests no longer kept warm, so the map stays as small as the keep-warm set.
        for digest in [d for d in self._last_sent if d not in refs]:
            del self._last_sent[digest]
        views = self._pool.views()
        prefetches = plan_prefetches(
            ((d, r.base_model) for d, r in refs.items()),
            views,
            self._last_sent,
            now,
            retry_s=RETRY_S,
            limit=MAX_CALLS_PER_TICK,
            eps=self._eps,
            kv_full=self._kv_full,
        )
        evictions, done = plan_evictions(self.book.pending_evictions(), views)
        for digest in done:
            self.book.evicted(digest)
        evictions = evictions[:MAX_CALLS_PER_TICK]  # the rest stay pending for the next ticks
        for p in prefetches:
            self._last_sent[p.digest] = now
        await asyncio.gather(
            *(self._prefetch(p, refs[p.digest]) for p in prefetches), *(self._evict(e) for e in evictions)
        )

    async def _prefetch(self, p: Prefetch, ref: common_pb2.AdapterRef) -> None:
        handle = self._pool.get(p.worker_id)
        if handle is None:
            return
        async with self._gate:
            try:
                resp = await worker_pb2_grpc.WorkerServiceStub(handle.channel).PrefetchAdapter(
                    worker_pb2.PrefetchAdapterRequest(adapter=ref, tier=common_pb2.ADAPTER_TIER_DEVICE),
                    timeout=CALL_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as exc:
                metrics.KEEP_WARM_PREFETCHES.labels(exc.code().name).inc()
                log.warning(
                    "keep-warm prefetch of %s (%s@%d) on worker %s failed: %s %s",
                    p.digest,
                    ref.name,
                    ref.version,
                    p.worker_id,
                    exc.code().name,
                    exc.details(),
                )
                return
        metrics.KEEP_WARM_PREFETCHES.labels("ok").inc()
        log.info(
            "keep-warm: prefetching %s@%d (%s) onto worker %s (it was %s)",
            ref.name,
            ref.version,
            p.digest,
            p.worker_id,
            common_pb2.AdapterTier.Name(resp.current_tier),
        )

    async def _evict(self, e: Eviction) -> None:
        handle = self._pool.get(e.worker_id)
        if handle is None:
            return
        async with self._gate:
            try:
                resp = await worker_pb2_grpc.WorkerServiceStub(handle.channel).EvictAdapter(
                    worker_pb2.EvictAdapterRequest(digest=e.digest), timeout=CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                metrics.EVICTION_HINTS.labels(exc.code().name).inc()
                log.warning(
                    "eviction hint for archived %s to worker %s failed: %s %s",
                    e.digest,
                    e.worker_id,
                    exc.code().name,
                    exc.details(),
                )
                return
        metrics.EVICTION_HINTS.labels("evicted" if resp.evicted else "kept").inc()
        log.info(
            "archived adapter %s %s on worker %s",
            e.digest,
            "evicted" if resp.evicted else "kept (in use)",
            e.worker_id,
        )
