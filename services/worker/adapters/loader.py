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
An eviction whose carry-out fails (the engine refuses to remove an adapter a request still runs
on, a host copy cannot be made, a file will not delete) reconciles: the policy is told which
tiers really hold a copy (accounting.copies_of) and counts those again.
Concurrent requests for one adapter share one load (the plan's `awaiting`); a load starts when the
request arrives, before engine admission.

Every adapter counts with two sizes (tiers.AdapterSizes). DISK counts its file bytes: those of its
AdapterRef (`size_bytes`), or of its fetched files when the reference carries none (the fetch
then runs before planning). DEVICE and HOST count its bytes in the engine's layout
(sizing.planned_device_bytes: slots with the rank padded to its bucket in the engine's dtype, and
edge LoRA), learnt before a DEVICE/HOST target is planned from the safetensors header of the disk
copy, or of the object store's file by a ranged read (one small GET before a cold download). That
remote header is not verified, so once the verified bytes are prepared their real size is compared
with the planned one; a mismatch fails the load (AdapterUnreadable) and its reservations go.
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
from typing import Any, TypeVar

import torch

from services.common.adapter_errors import InvalidSafetensors
from services.common.adapter_files import digest_hex
from services.common.object_store import AllowedSources
from services.worker.adapters import telemetry
from services.worker.adapters.accounting import (
    HeldAdapter,
    LoadEstimate,
    copies_of,
    held_adapters,
    resident_bytes,
)
from services.worker.adapters.disk_tier import DiskTier
from services.worker.adapters.fetcher import Fetcher
from services.worker.adapters.host_tier import HostTier
from services.worker.adapters.planning import ADMIT_WAIT_S, check_fits, check_reference
from services.worker.adapters.preparation import prepare_from_bytes, prepare_from_files
from services.worker.adapters.sizing import planned_device_bytes
from services.worker.adapters.spec import AdaptersBusy, AdapterSpec, AdapterUnreadable
from services.worker.async_engine import AsyncEngine
from services.worker.engine.adapter_slots import DeviceAdapter
from services.worker.tiers import AdapterSizes, Eviction, Load, Plan, Tier, TierBudgets, TierPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")
PARSE_THREADS = 2


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
        # None: any location (tests of the loader alone); the worker passes the registry's allow-list.
        self.sources = sources
        self.clock = clock
        self.admit_wait_s = ADMIT_WAIT_S  # the longest a request waits for room before it is shed
        self.policy = TierPolicy(budgets, idle_ttl_s, clock)
        self.disk = DiskTier(cache_dir)
        self.host = HostTier()
        self.fetcher = Fetcher(
            self.disk, max_adapter_bytes=max_adapter_bytes, object_store_timeout_s=object_store_timeout_s
        )
        self.estimates: dict[Tier, LoadEstimate] = {
            t: LoadEstimate() for t in (Tier.HOST, Tier.DISK, Tier.OBJECT_STORE)
        }
        self.expire_every_s = expire_every_s if expire_every_s is not None else min(5.0, idle_ttl_s / 4)
        self._parsing = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="adapter-parse")
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
                for t in (*self._tasks, *self._tails.values(), *self.fetcher.pending_writes())
                if t is not self._expire_task and not t.done()
            ]
            if not busy:
                return
            await asyncio.wait(busy)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.fetcher.close()
        self._parsing.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ requests

    async def acquire(self, spec: AdapterSpec, wait_s: float | None = None) -> Lease:
        """Have the adapter on the device and pinned until `release`.

        AdaptersBusy when the device stays full of adapters that requests hold for `wait_s`
        (at most `admit_wait_s`).
        """
        started = time.monotonic()
        wait_s = self.admit_wait_s if wait_s is None else min(wait_s, self.admit_wait_s)
        self._check(spec)  # a malformed or disallowed reference touches nothing below
        try:
            sizes = await self._prepare_request(spec, Tier.DEVICE)
            plan = await self._admit(spec, sizes, Tier.DEVICE, pin=True, until=started + wait_s)
        except Exception:
            await self._drop_unaccounted(spec.digest)
            raise
        telemetry.record_lookup(plan)
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
        # False when a copy stayed (the engine refused to remove it; the policy counts it again).
        return self.policy.tier_of(digest) > Tier.HOST

    async def expire_idle(self) -> None:
        """Scale to zero: carry out the policy's evictions of adapters idle past the TTL."""
        evictions = self.policy.expire_idle()
        if evictions:
            log.info("%d idle adapter(s) leave the device", sum(e.src == Tier.DEVICE for e in evictions))
            await self._run_evictions(evictions)
            self._notify()

    # ------------------------------------------------------------------ state

    def view(self) -> tuple[list[HeldAdapter], list[str]]:
        """Adapters at their fastest complete tier, and the digests being loaded."""
        return held_adapters(self.policy, self._adapter_ids, self.clock)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held or reserved per budgeted tier (DISK is inclusive of the faster tiers)."""
        return resident_bytes(self.policy)

    # ------------------------------------------------------------------ planning

    def _check(self, spec: AdapterSpec) -> None:
        check_reference(spec, self.sources, self.base_model)

    async def _prepare_request(self, spec: AdapterSpec, target: Tier) -> AdapterSizes:
        """Its sizes, for a reference `_check` accepted; a fetch run only to learn them leaves a
        copy the caller drops if the request goes no further (`_drop_unaccounted`)."""
        if spec.adapter_id:
            self._adapter_ids[spec.digest] = spec.adapter_id
        self.policy.set_keep_warm(spec.digest, spec.keep_warm)
        known = self.policy.known_size(spec.digest)
        size = known.size_bytes if known is not None else await self._size_of(spec)
        device = known.device_bytes if known is not None else None
        if device is None and target != Tier.DISK:
            device = await self._device_bytes_of(spec)
        return AdapterSizes(size, device)

    async def _device_bytes_of(self, spec: AdapterSpec) -> int:
        """What the adapter will occupy in the engine's layout, from its weights' header."""
        try:
            header = await self.fetcher.weights_header(spec)
            return planned_device_bytes(header.tensors, self.engine.linear_shape, self.dtype)
        except (InvalidSafetensors, ValueError) as exc:  # ValueError: a layer this model lacks
            raise AdapterUnreadable(
                f"adapter {spec.name} cannot be read: {exc}; re-register it from a PEFT "
                f"save_pretrained output"
            ) from exc

    async def _size_of(self, spec: AdapterSpec) -> int:
        """Its file bytes: the reference's, the disk copy's, or those of a fetch run to learn them."""
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
        await self.fetcher.fetch(spec)
        return await asyncio.to_thread(self.disk.size, spec.digest)

    async def _drop_unaccounted(self, digest: str) -> None:
        """A copy fetched only to learn its size, for a request that was then refused, is outside
        the disk budget: delete it (no row in the policy means no plan is using it)."""
        if self.policy.known_size(digest) is None and digest not in self._sizing:
            self.fetcher.verified.discard(digest)
            await asyncio.to_thread(self.disk.delete, digest)

    async def _admit(
        self, spec: AdapterSpec, sizes: AdapterSizes, target: Tier, *, pin: bool, until: float
    ) -> Plan:
        """policy.access, retried while the tiers are full of pinned or loading adapters."""
        check_fits(self.policy, spec, sizes, target)
        while True:
            plan = self.policy.access(
                spec.digest, sizes.size_bytes, target=target, pin=pin, device_bytes=sizes.device_bytes
            )
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
        try:
            sizes = await self._prepare_request(spec, target)
            until = time.monotonic() + self.admit_wait_s
            plan = await self._admit(spec, sizes, target, pin=False, until=until)
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
                adapter = await self.engine.remove_adapter(digest)
                if ev.dst == Tier.HOST:
                    self.host.put(await self._in(self._parsing, self.engine.to_host, adapter))
            elif ev.src == Tier.HOST:
                self.host.drop(digest)
            elif ev.src == Tier.DISK:
                await self.fetcher.written(digest)
                self.fetcher.verified.discard(digest)
                await self._in(self._parsing, self.disk.delete, digest)
            telemetry.record_eviction(ev)
            log.info("adapter %s left %s%s", digest, ev.src.name, f" for {ev.dst.name}" if ev.dst else "")
        except Exception:
            # The policy counted the eviction done when it planned it: make it count what is
            # really there again, or it would plan on bytes that are (or are not) in use.
            log.exception(
                "evicting adapter %s from %s failed; reconciling the accounting", digest, ev.src.name
            )
            await self._reconcile(digest, ev)

    async def _reconcile(self, digest: str, ev: Eviction) -> None:
        try:
            on_device = await self.engine.resident_adapters()
            present = await asyncio.to_thread(copies_of, digest, on_device, self.host, self.disk)
            sizes = self.policy.known_size(digest)
            if sizes is None:  # the policy let go of it: the eviction knows its size in `src`
                on_disk = await asyncio.to_thread(self.disk.size, digest)
                sizes = (
                    AdapterSizes(ev.size_bytes)
                    if ev.src == Tier.DISK
                    else AdapterSizes(on_disk or ev.size_bytes, ev.size_bytes)
                )
            self.policy.reconcile(digest, sizes, present)
        except Exception:
            log.exception("could not tell where adapter %s is; its accounting stays as planned", digest)
            return
        self._notify()

    async def _run_loads(self, spec: AdapterSpec, plan: Plan) -> Tier:
        digest = spec.digest
        started = time.monotonic()
        source = plan.found_in
        steps: list[str] = []
        try:
            for i, load in enumerate(plan.loads):
                step_started = time.monotonic()
                got = await self._load_step(spec, load, then=i + 1 < len(plan.loads))
                source = max(source, got)  # a copy gone missing means a slower source
                self.policy.on_loaded(digest, load.dst)
                steps.append(f"{load.dst.name.lower()} {(time.monotonic() - step_started) * 1000:.1f}")
        except BaseException as exc:
            self.policy.on_failed(digest)
            log.warning("adapter %s failed to load toward %s: %s", digest, plan.loads[-1].dst.name, exc)
            raise
        finally:
            self.fetcher.take_fetched(digest)
            if self._loads.get(digest) is asyncio.current_task():
                del self._loads[digest]
            self._notify()
        load_ms = (time.monotonic() - started) * 1000
        if plan.loads[-1].dst == Tier.DEVICE:
            self.estimates[source].observe(load_ms)
            telemetry.record_device_load(source, load_ms / 1000)
        log.info(
            "adapter %s in %s from %s in %.1f ms (%s ms)",
            digest,
            plan.loads[-1].dst.name,
            source.name,
            load_ms,
            ", ".join(steps),
        )
        return source

    async def _load_step(self, spec: AdapterSpec, load: Load, *, then: bool = False) -> Tier:
        """One step of a plan; returns where the bytes really came from. `then`: another step of
        the same plan follows (so a cold fetch keeps its bytes for it and writes the disk copy
        behind)."""
        src, dst = load.src, load.dst
        if dst == Tier.DISK:
            if src == Tier.OBJECT_STORE and then:
                return await self.fetcher.fetch_write_behind(spec, load.size_bytes)
            got, _ = await self.fetcher.fetch(spec)
            return max(src, got)
        prepared: DeviceAdapter | None = self.host.take(spec.digest) if src == Tier.HOST else None
        got = src
        if prepared is None:
            got, prepared = await self._prepare_from_disk(spec)
            got = max(src, got)
            if prepared.resident_bytes != load.size_bytes:
                # Planned from a header read before the verified download: trust only these bytes.
                raise AdapterUnreadable(
                    f"adapter {spec.name} occupies {prepared.resident_bytes} bytes in the engine's "
                    f"layout, not the {load.size_bytes} bytes its header promised when the load was "
                    f"planned; its stored files changed while it was loaded, retry the request"
                )
        if dst == Tier.HOST:
            self.host.put(prepared)
            return got
        try:
            on_device = await self._in(self._parsing, self.engine.to_engine_device, prepared)
            await self.engine.install_adapter(on_device)
        except BaseException:
            if src == Tier.HOST:
                self.host.put(prepared)  # the policy still counts the host copy
            raise
        return got

    async def _prepare_from_disk(self, spec: AdapterSpec) -> tuple[Tier, DeviceAdapter]:
        """Verified files (fetched again if the copy vanished) -> the device layout in host memory.

        Right after a cold fetch the files are still in memory: parsed from there."""
        fetched = self.fetcher.take_fetched(spec.digest)
        if fetched is not None:
            prepared = await self._in(self._parsing, prepare_from_bytes, self.engine, spec, fetched)
            return Tier.DISK, prepared
        got, path = await self.fetcher.fetch(spec)
        return got, await self._in(self._parsing, prepare_from_files, self.engine, spec, path)

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


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Every waiter may have gone (cancelled); mark the outcome seen so asyncio does not warn."""
    if not task.cancelled():
        task.exception()
