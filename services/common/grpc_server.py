"""One way to run a grpc.aio service: health, reflection, Prometheus metrics, graceful drain.

Every loraplex service calls `serve()`; SIGTERM/SIGINT flip health to NOT_SERVING, stop taking
new calls, and let in-flight streams finish within the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

# Bounded message sizes: uploads are chunked, so nothing legitimate needs more.
MAX_MESSAGE_BYTES = 8 << 20


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    service_names: Sequence[str]
    # Run first on drain: streams that never end by themselves (state and change feeds) close here,
    # so the server's grace period waits only for real work.
    before_drain: list[Callable[[], None]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def drain(self, grace_s: float) -> None:
        for close_stream in self.before_drain:
            close_stream()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        for hook in self.on_stop:
            await hook()


async def start_server(
    listen: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> RunningServer:
    """Binds `listen` (port 0 picks a free one), registers servicers, health and reflection.

    credentials: TLS (services.common.tls); None serves plaintext, which the caller has warned about.
    """
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    names = [*service_names, reflection.SERVICE_NAME, health_name]
    reflection.enable_server_reflection(names, server)
    if credentials is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {listen}: address in use or not local")
    await server.start()
    for name in ("", *service_names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on port %d", ", ".join(service_names), port)
    return RunningServer(server, health, port, service_names)


async def run_until_signalled(running: RunningServer, grace_s: float = 30.0) -> None:
    """Blocks until SIGTERM/SIGINT, then drains."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (grace %.0fs)", grace_s)
    await running.drain(grace_s)


def start_metrics(port: int | None) -> None:
    """Prometheus /metrics on `port` (None or 0: off), on loopback unless LORAPLEX_METRICS_HOST names
    another address (0.0.0.0 in a pod, so Prometheus can scrape it; NetworkPolicies limit who may)."""
    if port:
        import ipaddress
        import os

        from prometheus_client import start_http_server

        host = os.environ.get("LORAPLEX_METRICS_HOST", "127.0.0.1").strip()
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"LORAPLEX_METRICS_HOST={host!r} must be an IP address, e.g. 0.0.0.0") from None
        start_http_server(port, addr=host)
