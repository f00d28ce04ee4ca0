"""The adapter loader: asks the tier policy for a plan and carries it out.

`TierPolicy` (services/worker/tiers) decides everything: which tier an adapter must reach, which
adapters leave which tier to make room, what is pinned. It commits its bookkeeping the moment it
plans; the bytes follow. So every physical step for one adapter (an eviction, a load) runs in a
per-digest chain, in the order the policy planned them, and a plan's evictions run in order,
before its loads. A load ends with `on_loaded` (or `on_failed`) only once the bytes are there,
so the policy never calls a copy complete before it is.

Steps, each on its own threads so they overlap with decoding and with each other:
    OBJECT_STORE -> DISK   fetch on the download threads (bounded store timeouts), hashed as it
                           arrives; when the plan goes on, into memory: the next step parses those
                           bytes while one writer thread puts the disk copy behind it
                           (fetch.write_to_cache), so a cold load never waits for the disk
    DISK -> HOST/DEVICE    verify (once per process, on a download thread), then parse +
                           engine.prepare_adapter on the parse threads
    HOST -> DEVICE         engine.to_engine_device (one copy), then install between two steps
    DEVICE -> HOST         remove between two steps, engine.to_host (keeps the device layout)
Concurrent requests for one adapter share one load (the plan's `awaiting`); a load starts when the
request arrives, before engine admission.

Every adapter counts with one size in every tier: the file bytes of its AdapterRef (`size_bytes`),
or of its fetched files when the reference carries none (the fetch then runs before planning).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from services.common.adapter_files import ADAPTER_FILES, digest_hex
from services.common.object_store import AllowedSources
from services.worker import metrics
from services.worker.adapters.disk_tier import DiskTier
from services.worker.adapters.fetch import (
    FetchedAdapter,
    fetch_to_cache,
    fetch_to_memory,
    s3_client,
    write_to_cache,
)
from services.worker.adapters.host_tier import HostTier
from services.worker.adapters.spec import (
    AdaptersBusy,
    AdapterSpec,
    AdapterTooLarge,
    AdapterUnreadable,
    BaseModelMismatch,
)
from services.worker.async_engine import AsyncEngine
from services.worker.engine.adapter_slots import DeviceAdapter
from services.worker.engine.adapter_weights import (
    AdapterWeights,
    adapter_weights_from_bytes,
    load_adapter_weights,
)
from services.worker.tiers import Eviction, Plan, Tier, TierBudgets, TierPolicy
from services.worker.tiers.states import IN_PROGRESS

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

T = TypeVar("T")
# Fetched bytes waiting for the disk writer, at most: past this, cold fetches stream to disk.
WRITE_BEHIND_MAX_BYTES = 1 << 30

# The longest a request waits for room on the device before it is shed (its deadline may be sooner).
ADMIT_WAIT_S = 10.0
DOWNLOAD_THREADS = 8  # one hung object-store fetch holds one thread, never the others' loads
PARSE_THREADS = 2


def tier_label(tier: Tier) -> str:
    return tier.name.lower()


@dataclass(frozen=True)
class HeldAdapter:
    """One adapter the worker holds, at its fastest complete tier (what WatchState reports)."""

    digest: str
    adapter_id: str
    tier: Tier
    size_bytes: int
    last_used_at: float  # wall clock seconds
    in_flight: int
    pinned: bool  # in use or keep_warm


@dataclass
class LoadEstimate:
    """Exponentially weighted typical time to bring an adapter onto the device from one tier."""

    ms: float = 0.0
    samples: int = 0

    def observe(self, ms: float, weight: float = 0.2) -> None:
        self.ms = ms if self.samples == 0 else (1 - weight) * self.ms + weight * ms
        self.samples += 1


@dataclass
class Lease:
    """A request's pin on an on-device adapter; `release` it when the request ends."""

    digest: str
    source_tier: Tier  # the fastest complete copy when the request asked
    load_ms: float  # time the request waited for the adapter
    released: bool = False

    @property
    def cold_start(self) -> bool:
        return self.source_tier != Tier.DEVICE


class AdapterLoader:
    def __init__(
        self,
        engine: AsyncEngine,
        cache_dir: Path,
        *,
        base_model: str,
        dtype: torch.dtype,
        budgets: TierBudgets,
        idle_ttl_s: float,
        max_adapter_bytes: int,
        object_store_timeout_s: float = 20.0,
        sources: AllowedSources | None = None,
        clock: Callable[[], float] = time.monotonic,
        expire_every_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.cache_dir = cache_dir
        self.base_model = base_model
        self.dtype = dtype
        self.max_adapter_bytes = max_adapter_bytes
        self.object_store_timeout_s = object_store_timeout_s
        # None: any location (tests of the loader alone); the worker passes the registry's allow-list.
        self.sources = sources
        self.clock = clock
        self.admit_wait_s = ADMIT_WAIT_S  # the longest a request waits for room before it is shed
        self.policy = TierPolicy(budgets, idle_ttl_s, clock)
        self.disk = DiskTier(cache_dir)
        # Digests whose disk copy this process hashed (or fetched and hashed) already.
        self._verified: set[str] = set()
        self.host = HostTier()
        self.estimates: dict[Tier, LoadEstimate] = {
            t: LoadEstimate() for t in (Tier.HOST, Tier.DISK, Tier.OBJECT_STORE)
        }
        self.expire_every_s = expire_every_s if expire_every_s is not None else min(5.0, idle_ttl_s / 4)
        self._downloads = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="adapter-fetch")
        self._parsing = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="adapter-parse")
        # Disk-cache writes behind cold loads: one thread, so they queue on the disk, not on us.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="adapter-write")
        self._fetched: dict[str, FetchedAdapter] = {}  # cold bytes between a plan's two steps
        self._writes: dict[str, asyncio.Future[Path]] = {}  # disk copies being written behind
        self._write_behind_bytes = 0  # held in memory for them (bounded by WRITE_BEHIND_MAX_BYTES)
        self._s3: S3Client | None = None
        self._tails: dict[str, asyncio.Task[Any]] = {}  # last physical step queued per digest
        self._loads: dict[str, asyncio.Task[Tier]] = {}  # the running plan's loads per digest
        self._sizing: dict[str, asyncio.Task[int]] = {}  # fetches run to learn an adapter's size
        self._adapter_ids: dict[str, str] = {}
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Future[Any]] = set()  # prefetches and the idle loop
        self._expire_task: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Take over the disk cache an earlier run left (within budget) and start idle expiry."""
        budget = self.policy.budgets.disk_bytes
        used = 0
        for entry in await asyncio.to_thread(self.disk.scan):  # newest first: the oldest go
            if entry.size_bytes <= 0 or used + entry.size_bytes > budget:
                log.info("disk cache: removing %s (over the disk budget of %d bytes)", entry.digest, budget)
                await asyncio.to_thread(self.disk.delete, entry.digest)
                continue
            self.policy.access(entry.digest, entry.size_bytes, target=Tier.DISK, pin=False)
            self.policy.on_loaded(entry.digest, Tier.DISK)
            used += entry.size_bytes
        self._expire_task = self._spawn(self._expire_loop())

    async def settle(self) -> None:
        """Wait until no prefetch and no planned step is running (for tests and benchmarks)."""
        while True:
            busy = [
                t
                for t in (*self._tasks, *self._tails.values(), *self._writes.values())
                if t is not self._expire_task and not t.done()
            ]
            if not busy:
                return
            await asyncio.wait(busy)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._downloads.shutdown(wait=False, cancel_futures=True)
        self._parsing.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=False, cancel_futures=True)  # a staging dir left is swept at start

    # ------------------------------------------------------------------ requests

    async def acquire(self, spec: AdapterSpec, wait_s: float | None = None) -> Lease:
        """Have the adapter on the device and pinned until `release`.

        AdaptersBusy when the device stays full of adapters that requests hold for `wait_s`
        (at most `admit_wait_s`).
        """
        started = time.monotonic()
        wait_s = self.admit_wait_s if wait_s is None else min(wait_s, self.admit_wait_s)
        size = await self._prepare_request(spec)
        try:
            plan = await self._admit(spec, size, Tier.DEVICE, pin=True, until=started + wait_s)
        except Exception:
            await self._drop_unaccounted(spec.digest)
            raise
        metrics.ADAPTER_LOOKUPS.labels(result="hit" if plan.hit else "miss").inc()
        metrics.ADAPTER_LOOKUPS_BY_TIER.labels(tier=tier_label(plan.found_in)).inc()
        if plan.hit and plan.awaiting is None:
            return Lease(spec.digest, Tier.DEVICE, 0.0)
        try:
            source = await self._carry_out(spec, plan)
        except BaseException:
            self._unpin(spec.digest)
            raise
        return Lease(spec.digest, source, (time.monotonic() - started) * 1000)

    def release(self, lease: Lease) -> None:
        if not lease.released:
            lease.released = True
            self._unpin(lease.digest)

    def prefetch(self, spec: AdapterSpec, target: Tier) -> Tier:
        """Start loading toward `target` (DEVICE, HOST or DISK) unpinned; returns the tier before.

        The load runs in the background; a failure is logged.
        """
        self._check(spec)
        before = self.policy.tier_of(spec.digest)
        self._spawn(self._prefetch(spec, target), failure=f"prefetch of adapter {spec.name}")
        return before

    async def evict(self, digest: str) -> bool:
        """Drop the adapter from DEVICE and HOST (its disk copy stays) and stop keeping it warm;
        False while a request holds it or it is being loaded.

        An explicit eviction overrides keep_warm: the router sends one when the adapter is archived,
        and a later request or prefetch carrying keep_warm=true sets it again."""
        digest_hex(digest)
        self.policy.set_keep_warm(digest, False)
        evictions = self.policy.evict(digest)
        if evictions is None:
            return False
        await self._run_evictions(evictions)
        self._notify()
        return True

    async def expire_idle(self) -> None:
        """Scale to zero: carry out the policy's evictions of adapters idle past the TTL."""
        evictions = self.policy.expire_idle()
        if evictions:
            log.info("%d idle adapter(s) leave the device", sum(e.src == Tier.DEVICE for e in evictions))
            await self._run_evictions(evictions)
            self._notify()

    def current_tier(self, digest: str) -> Tier:
        return self.policy.tier_of(digest)

    # ------------------------------------------------------------------ state

    def view(self) -> tuple[list[HeldAdapter], list[str]]:
        """Adapters at their fastest complete tier, and the digests being loaded."""
        now_wall, now = time.time(), self.clock()
        held: list[HeldAdapter] = []
        loading: list[str] = []
        for row in self.policy.snapshot():
            if row.state in IN_PROGRESS:
                loading.append(row.digest)
            tier = self.policy.tier_of(row.digest)
            if tier == Tier.OBJECT_STORE:
                continue  # only being loaded, or a failed load still held by a request
            held.append(
                HeldAdapter(
                    digest=row.digest,
                    adapter_id=self._adapter_ids.get(row.digest, ""),
                    tier=tier,
                    size_bytes=row.size_bytes,
                    last_used_at=now_wall - max(now - row.last_used, 0.0),
                    in_flight=row.in_flight,
                    pinned=row.pinned or row.keep_warm,
                )
            )
        return held, loading

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held or reserved per budgeted tier (DISK is inclusive of the faster tiers)."""
        return {tier_label(t): self.policy.resident_bytes(t) for t in (Tier.DEVICE, Tier.HOST, Tier.DISK)}

    # ------------------------------------------------------------------ planning

    def _check(self, spec: AdapterSpec) -> None:
        digest_hex(spec.digest)  # ValueError for a malformed digest, before any I/O
        if self.sources is not None:
            # Only the registry's store and allowed buckets: a reference naming anything else (another
            # bucket, a local file) is refused before anything is fetched or counted.
            self.sources.check(spec.uri, reader="worker")
        if spec.base_model and spec.base_model != self.base_model:
            raise BaseModelMismatch(
                f"adapter {spec.name} was trained for base model {spec.base_model!r}, "
                f"but this worker serves {self.base_model!r}; route it to a {spec.base_model} worker"
            )

    async def _prepare_request(self, spec: AdapterSpec) -> int:
        self._check(spec)
        if spec.adapter_id:
            self._adapter_ids[spec.digest] = spec.adapter_id
        self.policy.set_keep_warm(spec.digest, spec.keep_warm)
        return await self._size_of(spec)

    async def _size_of(self, spec: AdapterSpec) -> int:
        known = self.policy.known_size(spec.digest)
        if known is not None:
            return known
        if spec.size_bytes > 0:
            return spec.size_bytes
        task = self._sizing.get(spec.digest)
        if task is None:
            # Two stat calls: done inline, so concurrent requests cannot both miss the task below.
            on_disk = self.disk.size(spec.digest)
            if on_disk:
                return on_disk
            # No size anywhere: fetch first (verified, into the cache dir) and count what arrived.
            task = asyncio.create_task(self._fetch_for_size(spec))
            self._sizing[spec.digest] = task
            task.add_done_callback(lambda t: self._sizing.pop(spec.digest, None))
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _fetch_for_size(self, spec: AdapterSpec) -> int:
        await self._fetch(spec)
        return await asyncio.to_thread(self.disk.size, spec.digest)

    async def _drop_unaccounted(self, digest: str) -> None:
        """A copy fetched only to learn its size, for a request that was then refused, is outside
        the disk budget: delete it (no row in the policy means no plan is using it)."""
        if self.policy.known_size(digest) is None and digest not in self._sizing:
            self._verified.discard(digest)
            await asyncio.to_thread(self.disk.delete, digest)

    async def _admit(self, spec: AdapterSpec, size: int, target: Tier, *, pin: bool, until: float) -> Plan:
        """policy.access, retried while the tiers are full of pinned or loading adapters."""
        self._check_fits(spec, size, target)
        while True:
            plan = self.policy.access(spec.digest, size, target=target, pin=pin)
            if plan.admitted:
                return plan
            remaining = until - time.monotonic()
            if remaining <= 0:
                raise AdaptersBusy(
                    f"adapter {spec.name} cannot be loaded now: {plan.reason}; retry shortly or on "
                    f"another worker"
                )
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    def _check_fits(self, spec: AdapterSpec, size: int, target: Tier) -> None:
        """An adapter larger than a whole tier it must pass through can never load: say so now."""
        found = self.policy.tier_of(spec.digest)
        if found <= target:
            return
        needed = [target] + ([Tier.DISK] if found == Tier.OBJECT_STORE and target != Tier.DISK else [])
        for tier in needed:
            budget = self.policy.budgets.of(tier)
            if size > budget:
                raise AdapterTooLarge(
                    f"adapter {spec.name} is {size} bytes, more than this worker's whole {tier.name} "
                    f"budget of {budget} bytes; raise LORAPLEX_{tier.name}_ADAPTER_BYTES or serve it "
                    f"on another worker"
                )

    def _unpin(self, digest: str) -> None:
        self.policy.unpin(digest)
        self._notify()

    def _notify(self) -> None:
        """Wake requests waiting for room: a pin was released, a load ended or an eviction ran."""
        self._changed.set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ carrying out plans

    async def _carry_out(self, spec: AdapterSpec, plan: Plan) -> Tier:
        """Run the plan's evictions and loads, or wait for the load another request started."""
        if plan.loads:
            after = self._queue_evictions(plan.evictions)
            task = self._queue(spec.digest, lambda: self._run_loads(spec, plan), after)
            self._loads[spec.digest] = task
            return await asyncio.shield(task)
        if plan.awaiting is not None:
            running = self._loads.get(spec.digest)
            if running is not None:
                # The shared load's source, when its copy had gone missing and it came from further.
                return max(plan.found_in, await asyncio.shield(running))
        return plan.found_in

    async def _prefetch(self, spec: AdapterSpec, target: Tier) -> None:
        size = await self._prepare_request(spec)
        try:
            until = time.monotonic() + self.admit_wait_s
            plan = await self._admit(spec, size, target, pin=False, until=until)
        except Exception:
            await self._drop_unaccounted(spec.digest)
            raise
        await self._carry_out(spec, plan)

    def _queue(
        self, digest: str, step: Callable[[], Awaitable[T]], after: asyncio.Task[Any] | None = None
    ) -> asyncio.Task[T]:
        """Run `step` after every step queued for `digest` so far (and after `after`)."""
        before = self._tails.get(digest)

        async def run() -> T:
            for dep in (before, after):
                if dep is not None and not dep.done():
                    await asyncio.wait([dep])
            return await step()

        task = asyncio.create_task(run())
        self._tails[digest] = task

        def done(t: asyncio.Task[T]) -> None:
            if self._tails.get(digest) is t:
                del self._tails[digest]
            _retrieve(t)

        task.add_done_callback(done)
        return task

    def _queue_evictions(self, evictions: tuple[Eviction, ...] | list[Eviction]) -> asyncio.Task[Any] | None:
        last: asyncio.Task[Any] | None = None
        for ev in evictions:
            last = self._queue(ev.digest, functools.partial(self._evict_one, ev), last)
        return last

    async def _run_evictions(self, evictions: list[Eviction]) -> None:
        last = self._queue_evictions(evictions)
        if last is not None:
            await asyncio.wait([last])

    async def _evict_one(self, ev: Eviction) -> None:
        digest = ev.digest
        try:
            if ev.src == Tier.DEVICE:
                adapter = await self.engine.call(lambda e: e.remove_adapter(digest))
                if ev.dst == Tier.HOST:
                    self.host.put(await self._in(self._parsing, self.engine.engine.to_host, adapter))
            elif ev.src == Tier.HOST:
                self.host.drop(digest)
            elif ev.src == Tier.DISK:
                await self._written(digest)
                self._verified.discard(digest)
                await self._in(self._parsing, self.disk.delete, digest)
            metrics.ADAPTER_EVICTIONS.labels(
                tier=tier_label(ev.src), to=tier_label(ev.dst) if ev.dst else "none"
            ).inc()
            log.info("adapter %s left %s%s", digest, ev.src.name, f" for {ev.dst.name}" if ev.dst else "")
        except Exception:
            # The policy already counts it gone; a later load falls back to a slower copy.
            log.exception("evicting adapter %s from %s failed", digest, ev.src.name)

    async def _run_loads(self, spec: AdapterSpec, plan: Plan) -> Tier:
        digest = spec.digest
        started = time.monotonic()
        source = plan.found_in
        steps: list[str] = []
        try:
            for i, load in enumerate(plan.loads):
                step_started = time.monotonic()
                got = await self._load_step(spec, load.src, load.dst, then=i + 1 < len(plan.loads))
                source = max(source, got)  # a copy gone missing means a slower source
                self.policy.on_loaded(digest, load.dst)
                steps.append(f"{load.dst.name.lower()} {(time.monotonic() - step_started) * 1000:.1f}")
        except BaseException as exc:
            self.policy.on_failed(digest)
            log.warning("adapter %s failed to load toward %s: %s", digest, plan.loads[-1].dst.name, exc)
            raise
        finally:
            self._fetched.pop(digest, None)
            if self._loads.get(digest) is asyncio.current_task():
                del self._loads[digest]
            self._notify()
        load_ms = (time.monotonic() - started) * 1000
        if plan.loads[-1].dst == Tier.DEVICE:
            self.estimates[source].observe(load_ms)
            metrics.ADAPTER_LOADS.labels(tier=tier_label(source)).inc()
            metrics.ADAPTER_LOAD_SECONDS.labels(tier=tier_label(source)).observe(load_ms / 1000)
        log.info(
            "adapter %s in %s from %s in %.1f ms (%s ms)",
            digest,
            plan.loads[-1].dst.name,
            source.name,
            load_ms,
            ", ".join(steps),
        )
        return source

    async def _load_step(self, spec: AdapterSpec, src: Tier, dst: Tier, *, then: bool = False) -> Tier:
        """One step of a plan; returns where the bytes really came from. `then`: another step of
        the same plan follows (so a cold fetch keeps its bytes for it and writes the disk copy
        behind)."""
        if dst == Tier.DISK:
            if src == Tier.OBJECT_STORE and then:
                return await self._fetch_write_behind(spec)
            got, _ = await self._fetch(spec)
            return max(src, got)
        prepared: DeviceAdapter | None = self.host.take(spec.digest) if src == Tier.HOST else None
        got = src
        if prepared is None:
            got, prepared = await self._prepare_from_disk(spec)
            got = max(src, got)
        if dst == Tier.HOST:
            self.host.put(prepared)
            return got
        try:
            on_device = await self._in(self._parsing, self.engine.engine.to_engine_device, prepared)
            await self.engine.call(lambda e: e.install_adapter(on_device))
        except BaseException:
            if src == Tier.HOST:
                self.host.put(prepared)  # the policy still counts the host copy
            raise
        return got

    async def _fetch_write_behind(self, spec: AdapterSpec) -> Tier:
        """A cold fetch into memory (verified) for the plan's next step; the disk copy follows."""
        await self._written(spec.digest)
        if self.disk.path(spec.digest).is_dir():
            got, _ = await self._fetch(spec)
            return got
        size = self.policy.known_size(spec.digest) or spec.size_bytes
        if self._write_behind_bytes + size > WRITE_BEHIND_MAX_BYTES:
            # The disk is behind: stream this one straight to disk rather than hold more in memory.
            got, _ = await self._fetch(spec)
            return got
        s3 = self._s3_client() if spec.uri.startswith("s3://") else None
        fetched = await self._in(
            self._downloads, fetch_to_memory, spec, max_bytes=self._read_limit(spec), s3=s3
        )
        self._fetched[spec.digest] = fetched
        self._write_behind_bytes += fetched.size_bytes
        write = asyncio.get_running_loop().run_in_executor(
            self._writer, write_to_cache, fetched, self.cache_dir, self._verified
        )
        self._writes[spec.digest] = write

        def written(f: asyncio.Future[Path]) -> None:
            self._write_behind_bytes -= fetched.size_bytes
            if self._writes.get(spec.digest) is f:
                del self._writes[spec.digest]
            if not f.cancelled() and f.exception() is not None:
                # The policy counts a disk copy that is not there; the next load fetches again.
                log.warning("writing adapter %s to the disk cache failed: %s", spec.digest, f.exception())

        write.add_done_callback(written)
        return Tier.OBJECT_STORE

    async def _written(self, digest: str) -> None:
        """Wait for a disk copy being written behind (its failure is logged, not raised here)."""
        write = self._writes.get(digest)
        if write is not None:
            await asyncio.wait([write])

    async def _fetch(self, spec: AdapterSpec) -> tuple[Tier, Path]:
        await self._written(spec.digest)
        s3 = self._s3_client() if spec.uri.startswith("s3://") else None
        return await self._in(
            self._downloads,
            fetch_to_cache,
            spec,
            self.cache_dir,
            max_bytes=self._read_limit(spec),
            s3=s3,
            verified=self._verified,
        )

    def _read_limit(self, spec: AdapterSpec) -> int:
        """The most bytes a fetch may read: the registry's size for the reference, within the cap."""
        if spec.size_bytes > 0:
            return min(spec.size_bytes, self.max_adapter_bytes)
        return self.max_adapter_bytes

    async def _prepare_from_disk(self, spec: AdapterSpec) -> tuple[Tier, DeviceAdapter]:
        """Verified files (fetched again if the copy vanished) -> the device layout in host memory.

        Right after a cold fetch the files are still in memory: parsed from there."""
        fetched = self._fetched.pop(spec.digest, None)
        if fetched is not None:
            return Tier.DISK, await self._in(self._parsing, self._parse_bytes_and_prepare, spec, fetched)
        got, path = await self._fetch(spec)
        prepared = await self._in(self._parsing, self._parse_and_prepare, spec, path)
        return got, prepared

    def _parse_and_prepare(self, spec: AdapterSpec, path: Path) -> DeviceAdapter:
        weights = _parse(spec, lambda: load_adapter_weights(path, spec.digest, self.dtype))
        return self.engine.engine.prepare_adapter(weights)

    def _parse_bytes_and_prepare(self, spec: AdapterSpec, fetched: FetchedAdapter) -> DeviceAdapter:
        config, weights = (fetched.files[name] for name in ADAPTER_FILES)
        parsed = _parse(spec, lambda: adapter_weights_from_bytes(config, weights, spec.digest, self.dtype))
        return self.engine.engine.prepare_adapter(parsed)

    def _s3_client(self) -> S3Client:
        if self._s3 is None:  # built on the event loop: boto3 sessions are not thread-safe
            self._s3 = s3_client(self.object_store_timeout_s)
        return self._s3

    async def _in(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, lambda: fn(*args, **kwargs))

    # ------------------------------------------------------------------ background

    def _spawn(self, work: Awaitable[None], failure: str = "") -> asyncio.Future[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("%s failed: %s", failure or "adapter background task", t.exception())

        task.add_done_callback(done)
        return task

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.expire_every_s)
            try:
                await self.expire_idle()
                self._forget_ids()
            except Exception:
                log.exception("idle adapter expiry failed; retrying")

    def _forget_ids(self) -> None:
        """Adapter ids of adapters the policy no longer holds (keeps the map bounded)."""
        for digest in [d for d in self._adapter_ids if self.policy.known_size(d) is None]:
            del self._adapter_ids[digest]


def _parse(spec: AdapterSpec, read: Callable[[], AdapterWeights]) -> AdapterWeights:
    try:
        return read()
    except Exception as exc:  # safetensors, JSON and format errors alike: the files are unusable
        raise AdapterUnreadable(
            f"adapter {spec.name} cannot be read: {exc}; re-register it from a PEFT save_pretrained output"
        ) from exc


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Every waiter may have gone (cancelled); mark the outcome seen so asyncio does not warn."""
    if not task.cancelled():
        task.exception()
