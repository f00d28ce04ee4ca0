"""`loraplex registry serve`: database, object store and the gRPC server, wired once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2

from loraplex.v1 import registry_pb2, registry_pb2_grpc, usage_pb2, usage_pb2_grpc
from services.common.config import RegistrySettings
from services.common.grpc_server import RunningServer, run_until_signalled
from services.common.identity import REGISTRY_ALLOW, start_internal_server
from services.common.object_store import open_store
from services.registry import db
from services.registry.change_feed import ChangeFeed
from services.registry.servicer import AdapterRegistryServicer
from services.registry.usage_servicer import UsageServicer

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    registry_pb2.DESCRIPTOR.services_by_name["AdapterRegistryService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
)


async def start_registry(settings: RegistrySettings) -> RunningServer:
    """Starts the registry and returns once it serves; the caller drains it."""
    url = settings.database_url
    if url is None:
        url = await asyncio.to_thread(db.start_embedded_postgres, settings.home)
        log.info("using embedded PostgreSQL under %s", settings.home / "postgres")
    await asyncio.to_thread(db.run_migrations, url)
    engine = db.create_engine(url)
    sessions = db.session_factory(engine)
    store = open_store(settings.adapter_store)
    feed = ChangeFeed()
    resources = contextlib.AsyncExitStack()
    await resources.enter_async_context(db.listen_adapter_changes(url, feed.on_notify))
    servicer = AdapterRegistryServicer(settings, sessions, store, feed)
    usage = UsageServicer(settings.admin_token, sessions, plaintext=settings.tls is None)

    def register(server: grpc.aio.Server) -> None:
        registry_pb2_grpc.add_AdapterRegistryServiceServicer_to_server(servicer, server)
        usage_pb2_grpc.add_UsageServiceServicer_to_server(usage, server)

    running = await start_internal_server(
        settings.listen, register, SERVICE_NAMES, tls=settings.tls, allow=REGISTRY_ALLOW, what="the registry"
    )
    running.before_drain.append(servicer.begin_drain)

    async def report(up: bool) -> None:
        # A registry without its database can answer nothing useful: load balancers and
        # `loraplex dev` see NOT_SERVING until PostgreSQL answers again (set() is a no-op once draining).
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await running.health.set(name, status)

    database_watch = asyncio.get_running_loop().create_task(db.watch_database(engine, report))

    async def close() -> None:
        database_watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await database_watch
        await resources.aclose()
        await engine.dispose()

    running.on_stop.append(close)
    return running


async def serve(settings: RegistrySettings, on_ready: Callable[[RunningServer], None] | None = None) -> None:
    running = await start_registry(settings)
    if on_ready:
        on_ready(running)
    await run_until_signalled(running)
