"""The workers this router can send requests to: one channel each, found two ways.

- Static: LORAPLEX_WORKERS addresses, identified by their GetInfo (worker id, base model).
- Discovered: the registry's ListWorkers (workers whose heartbeat is recent).

A worker that fails a call with UNAVAILABLE sits out for a short cool-down, then gets traffic again.
What the pool knows about residency is what it saw: a worker that just served an adapter has it on
its device. That feeds `policy.choose` through plain `WorkerView`s, so richer pushed state
(WorkerService.WatchState) can replace it without touching the policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from loraplex.v1 import registry_pb2, registry_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.router.policy import Residency, WorkerView

log = logging.getLogger(__name__)

GENERATE_METHOD = "/loraplex.v1.WorkerService/Generate"
PROBE_TIMEOUT_S = 2.0
COOL_DOWN_S = 1.0
# Adapters remembered per worker as recently served (a proxy for device residency).
RECENT_ADAPTERS = 64
# Workers that left the pool keep their channel this long so streams in flight can finish.
CLOSE_GRACE_S = 300.0


@dataclass(eq=False)
class WorkerHandle:
    worker_id: str
    address: str
    base_model: str
    channel: grpc.aio.Channel
    # Generate with the response left as bytes: the router forwards chunks without re-encoding.
    generate: grpc.aio.UnaryStreamMultiCallable
    static: bool = False
    in_flight: int = 0
    down_until: float = 0.0
    residency: OrderedDict[str, Residency] = field(default_factory=OrderedDict)

    def view(self, now: float) -> WorkerView:
        return WorkerView(
            worker_id=self.worker_id,
            base_model=self.base_model,
            load=self.in_flight,
            accepting=now >= self.down_until,
            residency=self.residency,
        )

    def served(self, digest: str) -> None:
        self.residency[digest] = Residency.DEVICE
        self.residency.move_to_end(digest)
        if len(self.residency) > RECENT_ADAPTERS:
            self.residency.popitem(last=False)


def open_worker_channel(address: str) -> tuple[grpc.aio.Channel, grpc.aio.UnaryStreamMultiCallable]:
    channel = grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.max_receive_message_length", 8 << 20),
        ],
    )
    generate = channel.unary_stream(
        GENERATE_METHOD,
        request_serializer=worker_pb2.WorkerServiceGenerateRequest.SerializeToString,
        response_deserializer=None,
    )
    return channel, generate


class WorkerPool:
    def __init__(
        self,
        static_addresses: Sequence[str],
        *,
        registry_channel: grpc.aio.Channel | None = None,
        admin_token: str = "",
        refresh_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._static = tuple(static_addresses)
        self._registry = (
            registry_pb2_grpc.AdapterRegistryServiceStub(registry_channel) if registry_channel else None
        )
        self._md = (("authorization", f"Bearer {admin_token}"),)
        self._refresh_s = refresh_s
        self._clock = clock
        self._by_id: dict[str, WorkerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()

    # -- what the router reads per request ---------------------------------------------------

    def views(self) -> list[WorkerView]:
        now = self._clock()
        return [h.view(now) for h in self._by_id.values()]

    def get(self, worker_id: str) -> WorkerHandle | None:
        return self._by_id.get(worker_id)

    def handles(self) -> list[WorkerHandle]:
        return list(self._by_id.values())

    def mark_down(self, handle: WorkerHandle, seconds: float = COOL_DOWN_S) -> None:
        handle.down_until = self._clock() + seconds

    # -- membership --------------------------------------------------------------------------

    async def refresh(self) -> None:
        """One round of discovery: probe static addresses, ask the registry for the rest."""
        found: dict[str, tuple[str, str, bool]] = {}  # worker id -> (address, base model, static)
        probes = await asyncio.gather(*(self._probe(a) for a in self._static))
        for address, info in zip(self._static, probes, strict=True):
            if info is not None:
                found[info.worker_id] = (address, info.base_model, True)
            else:
                known = self._find_by_address(address)
                if known is not None:
                    self.mark_down(known, self._refresh_s)
                    found[known.worker_id] = (address, known.base_model, True)
        if self._registry is not None:
            try:
                resp = await self._registry.ListWorkers(
                    registry_pb2.ListWorkersRequest(), metadata=self._md, timeout=PROBE_TIMEOUT_S
                )
                for w in resp.workers:
                    found.setdefault(w.worker_id, (w.address, w.base_model, False))
            except grpc.aio.AioRpcError as exc:
                # Keep the workers we know: a registry outage must not empty the pool.
                log.warning("cannot list workers from the registry: %s %s", exc.code().name, exc.details())
                for h in self._by_id.values():
                    found.setdefault(h.worker_id, (h.address, h.base_model, h.static))
        self._apply(found)

    def _apply(self, found: dict[str, tuple[str, str, bool]]) -> None:
        changed = False
        for worker_id, handle in list(self._by_id.items()):
            entry = found.get(worker_id)
            if entry is None or entry[0] != handle.address or entry[1] != handle.base_model:
                del self._by_id[worker_id]
                self._close_later(handle)
                log.info("worker %s (%s) left the pool", worker_id, handle.address)
                changed = True
        for worker_id, (address, base_model, static) in found.items():
            if worker_id in self._by_id:
                continue
            channel, generate = open_worker_channel(address)
            self._by_id[worker_id] = WorkerHandle(worker_id, address, base_model, channel, generate, static)
            log.info("worker %s (%s, %s) joined the pool", worker_id, address, base_model)
            changed = True
        if changed:
            self.changed.set()

    def _find_by_address(self, address: str) -> WorkerHandle | None:
        return next((h for h in self._by_id.values() if h.address == address), None)

    async def _probe(self, address: str) -> worker_pb2.GetInfoResponse | None:
        known = self._find_by_address(address)
        channel = known.channel if known is not None else grpc.aio.insecure_channel(address)
        try:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            info: worker_pb2.GetInfoResponse = await stub.GetInfo(
                worker_pb2.GetInfoRequest(), timeout=PROBE_TIMEOUT_S
            )
            return info
        except grpc.aio.AioRpcError as exc:
            log.debug("worker %s did not answer GetInfo: %s", address, exc.code().name)
            return None
        finally:
            if known is None:
                await channel.close()

    def _close_later(self, handle: WorkerHandle) -> None:
        task = asyncio.get_running_loop().create_task(handle.channel.close(grace=CLOSE_GRACE_S))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def run(self) -> None:
        """Runs until cancelled: refreshes membership every refresh_s."""
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("worker pool refresh failed")
            await asyncio.sleep(self._refresh_s)

    async def close(self) -> None:
        handles = list(self._by_id.values())
        self._by_id.clear()
        await asyncio.gather(*(h.channel.close() for h in handles), *self._closing, return_exceptions=True)
