"""Keeps this worker in the registry's membership: register once, then heartbeat until drained.

Routers discover workers through the registry's ListWorkers; a worker that stops heartbeating
(crash, drain) drops out of it after LORAPLEX_WORKER_TTL_S. A registry outage only delays
heartbeats: the loop retries with backoff and re-registers when the registry forgot the worker.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from loraplex.v1 import registry_pb2, registry_pb2_grpc
from services.common.tls import TlsFiles, aio_channel

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0
RPC_TIMEOUT_S = 5.0


class Registration:
    def __init__(self, registry: str, tls: TlsFiles | None, worker: registry_pb2.Worker) -> None:
        # The worker identity of the certificate is the credential: no token (the registry accepts
        # RegisterWorker/HeartbeatWorker from worker certificates only, for their own hosts).
        self._channel = aio_channel(registry, tls)
        self._stub = registry_pb2_grpc.AdapterRegistryServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._worker = worker
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="worker-registration")

    def leave(self) -> None:
        """Stops heartbeating: the registry drops this worker from routing after its TTL."""
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        self.leave()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self._channel.close()

    async def _register(self) -> float:
        request = registry_pb2.RegisterWorkerRequest(worker=self._worker)
        resp = await self._stub.RegisterWorker(request, metadata=self._metadata, timeout=RPC_TIMEOUT_S)
        log.info("registered %s at %s", self._worker.worker_id, self._worker.address)
        return max(resp.heartbeat_interval_ms / 1000, 0.1)

    async def _run(self) -> None:
        interval, backoff, registered = 1.0, 0.5, False
        while True:
            try:
                if not registered:
                    interval = await self._register()
                    registered = True
                else:
                    resp = await self._stub.HeartbeatWorker(
                        registry_pb2.HeartbeatWorkerRequest(worker_id=self._worker.worker_id),
                        metadata=self._metadata,
                        timeout=RPC_TIMEOUT_S,
                    )
                    registered = resp.known
                backoff = 0.5
                await asyncio.sleep(interval if registered else 0)
            except grpc.aio.AioRpcError as exc:
                log.warning("registry heartbeat failed (%s: %s); retrying", exc.code().name, exc.details())
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
