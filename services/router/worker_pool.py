"""The workers this router can send requests to: one channel and one state stream each.

Membership comes two ways:
- Static: LORAPLEX_WORKERS addresses, identified by their GetInfo (worker id, base model).
- Discovered: the registry's ListWorkers (workers whose heartbeat is recent), every refresh_s and
  at once when a state stream fails (a worker that died or left is found out promptly).

What a worker holds and how busy it is comes from its WorkerService.WatchState stream, one task per
worker (`_watch`): a snapshot, then deltas and heartbeats, folded in by `worker_state.PushedState`.
A worker is routable only while its stream is synced, its last message is at most `stale_s` old
and it says it is accepting: a SIGKILLed worker's stream breaks at once, a hung one goes silent,
and either way it is out of routing before the registry's TTL would notice. It is back as soon as a
fresh snapshot arrives. A worker that fails a call with UNAVAILABLE also sits out a short cool-down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from loraplex.v1 import registry_pb2, registry_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.tls import TlsFiles, aio_channel
from services.router import metrics
from services.router.policy import WorkerView
from services.router.worker_state import PushedState, StateOutOfSync

log = logging.getLogger(__name__)

GENERATE_METHOD = "/loraplex.v1.WorkerService/Generate"
PROBE_TIMEOUT_S = 2.0
COOL_DOWN_S = 1.0
# Workers that left the pool keep their channel this long so streams in flight can finish.
CLOSE_GRACE_S = 300.0
# Re-opening a failed state stream: quick at first (a restarted worker is back at once), then
# backing off so a dead address costs one attempt a second.
WATCH_BACKOFF_MIN_S = 0.05
WATCH_BACKOFF_MAX_S = 1.0
# Refreshes triggered by failing streams come at most this often.
MIN_REFRESH_GAP_S = 0.1


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
    state: PushedState = field(init=False)
    watch: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.state = PushedState(self.worker_id)

    def view(self, now: float, stale_s: float) -> WorkerView:
        s = self.state
        return WorkerView(
            worker_id=self.worker_id,
            base_model=self.base_model,
            load=s.load(self.in_flight),
            accepting=now >= self.down_until and s.routable(now, stale_s),
            residency=s.residency,
            loading=s.loading,
            kv_fraction=s.kv_fraction,
        )

    def dispatched(self) -> int:
        """A request was sent here; pass the returned token to `finished` when it ends."""
        self.in_flight += 1
        return self.state.note_dispatched()

    def finished(self, token: int) -> None:
        self.in_flight -= 1
        self.state.note_finished(token)


def open_worker_channel(
    address: str, tls: TlsFiles | None
) -> tuple[grpc.aio.Channel, grpc.aio.UnaryStreamMultiCallable]:
    """A channel to a worker with the router's identity (a worker serves only router certificates)."""
    channel = aio_channel(
        address,
        tls,
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.max_receive_message_length", 8 << 20),
            # gRPC's default reconnect backoff grows to minutes; a restarted worker should be
            # reachable again within a second.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
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
        tls: TlsFiles | None = None,
        refresh_s: float = 1.0,
        stale_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._static = tuple(static_addresses)
        self._registry = (
            registry_pb2_grpc.AdapterRegistryServiceStub(registry_channel) if registry_channel else None
        )
        self._tls = tls
        self._refresh_s = refresh_s
        self.stale_s = stale_s
        self._clock = clock
        self._by_id: dict[str, WorkerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        # Set whenever a worker's stream (re)syncs; waiters clear it.
        self._synced = asyncio.Event()
        self.changed = asyncio.Event()
        # Called with a base model when one of its workers becomes routable (first snapshot after
        # joining or after its stream broke): the cold queue dispatches that model's held requests.
        self.on_routable: Callable[[str], object] | None = None
        # Base models the live-workers gauge has a series for (reset to 0 when the last one goes).
        self._gauged_models: set[str] = set()

    # -- what the router reads per request ---------------------------------------------------

    def views(self) -> list[WorkerView]:
        now = self._clock()
        views = [h.view(now, self.stale_s) for h in self._by_id.values()]
        live: dict[str, int] = dict.fromkeys(self._gauged_models, 0)
        for v in views:
            live[v.base_model] = live.get(v.base_model, 0) + int(v.accepting)
        for model, n in live.items():
            metrics.LIVE_WORKERS.labels(model).set(n)
        self._gauged_models = set(live)
        return views

    def live_count(self, base_model: str) -> int:
        """Workers of `base_model` in routing now."""
        return sum(1 for v in self.views() if v.accepting and v.base_model == base_model)

    def live_ids(self) -> set[str]:
        return {v.worker_id for v in self.views() if v.accepting}

    def get(self, worker_id: str) -> WorkerHandle | None:
        return self._by_id.get(worker_id)

    def handles(self) -> list[WorkerHandle]:
        return list(self._by_id.values())

    def mark_down(self, handle: WorkerHandle, seconds: float = COOL_DOWN_S) -> None:
        handle.down_until = self._clock() + seconds

    async def wait_synced(self, timeout_s: float) -> bool:
        """Waits until every known worker has sent its snapshot (or the time is up)."""
        deadline = self._clock() + timeout_s
        while not all(h.state.synced for h in self._by_id.values()):
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            self._synced.clear()
            try:
                await asyncio.wait_for(self._synced.wait(), remaining)
            except TimeoutError:
                return False
        return True

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
                    registry_pb2.ListWorkersRequest(), timeout=PROBE_TIMEOUT_S
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
                if handle.watch is not None:
                    handle.watch.cancel()
                self._close_later(handle)
                log.info("worker %s (%s) left the pool", worker_id, handle.address)
                changed = True
        for worker_id, (address, base_model, static) in found.items():
            if worker_id in self._by_id:
                continue
            channel, generate = open_worker_channel(address, self._tls)
            handle = WorkerHandle(worker_id, address, base_model, channel, generate, static)
            handle.watch = asyncio.get_running_loop().create_task(
                self._watch(handle), name=f"watch-state-{worker_id}"
            )
            self._by_id[worker_id] = handle
            log.info("worker %s (%s, %s) joined the pool", worker_id, address, base_model)
            changed = True
        if changed:
            self.changed.set()

    def _find_by_address(self, address: str) -> WorkerHandle | None:
        return next((h for h in self._by_id.values() if h.address == address), None)

    async def _probe(self, address: str) -> worker_pb2.GetInfoResponse | None:
        known = self._find_by_address(address)
        channel = known.channel if known is not None else aio_channel(address, self._tls)
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

    # -- pushed state ------------------------------------------------------------------------

    async def _watch(self, handle: WorkerHandle) -> None:
        """Runs until cancelled: keeps `handle.state` in step with the worker's WatchState stream."""
        stub = worker_pb2_grpc.WorkerServiceStub(handle.channel)
        backoff = WATCH_BACKOFF_MIN_S
        while True:
            call = stub.WatchState(worker_pb2.WatchStateRequest())
            reason = "broken"
            detail = ""
            try:
                while True:
                    try:
                        # Silence past stale_s: the worker is out of routing (views() sees that on
                        # its own); re-subscribing proves whether it still answers.
                        msg = await asyncio.wait_for(call.read(), self.stale_s)
                    except TimeoutError:
                        reason = "stale"
                        detail = f"nothing for {self.stale_s:g}s"
                        break
                    if msg is grpc.aio.EOF:
                        reason = "ended"
                        detail = "the worker ended the stream (draining?)"
                        break
                    was_synced = handle.state.synced
                    handle.state.apply(msg, self._clock())
                    if not was_synced:
                        log.info("worker %s (%s) sent its state: routable", handle.worker_id, handle.address)
                        backoff = WATCH_BACKOFF_MIN_S
                        handle.down_until = 0.0  # a fresh snapshot proves it answers again
                        self._synced.set()
                        self.changed.set()
                        if self.on_routable is not None and handle.state.accepting:
                            self.on_routable(handle.base_model)
            except StateOutOfSync as exc:
                reason, detail = "out_of_sync", str(exc)
            except grpc.aio.AioRpcError as exc:
                reason, detail = "broken", f"{exc.code().name}: {exc.details()}"
            except Exception as exc:
                # A bug or an unexpected message must not end the watch: the worker would stay
                # out of routing for good, since the pool keeps its handle.
                log.exception("worker %s state stream failed unexpectedly", handle.worker_id)
                reason, detail = "error", repr(exc)
            finally:
                call.cancel()
            if handle.state.synced:
                log.warning("worker %s (%s) is out of routing: %s", handle.worker_id, handle.address, detail)
                self.changed.set()
            else:
                log.debug("worker %s (%s) state stream: %s", handle.worker_id, handle.address, detail)
            handle.state.disconnect()
            metrics.STATE_RECONNECTS.labels(reason).inc()
            self._wake.set()  # the worker may have left the registry or restarted under a new id
            await asyncio.sleep(backoff)
            backoff = min(WATCH_BACKOFF_MAX_S, backoff * 2)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs until cancelled: refreshes membership every refresh_s, sooner when a stream fails."""
        while True:
            self._wake.clear()  # a stream failing from here on asks for the next round
            try:
                await self.refresh()
            except Exception:
                log.exception("worker pool refresh failed")
            self.views()  # keeps the live-workers gauge current without traffic
            await asyncio.sleep(MIN_REFRESH_GAP_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(self._refresh_s - MIN_REFRESH_GAP_S, 0.0))

    async def close(self) -> None:
        handles = list(self._by_id.values())
        self._by_id.clear()
        self.views()  # a closed pool routes to no worker: its live-workers series drop to 0
        watches = [h.watch for h in handles if h.watch is not None]
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        await asyncio.gather(*(h.channel.close() for h in handles), *self._closing, return_exceptions=True)
