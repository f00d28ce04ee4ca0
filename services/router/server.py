"""`loraplex router serve`: registry view, worker pool, spool, shipper and the gRPC server, wired once."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from services.common.config import RouterSettings
from services.common.grpc_server import RunningServer, run_until_signalled, start_metrics, start_server
from services.common.tls import aio_channel, public_server_credentials, warn_plaintext
from services.router import metrics
from services.router.cold_queue import ColdQueue
from services.router.http_door import OpenAIDoor, RunningHttp, start_http
from services.router.inflight import InflightJournal
from services.router.limit_gate import LimitGate
from services.router.limits import Limiter
from services.router.metering import SpoolWriter
from services.router.policy import PolicyKind
from services.router.registry_view import CHANNEL_OPTIONS, RegistryView
from services.router.request_ids import RecentRequests, remember_spooled
from services.router.servicer import SERVICE_NAME, InferenceServicer
from services.router.shipper import Shipper
from services.router.spool import Spool
from services.router.warmer import KeepWarmScheduler
from services.router.worker_pool import WorkerPool

log = logging.getLogger(__name__)

FINAL_SHIP_TIMEOUT_S = 15.0


@dataclass
class Router:
    running: RunningServer
    servicer: InferenceServicer
    registry: RegistryView
    pool: WorkerPool
    spool: Spool
    shipper: Shipper
    warmer: KeepWarmScheduler
    # The OpenAI-compatible HTTP API; None when LORAPLEX_HTTP_LISTEN is empty.
    http: RunningHttp | None = None
    # Requests held for base models with no live worker.
    cold: ColdQueue | None = None

    @property
    def port(self) -> int:
        return self.running.port


async def start_router(settings: RouterSettings, *, fsync: Callable[[int], None] = os.fsync) -> Router:
    """Starts the router and returns once it serves; the caller drains `router.running`."""
    if settings.tls is None:
        warn_plaintext("the router's links to workers and the registry")
    # The router's certificate is its credential at the registry (no admin token) and at workers.
    registry_channel = aio_channel(settings.registry, settings.tls, CHANNEL_OPTIONS)
    view = RegistryView(
        registry_channel,
        auth_ttl_s=settings.auth_cache_ttl_s,
        negative_ttl_s=settings.auth_negative_ttl_s,
        stale_s=settings.auth_stale_s,
        adapter_ttl_s=settings.adapter_cache_ttl_s,
    )
    pool = WorkerPool(
        settings.workers,
        registry_channel=registry_channel if settings.discover_workers else None,
        tls=settings.tls,
        refresh_s=settings.worker_refresh_s,
        stale_s=settings.worker_stale_s,
    )
    warmer = KeepWarmScheduler(
        pool, interval_s=settings.keep_warm_s, eps=settings.route_load_eps, kv_full=settings.route_kv_full
    )
    view.add_listener(warmer.on_adapter_change)
    spool = Spool(settings.spool_dir, max_bytes=settings.spool_max_bytes, fsync=fsync)
    metrics.SPOOL_BYTES.set(spool.size_bytes)
    writer = SpoolWriter(spool)
    journal = InflightJournal(settings.spool_dir / "inflight", interval_s=settings.checkpoint_s, fsync=fsync)
    # Streams a killed predecessor left open are billed for what they had produced.
    for record in journal.recover():
        await writer.write(record)
        journal.discard(record.tenant_id, record.request_id)
        log.warning("billed request %s, left open by a previous router process", record.request_id)
    # Ids in records not yet shipped are unknown to the registry: remember them, so a replay is
    # refused before the shipper delivers them.
    recent = RecentRequests(settings.idempotency_window_s)
    remembered = await asyncio.to_thread(remember_spooled, spool, recent)
    if remembered:
        log.info("%d request ids from the spool's backlog will not run again", remembered)
    shipper = Shipper(
        spool,
        registry_channel,
        batch=settings.ship_batch,
        interval_s=settings.ship_interval_s,
    )
    limits = LimitGate(
        Limiter(settings.limit_share, concurrency_pushback_ms=settings.retry_pushback_ms),
        view.month_usage,
        lambda: shipper.confirmed_through,
        refresh_s=settings.quota_refresh_s,
    )
    cold = ColdQueue(
        settings.cold_queue,
        settings.cold_wait_s,
        on_pending=lambda model, n: metrics.PENDING.labels(model).set(n),
    )
    servicer = InferenceServicer(
        view,
        pool,
        spool,
        writer,
        journal,
        max_inflight=settings.max_inflight,
        retry_pushback_ms=settings.retry_pushback_ms,
        load_eps=settings.route_load_eps,
        kv_full=settings.route_kv_full,
        policy_kind=PolicyKind(settings.policy),
        recent=recent,
        limit_gate=limits,
        max_prompt_bytes=settings.max_prompt_bytes,
        token_timeout_s=settings.token_timeout_s,
        cold=cold,
    )
    pool.on_routable = cold.wake
    await pool.refresh()
    # Workers are routable once they have pushed their first snapshot: give the known ones a moment,
    # so the first requests do not find an empty pool.
    await pool.wait_synced(settings.worker_stale_s)
    tasks = [
        asyncio.create_task(view.watch_adapters(), name="watch-adapters"),
        asyncio.create_task(pool.run(), name="worker-pool"),
        asyncio.create_task(shipper.run(), name="usage-shipper"),
        asyncio.create_task(warmer.run(), name="keep-warm"),
    ]
    # Tenants authenticate with API keys, so the public endpoint asks for no client certificate.
    public = settings.public_tls
    credentials = None if public is None else public_server_credentials(public.cert, public.key)
    http = None
    if settings.http_listen:
        # The OpenAI-compatible door: same servicer path, same certificate, this event loop. It
        # serves before gRPC health says SERVING, so a ready router has both doors open.
        door = OpenAIDoor(servicer, view, max_prompt_bytes=settings.max_prompt_bytes)
        http = await start_http(settings.http_listen, door, public)
    try:
        running = await start_server(
            settings.listen, servicer.register, (SERVICE_NAME,), credentials=credentials
        )
    except BaseException:
        if http is not None:
            await http.stop(0.0)
        raise
    if http is not None:
        running.before_drain.append(http.begin_drain)

    async def close() -> None:
        if http is not None:
            await http.stop()  # its requests in flight finish (or are cancelled) while the pool is up
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await writer.drain()
        # One last try so a clean shutdown leaves an empty spool; whatever fails stays on disk
        # and ships after the restart.
        try:
            await asyncio.wait_for(shipper.ship_once(timeout_s=FINAL_SHIP_TIMEOUT_S), FINAL_SHIP_TIMEOUT_S)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            log.warning(
                "could not ship the last usage records (%s); %d bytes stay in %s and ship after a restart",
                type(exc).__name__,
                spool.size_bytes,
                spool.directory,
            )
        spool.close()
        await pool.close()
        await registry_channel.close()

    running.on_stop.append(close)
    return Router(running, servicer, view, pool, spool, shipper, warmer, http, cold)


async def serve(settings: RouterSettings, on_ready: Callable[[Router], None] | None = None) -> None:
    start_metrics(settings.metrics_port)
    router = await start_router(settings)
    if on_ready:
        on_ready(router)
    await run_until_signalled(router.running)
