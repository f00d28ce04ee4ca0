"""The worker's adapter-tier cache policy: pure bookkeeping, no I/O. The caller executes its plans.

Tiers, fastest first: DEVICE ▸ HOST ▸ DISK ▸ OBJECT_STORE (which always has every adapter).
DEVICE, HOST and DISK each have a byte budget that is never exceeded, counting bytes reserved by
loads in progress. DEVICE and HOST are exclusive (a device load from HOST moves the tensors;
a demotion moves them back); DISK is inclusive (the content-addressed file stays until disk
pressure removes it), so a demotion to disk costs nothing while the file is there.

Each adapter has two sizes (plans.AdapterSizes): DISK counts its file bytes; DEVICE and HOST count
its bytes in the engine's layout (slot bytes with the rank padded to its bucket, in the engine's
dtype, plus edge LoRA), which may be several times the file, or less. Every budget, eviction
order and plan uses the size of the tier in question.

Calls, for the worker that wires this in (times are `clock()` seconds unless passed):

    policy = TierPolicy(TierBudgets(device_bytes=..., host_bytes=..., disk_bytes=...),
                        idle_ttl_s=300.0, clock=time.monotonic)
    plan = policy.access(digest, size_bytes, device_bytes=...)  # a request wants it on DEVICE; pins it
    if not plan.admitted: queue or shed (plan.reason); nothing changed, nothing pinned;
        access again when a pin is released or a load ends
    for ev in plan.evictions: copy ev.src -> ev.dst if ev.dst else just free ev.src   (in order)
    for load in plan.loads: run it, then policy.on_loaded(digest, load.dst)  (or on_failed)
    if plan.awaiting: another request's load is running; wait for that adapter's ON_DEVICE
    ... the request finishes: policy.unpin(digest)
    policy.expire_idle() periodically -> evictions to execute (scale to zero)
    policy.set_keep_warm(digest, True); policy.snapshot(); policy.resident_bytes(Tier.DEVICE)
    an eviction's carry-out failed: policy.reconcile(digest, sizes, tiers that really hold a copy)

`access(..., target=Tier.DISK or Tier.HOST, pin=False)` prefetches; DISK-only accesses may omit
device_bytes (an adapter first seen on DISK learns them from the first access that passes them).
Pinned adapters (a running or waiting request holds them) and keep_warm adapters on DEVICE are
never evicted; an idle adapter leaves DEVICE after `idle_ttl_s`, and lower tiers shed adapters
only under byte pressure. Eviction within a tier follows `order` (orders.py), each tier's order
reading that tier's size: "lfu_size" (the default: accesses per byte,
every count halved each `aging_window` accesses), "gdsf" or "lru". bench/cache.py replays Zipf
(alpha 0.8-1.2) and bursty traces at device budgets of 5-20% of all adapter bytes: the device
request hit ratio is 0.93-0.99 of a size-aware Belady's for lfu_size, 0.89-0.98 for gdsf and
0.52-0.95 for lru, so LRU is kept only as the simple reference.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import cast

from services.worker.tiers.orders import Item, Order, SizeOf, make_order
from services.worker.tiers.plans import (
    AdapterSizes,
    Eviction,
    Load,
    Plan,
    ResidentRow,
    Tier,
    TierBudgets,
)
from services.worker.tiers.states import IN_PROGRESS, AdapterState, Lifecycle

S = AdapterState


BUDGETED = (Tier.DEVICE, Tier.HOST, Tier.DISK)
_AT_REST = {Tier.DEVICE: S.ON_DEVICE, Tier.HOST: S.IN_HOST, Tier.DISK: S.ON_DISK}
_LOADING = {Tier.DEVICE: S.LOADING_DEVICE, Tier.HOST: S.LOADING_HOST, Tier.DISK: S.DOWNLOADING}


@dataclass(eq=False)
class _Entry:
    digest: str
    size_bytes: int  # file bytes: what DISK counts
    device_bytes: int | None  # the engine layout's bytes: what DEVICE and HOST count
    state: AdapterState
    last_used: float
    freq: int = 0
    refs: int = 0
    held: set[Tier] = field(default_factory=set)  # tiers whose bytes this adapter occupies/reserves
    pending: list[Load] = field(default_factory=list)  # first one is running

    def bytes_in(self, tier: Tier) -> int:
        if tier == Tier.DISK:
            return self.size_bytes
        if self.device_bytes is None:  # access refuses DEVICE/HOST targets without it
            raise AssertionError(f"adapter {self.digest[:12]}: device bytes unknown")
        return self.device_bytes

    @property
    def sizes(self) -> AdapterSizes:
        return AdapterSizes(self.size_bytes, self.device_bytes)

    def fastest(self) -> Tier:
        return min(self.held, default=Tier.OBJECT_STORE)

    def complete(self) -> Tier:
        """Fastest tier holding a finished copy (no planned load's destination counts: in a chain
        OBJECT_STORE -> DISK -> DEVICE the DEVICE bytes are reserved while the download runs)."""
        if not self.pending:
            return min(self.held, default=Tier.OBJECT_STORE)
        planned = {ld.dst for ld in self.pending}
        return min((t for t in self.held if t not in planned), default=Tier.OBJECT_STORE)


class NoRoom(Exception):
    pass


class TierPolicy:
    def __init__(
        self,
        budgets: TierBudgets,
        idle_ttl_s: float,
        clock: Callable[[], float],
        order: str = "lfu_size",
        aging_window: int = 1000,
    ) -> None:
        if idle_ttl_s <= 0:
            raise ValueError("idle_ttl_s must be > 0 (math.inf disables idle expiry)")
        if aging_window <= 0:
            raise ValueError("aging_window must be > 0 accesses")
        self.aging_window = aging_window
        self._accesses = 0
        self.budgets = budgets
        self.idle_ttl_s = idle_ttl_s
        self.clock = clock
        self.order_kind = order
        self.lifecycle = Lifecycle()
        self.lookups: Counter[Tier] = Counter()  # accesses by the fastest complete copy found
        self.loads_planned: Counter[tuple[Tier, Tier]] = Counter()
        self.rejected = 0
        self._entries: dict[str, _Entry] = {}
        self._orders: dict[Tier, Order] = {t: make_order(order, _size_in(t)) for t in BUDGETED}
        self._used: dict[Tier, int] = {t: 0 for t in BUDGETED}
        self._budget: dict[Tier, int] = {t: budgets.of(t) for t in BUDGETED}
        self._keep_warm: set[str] = set()

    # ---------------------------------------------------------------- queries

    def resident_bytes(self, tier: Tier) -> int:
        return self._used[tier]

    def state(self, digest: str) -> AdapterState:
        e = self._entries.get(digest)
        return e.state if e is not None else S.ABSENT

    def tier_of(self, digest: str) -> Tier:
        """Fastest tier holding a finished copy (OBJECT_STORE when none)."""
        e = self._entries.get(digest)
        return e.complete() if e is not None else Tier.OBJECT_STORE

    def known_size(self, digest: str) -> AdapterSizes | None:
        """The sizes this adapter is accounted with, while the policy holds a row for it."""
        e = self._entries.get(digest)
        return e.sizes if e is not None else None

    def snapshot(self) -> list[ResidentRow]:
        return [
            ResidentRow(
                digest=e.digest,
                state=e.state,
                tier=e.fastest(),
                size_bytes=e.bytes_in(e.fastest()) if e.held else e.size_bytes,
                last_used=e.last_used,
                in_flight=e.refs,
                pinned=e.refs > 0,
                keep_warm=e.digest in self._keep_warm,
            )
            for e in self._entries.values()
            if e.held or e.refs
        ]

    # ---------------------------------------------------------------- requests

    def access(
        self,
        digest: str,
        size_bytes: int,
        now: float | None = None,
        *,
        target: Tier = Tier.DEVICE,
        pin: bool = True,
        device_bytes: int | None = None,
    ) -> Plan:
        """Plan to have `digest` in `target`; commits the plan's bookkeeping when admitted.

        `size_bytes`: its files; `device_bytes`: its engine layout, needed for a DEVICE or HOST
        target unless an earlier access passed them."""
        if target == Tier.OBJECT_STORE:
            raise ValueError("target must be DEVICE, HOST or DISK")
        if size_bytes <= 0 or (device_bytes is not None and device_bytes <= 0):
            raise ValueError("size_bytes and device_bytes must be > 0")
        now = self.clock() if now is None else now
        e = self._entries.get(digest)
        if e is not None:
            if e.size_bytes != size_bytes:
                raise ValueError(f"adapter {digest[:12]}: size {size_bytes} != known {e.size_bytes}")
            if device_bytes is not None and e.device_bytes not in (None, device_bytes):
                raise ValueError(
                    f"adapter {digest[:12]}: device bytes {device_bytes} != known {e.device_bytes}"
                )
            if e.device_bytes is None:
                e.device_bytes = device_bytes  # first seen on DISK: nothing counted it on DEVICE/HOST
            device_bytes = e.device_bytes
        if target != Tier.DISK and device_bytes is None:
            raise ValueError(f"adapter {digest[:12]}: a {target.name} target needs its device bytes")
        sizes = AdapterSizes(size_bytes, device_bytes)
        found = e.complete() if e is not None else Tier.OBJECT_STORE
        if pin:
            self.lookups[found] += 1
        if e is not None and (found <= target or (e.pending and e.pending[-1].dst <= target)):
            self._use(e, now, pin)
            awaiting = e.pending[-1].dst if e.pending else None
            return Plan(digest, found, admitted=True, awaiting=awaiting)
        if e is not None and e.pending:
            # A slower-target load (a prefetch) is running; let it finish before planning more.
            self.rejected += 1
            return Plan(digest, found, admitted=False, reason="a load of this adapter is running")
        chain = self._chain(digest, sizes, found, target)
        try:
            victims = {ld.dst: self._victims(ld.dst, ld.size_bytes, digest) for ld in chain}
        except NoRoom as exc:
            self.rejected += 1
            return Plan(digest, found, admitted=False, reason=str(exc))
        if e is None:
            e = self._new_entry(digest, sizes, now)
        e.pending = list(chain)  # from here on no demotion may take this adapter's own copies
        evictions: list[Eviction] = []
        for tier in (Tier.DISK, Tier.HOST, Tier.DEVICE):
            for v in victims.get(tier, []):
                evictions += self._evict(v, tier)
        if e.state in (S.ABSENT, S.FAILED):
            e.state = self.lifecycle.move(digest, e.state, S.QUEUED)
        for ld in chain:
            self._reserve(e, ld.dst)
            self.loads_planned[(ld.src, ld.dst)] += 1
        e.state = self.lifecycle.move(digest, e.state, _LOADING[chain[0].dst])
        self._use(e, now, pin)
        return Plan(digest, found, True, tuple(evictions), tuple(chain))

    def unpin(self, digest: str) -> None:
        e = self._entries.get(digest)
        if e is None or e.refs == 0:
            raise ValueError(f"adapter {digest[:12]} is not pinned")
        e.refs -= 1
        self._drop_if_failed_and_unused(e)

    def set_keep_warm(self, digest: str, keep_warm: bool) -> None:
        """keep_warm adapters on DEVICE are never evicted; loading them there is the caller's access."""
        if keep_warm:
            self._keep_warm.add(digest)
        else:
            self._keep_warm.discard(digest)

    def evict(self, digest: str, tiers: tuple[Tier, ...] = (Tier.DEVICE, Tier.HOST)) -> list[Eviction] | None:
        """An operator's eviction: drop the copies in `tiers` (no demotion). None, with nothing
        changed, while a request holds it, a load of it runs, or it is keep_warm on DEVICE."""
        e = self._entries.get(digest)
        if e is None:
            return []
        if (
            e.refs
            or e.pending
            or (Tier.DEVICE in tiers and Tier.DEVICE in e.held and digest in self._keep_warm)
        ):
            return None
        out: list[Eviction] = []
        for tier in sorted(tiers):
            if tier not in e.held:
                continue
            self._release(e, tier, evicted=True)
            out.append(Eviction(digest, e.bytes_in(tier), tier, None))
            if e.state == _AT_REST[tier]:
                rest = e.fastest()
                if rest == Tier.OBJECT_STORE:
                    e.state = self.lifecycle.move(digest, e.state, S.ABSENT)
                    del self._entries[digest]
                    return out
                e.state = self.lifecycle.move(digest, e.state, _AT_REST[rest])
        self._drop_if_failed_and_unused(e)
        return out

    def reconcile(
        self, digest: str, sizes: AdapterSizes, present: Collection[Tier], now: float | None = None
    ) -> None:
        """Make the accounting match where copies of `digest` really are, after an eviction whose
        carry-out failed (the policy committed it when it planned it).

        A copy the policy let go of that is still there (the engine refused to remove it, a file
        would not delete) is counted again, over budget if it must be: the next plans evict to
        make room. A copy it counts that is not there (a demotion's copy failed) is released.
        Reservations of loads in progress stay theirs. `sizes` count a copy of an adapter the
        policy had forgotten (each tier with its own size); a known adapter keeps its own."""
        present = {t for t in present if t in BUDGETED}
        e = self._entries.get(digest)
        if e is None:
            if not present:
                return
            for tier in present:
                sizes.bytes_in(tier)  # ValueError before anything changes: a size is missing
            e = self._new_entry(digest, sizes, self.clock() if now is None else now)
        elif e.device_bytes is None and present & {Tier.DEVICE, Tier.HOST}:
            if sizes.device_bytes is None:
                raise ValueError(f"adapter {digest[:12]}: a DEVICE/HOST copy needs its device bytes")
            e.device_bytes = sizes.device_bytes
        planned = {ld.dst for ld in e.pending}
        for tier in sorted(e.held - present - planned):
            self._release(e, tier)
        for tier in sorted(present - e.held):
            e.held.add(tier)
            self._used[tier] += e.bytes_in(tier)
            self._orders[tier].touch(e)
        if e.state in IN_PROGRESS:
            return
        if e.state == S.FAILED:
            self._drop_if_failed_and_unused(e)
            return
        rest = e.complete()
        want = _AT_REST[rest] if rest != Tier.OBJECT_STORE else S.FAILED if e.refs else S.ABSENT
        if want != e.state:
            e.state = self.lifecycle.correct(digest, e.state, want)
        if e.state == S.ABSENT:
            del self._entries[digest]

    # ---------------------------------------------------------------- load outcomes

    def on_loaded(self, digest: str, tier: Tier) -> None:
        e = self._entries.get(digest)
        if e is None or not e.pending or e.pending[0].dst != tier:
            raise ValueError(f"adapter {digest[:12]}: no load to {tier.name} is running")
        done = e.pending.pop(0)
        e.state = self.lifecycle.move(digest, e.state, _AT_REST[tier])
        if done.src == Tier.HOST and tier == Tier.DEVICE:
            self._release(e, Tier.HOST)  # moved, not copied: DEVICE and HOST are exclusive
        if e.pending:
            e.state = self.lifecycle.move(digest, e.state, _LOADING[e.pending[0].dst])

    def on_failed(self, digest: str) -> None:
        """The running load failed: release what the rest of the plan reserved; copies stay. Device
        bytes no DEVICE/HOST copy uses are forgotten: they may be why it failed (planned from an
        unverified header), and the next access passes them again."""
        e = self._entries.get(digest)
        if e is None or e.state not in IN_PROGRESS:
            raise ValueError(f"adapter {digest[:12]}: no load is running")
        for ld in e.pending:
            self._release(e, ld.dst)
        e.pending.clear()
        if not e.held & {Tier.DEVICE, Tier.HOST}:
            e.device_bytes = None
        e.state = self.lifecycle.move(digest, e.state, S.FAILED)
        self._drop_if_failed_and_unused(e)

    def expire_idle(self, now: float | None = None) -> list[Eviction]:
        """Scale to zero: adapters idle on DEVICE for idle_ttl_s move down a tier."""
        if math.isinf(self.idle_ttl_s):
            return []
        now = self.clock() if now is None else now
        idle = [
            e
            for e in self._entries.values()
            if e.state == S.ON_DEVICE
            and self._evictable(e, Tier.DEVICE)
            and now - e.last_used >= self.idle_ttl_s
        ]
        out: list[Eviction] = []
        for e in sorted(idle, key=lambda x: x.last_used):
            out += self._evict(e, Tier.DEVICE)
        return out

    # ---------------------------------------------------------------- internals

    def _drop_if_failed_and_unused(self, e: _Entry) -> None:
        """A failed adapter with no copy left and no request waiting needs no row."""
        if e.state == S.FAILED and not e.refs and not e.held:
            e.state = self.lifecycle.move(e.digest, e.state, S.ABSENT)
            del self._entries[e.digest]

    def _new_entry(self, digest: str, sizes: AdapterSizes, now: float) -> _Entry:
        # Frequency lives as long as the row: an adapter in any tier keeps its count; one that
        # fell back to object storage starts over (a remembered count measured worse with gdsf).
        e = _Entry(digest, sizes.size_bytes, sizes.device_bytes, S.ABSENT, now)
        self._entries[digest] = e
        return e

    def _use(self, e: _Entry, now: float, pin: bool) -> None:
        e.last_used = max(e.last_used, now)
        e.freq += 1
        if pin:
            e.refs += 1
        for t in e.held:
            self._orders[t].touch(e)
        self._accesses += 1
        if self._accesses % self.aging_window == 0 and self._orders[Tier.DEVICE].ages:
            self._age()

    def _age(self) -> None:
        """Halve every frequency, so yesterday's burst stops outranking today's traffic."""
        for e in self._entries.values():
            e.freq = (e.freq + 1) // 2
            for t in e.held:
                self._orders[t].refresh(e)

    def _chain(self, digest: str, sizes: AdapterSizes, found: Tier, target: Tier) -> list[Load]:
        chain: list[Load] = []
        src = found
        if src == Tier.OBJECT_STORE:
            chain.append(Load(digest, sizes.size_bytes, Tier.OBJECT_STORE, Tier.DISK))
            src = Tier.DISK
        if target < src:
            chain.append(Load(digest, sizes.bytes_in(target), src, target))
        return chain

    def _evictable(self, e: _Entry, tier: Tier) -> bool:
        if e.refs or e.pending or tier not in e.held:
            return False
        if tier == Tier.DEVICE:
            return e.digest not in self._keep_warm
        return tier == Tier.DISK or e.state in (S.IN_HOST, S.FAILED)

    def _victims(self, tier: Tier, size: int, digest: str) -> list[_Entry]:
        budget = self._budget[tier]
        if size > budget:
            raise NoRoom(f"{size} bytes exceed the whole {tier.name} budget of {budget}")
        needed = self._used[tier] + size - budget
        if needed <= 0:
            return []

        def candidate(d: str) -> Item | None:
            e = self._entries.get(d)
            return e if e is not None and d != digest and self._evictable(e, tier) else None

        found = self._orders[tier].victims(needed, candidate)
        if found is None:
            raise NoRoom(f"{tier.name} is full of pinned, loading or keep_warm adapters")
        return [self._entries[v.digest] for v in found]

    def _reserve(self, e: _Entry, tier: Tier) -> None:
        size = e.bytes_in(tier)
        if self._used[tier] + size > self._budget[tier]:
            raise AssertionError(f"{tier.name} budget would be exceeded")  # planning bug
        e.held.add(tier)
        self._used[tier] += size
        self._orders[tier].touch(e)

    def _release(self, e: _Entry, tier: Tier, *, evicted: bool = False) -> None:
        if tier not in e.held:
            return  # already released (reconcile found the copy gone before its load moved it)
        e.held.discard(tier)
        self._used[tier] -= e.bytes_in(tier)
        self._orders[tier].discard(e.digest, evicted=evicted)

    def _evict(self, e: _Entry, tier: Tier) -> list[Eviction]:
        """Remove e's copy in `tier`, demoting DEVICE to HOST when HOST has colder room (HOST keeps
        the device layout, so the same bytes move)."""
        out: list[Eviction] = []
        size = e.bytes_in(tier)
        self._release(e, tier, evicted=True)
        if tier == Tier.DEVICE and size <= self.budgets.host_bytes:
            needed = self._used[Tier.HOST] + size - self.budgets.host_bytes

            def candidate(d: str) -> Item | None:
                h = self._entries.get(d)
                return h if h is not None and self._evictable(h, Tier.HOST) else None

            colder = self._orders[Tier.HOST].victims(needed, candidate, colder_than=e) if needed > 0 else []
            if colder is not None:
                for h in colder:
                    out += self._evict(self._entries[h.digest], Tier.HOST)
                self._reserve(e, Tier.HOST)
                e.state = self.lifecycle.move(e.digest, e.state, S.IN_HOST)
                return [*out, Eviction(e.digest, size, Tier.DEVICE, Tier.HOST)]
        out.append(Eviction(e.digest, size, tier, None))
        if e.state == _AT_REST[tier]:
            rest = e.fastest()
            if rest == Tier.OBJECT_STORE:
                e.state = self.lifecycle.move(e.digest, e.state, S.ABSENT)
                del self._entries[e.digest]
            else:
                e.state = self.lifecycle.move(e.digest, e.state, _AT_REST[rest])
        self._drop_if_failed_and_unused(e)
        return out


def _size_in(tier: Tier) -> SizeOf:
    """An eviction order's view of an entry's size: its bytes in that order's tier."""

    def size_of(item: Item) -> int:
        return cast(_Entry, item).bytes_in(tier)

    return size_of
