"""The adapter-tier cache policy: budgets, pinning, keep_warm, idle expiry, demotion, orders."""

from __future__ import annotations

import math
import random

import pytest

from services.worker.tiers import AdapterState, Eviction, Load, Plan, Tier, TierBudgets, TierPolicy

S = AdapterState
OS, DISK, HOST, DEV = Tier.OBJECT_STORE, Tier.DISK, Tier.HOST, Tier.DEVICE


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(
    device: int = 30, host: int = 20, disk: int = 100, *, ttl: float = math.inf, order: str = "lru"
) -> tuple[TierPolicy, Clock]:
    clock = Clock()
    return TierPolicy(TierBudgets(device, host, disk), ttl, clock, order=order), clock


def serve(p: TierPolicy, digest: str, size: int = 10, *, keep_pinned: bool = False) -> Plan:
    """Access, run every load at once, release the request (unless it keeps running)."""
    plan = p.access(digest, size, device_bytes=size)
    assert plan.admitted, plan.reason
    for load in plan.loads:
        p.on_loaded(digest, load.dst)
    if not keep_pinned:
        p.unpin(digest)
    return plan


def test_cold_access_downloads_to_disk_then_loads_to_device() -> None:
    p, _ = make()
    plan = p.access("a", 10, device_bytes=10)
    assert (plan.found_in, plan.hit, plan.evictions) == (OS, False, ())
    assert plan.loads == (Load("a", 10, OS, DISK), Load("a", 10, DISK, DEV))
    assert p.state("a") == S.DOWNLOADING
    assert (p.resident_bytes(DEV), p.resident_bytes(DISK)) == (10, 10)  # reserved up front
    p.on_loaded("a", DISK)
    assert p.state("a") == S.LOADING_DEVICE
    p.on_loaded("a", DEV)
    assert p.state("a") == S.ON_DEVICE
    p.unpin("a")
    again = p.access("a", 10, device_bytes=10)
    assert again.hit and again.loads == () and again.evictions == ()
    assert p.lookups == {OS: 1, DEV: 1}


def test_second_request_during_a_load_joins_it_instead_of_loading_again() -> None:
    p, _ = make()
    first = p.access("a", 10, device_bytes=10)
    second = p.access("a", 10, device_bytes=10)
    assert first.loads and second.loads == ()
    assert second.admitted and second.awaiting == DEV
    assert p.snapshot()[0].in_flight == 2


def test_lru_evicts_the_least_recently_used_adapter_first() -> None:
    p, clock = make(device=30, host=0)
    for i, d in enumerate("abc"):
        clock.t = float(i)
        serve(p, d)
    clock.t = 3.0
    serve(p, "a")  # b is now the least recently used
    clock.t = 4.0
    plan = serve(p, "d")
    assert plan.evictions == (Eviction("b", 10, DEV, None),)
    assert p.tier_of("b") == DISK and p.state("b") == S.ON_DISK
    assert {r.digest for r in p.snapshot() if r.tier == DEV} == {"a", "c", "d"}


def test_gdsf_evicts_a_large_rarely_used_adapter_before_small_popular_ones() -> None:
    p, _ = make(device=40, host=0, order="gdsf")
    serve(p, "big", 20)
    for _ in range(3):
        serve(p, "s1", 5)
        serve(p, "s2", 5)
    serve(p, "s3", 5)
    plan = serve(p, "new", 10)
    assert [e.digest for e in plan.evictions] == ["big"]


def test_lfu_size_keeps_the_most_accesses_per_byte() -> None:
    p, _ = make(device=40, host=0, order="lfu_size")
    for _ in range(4):
        serve(p, "big", 20)  # 4 accesses / 20 bytes
    for d in ("s1", "s2"):
        for _ in range(3):
            serve(p, d, 10)  # 3 accesses / 10 bytes each: worth more per byte
    plan = serve(p, "new", 10)
    assert [e.digest for e in plan.evictions] == ["big"]


def test_lfu_size_aging_lets_a_past_burst_fall_behind_current_traffic() -> None:
    clock = Clock()
    p = TierPolicy(TierBudgets(20, 0, 100), math.inf, clock, order="lfu_size", aging_window=4)
    for _ in range(16):
        serve(p, "burst")
    for _ in range(6):
        serve(p, "now")
    # Counts are halved every 4th access: burst ends at 2 and now at 4 (without aging: 16 and 6).
    plan = serve(p, "next")
    assert [e.digest for e in plan.evictions] == ["burst"]


def test_pinned_adapters_are_never_evicted_and_a_full_device_refuses_the_newcomer() -> None:
    p, _ = make(device=20, host=0)
    serve(p, "a", keep_pinned=True)
    serve(p, "b", keep_pinned=True)
    refused = p.access("c", 10, device_bytes=10)
    assert not refused.admitted and "pinned" in refused.reason
    assert refused.loads == () and refused.evictions == ()
    assert p.state("a") == p.state("b") == S.ON_DEVICE
    assert p.state("c") == S.ABSENT and p.resident_bytes(DEV) == 20
    p.unpin("a")
    plan = serve(p, "c")
    assert [e.digest for e in plan.evictions] == ["a"]
    assert p.state("c") == S.ON_DEVICE


def test_an_adapter_larger_than_the_device_budget_is_refused() -> None:
    p, _ = make(device=30)
    plan = p.access("huge", 31, device_bytes=31)
    assert not plan.admitted and "exceed" in plan.reason
    assert p.resident_bytes(DEV) == p.resident_bytes(DISK) == 0


def test_device_eviction_demotes_to_host_making_room_there_by_lru() -> None:
    p, clock = make(device=20, host=20)
    for i, d in enumerate("abcd"):  # a and b are pushed out of DEVICE into HOST
        clock.t = float(i)
        serve(p, d)
    assert p.state("a") == p.state("b") == S.IN_HOST
    clock.t = 10.0
    plan = serve(p, "e")  # c leaves DEVICE; HOST drops its LRU (a) to make room for c
    assert plan.evictions == (
        Eviction("a", 10, HOST, None),
        Eviction("c", 10, DEV, HOST),
    )
    assert (p.state("a"), p.state("b"), p.state("c")) == (S.ON_DISK, S.IN_HOST, S.IN_HOST)
    assert p.resident_bytes(HOST) == 20


def test_host_copy_moves_to_device_and_frees_host() -> None:
    p, _ = make(device=10, host=10)
    serve(p, "a")
    serve(p, "b")  # a demoted to HOST
    assert p.state("a") == S.IN_HOST
    plan = serve(p, "a")
    assert plan.found_in == HOST and plan.loads == (Load("a", 10, HOST, DEV),)
    # a's host bytes stay taken until its copy to DEVICE is done, so b cannot swap into HOST.
    assert plan.evictions == (Eviction("b", 10, DEV, None),)
    assert p.state("a") == S.ON_DEVICE and p.state("b") == S.ON_DISK
    assert p.resident_bytes(HOST) == 0 and p.resident_bytes(DEV) == 10


def test_demotion_without_a_lower_copy_falls_back_to_object_storage() -> None:
    p, _ = make(device=10, host=0, disk=10)
    serve(p, "a")
    plan = serve(p, "b")  # b's download evicts a's disk file, then b's device load evicts a
    assert plan.evictions == (Eviction("a", 10, DISK, None), Eviction("a", 10, DEV, None))
    assert p.state("a") == S.ABSENT and p.tier_of("a") == OS
    assert [r.digest for r in p.snapshot()] == ["b"]


def test_idle_adapter_leaves_the_device_after_the_ttl() -> None:
    p, clock = make(host=20, ttl=60.0)
    serve(p, "a")
    clock.t = 59.0
    assert p.expire_idle() == []
    clock.t = 60.0
    assert p.expire_idle() == [Eviction("a", 10, DEV, HOST)]
    assert p.resident_bytes(DEV) == 0 and p.state("a") == S.IN_HOST


def test_keep_warm_and_pinned_adapters_survive_idle_expiry() -> None:
    p, clock = make(ttl=1.0)
    serve(p, "warm")
    serve(p, "busy", keep_pinned=True)
    serve(p, "idle")
    p.set_keep_warm("warm", True)
    clock.t = 1000.0
    assert [e.digest for e in p.expire_idle()] == ["idle"]
    assert p.state("warm") == p.state("busy") == S.ON_DEVICE
    p.set_keep_warm("warm", False)
    assert [e.digest for e in p.expire_idle()] == ["warm"]


def test_keep_warm_adapter_is_not_evicted_under_budget_pressure() -> None:
    p, _ = make(device=20, host=0)
    serve(p, "warm")
    p.set_keep_warm("warm", True)
    serve(p, "b")
    plan = serve(p, "c")
    assert [e.digest for e in plan.evictions] == ["b"]
    assert not p.access("d", 20, device_bytes=20).admitted


def test_failed_load_releases_its_reservations_and_a_retry_starts_over() -> None:
    p, _ = make()
    p.access("a", 10, device_bytes=10)
    p.on_failed("a")
    assert p.state("a") == S.FAILED
    assert p.resident_bytes(DEV) == p.resident_bytes(DISK) == 0
    p.unpin("a")  # the failed request lets go: nothing of it is left
    assert p.state("a") == S.ABSENT and p.snapshot() == []
    plan = serve(p, "a")
    assert plan.loads[0] == Load("a", 10, OS, DISK)
    assert p.state("a") == S.ON_DEVICE


def test_failed_device_load_keeps_the_disk_copy() -> None:
    p, _ = make()
    p.access("a", 10, device_bytes=10)
    p.on_loaded("a", DISK)
    p.on_failed("a")
    assert p.resident_bytes(DISK) == 10 and p.resident_bytes(DEV) == 0
    p.unpin("a")
    assert p.access("a", 10, device_bytes=10).loads == (Load("a", 10, DISK, DEV),)


def test_prefetch_to_disk_pins_nothing_and_counts_no_lookup() -> None:
    p, _ = make()
    plan = p.access("a", 10, target=DISK, pin=False)
    assert plan.loads == (Load("a", 10, OS, DISK),)
    p.on_loaded("a", DISK)
    assert p.state("a") == S.ON_DISK and not p.snapshot()[0].pinned and p.lookups.total() == 0


def test_misuse_is_an_error_not_a_silent_change() -> None:
    p, _ = make()
    with pytest.raises(ValueError):
        p.unpin("never-seen")
    p.access("a", 10, device_bytes=10)
    with pytest.raises(ValueError):
        p.on_loaded("a", DEV)  # the download to DISK runs first
    with pytest.raises(ValueError):
        p.access("a", 11, device_bytes=11)  # one digest, one size
    with pytest.raises(ValueError):
        TierBudgets(-1, 0, 0)


@pytest.mark.parametrize("order", ["lru", "gdsf", "lfu_size"])
def test_random_operations_never_exceed_a_budget_or_evict_a_protected_adapter(order: str) -> None:
    rng = random.Random(1234)
    budgets = TierBudgets(device_bytes=120, host_bytes=150, disk_bytes=300)
    clock = Clock()
    p = TierPolicy(budgets, idle_ttl_s=50.0, clock=clock, order=order)
    sizes = {f"a{i}": rng.choice([5, 10, 20, 40, 80]) for i in range(40)}
    running: list[tuple[str, list[Load]]] = []  # plans whose loads are still being executed
    pins: list[str] = []

    def check(evictions: list[Eviction]) -> None:
        for ev in evictions:
            assert ev.digest not in pins, ev
            assert not (ev.src == DEV and ev.digest in warm), ev
        for tier in (DEV, HOST, DISK):
            assert 0 <= p.resident_bytes(tier) <= budgets.of(tier)

    warm: set[str] = set()
    for _ in range(3000):
        clock.t += rng.random()
        op = rng.random()
        if op < 0.45:
            d = rng.choice(list(sizes))
            plan = p.access(d, sizes[d], device_bytes=sizes[d])
            check(list(plan.evictions))
            if plan.admitted:
                pins.append(d)
                if plan.loads:
                    running.append((d, list(plan.loads)))
        elif op < 0.7 and running:
            d, loads = running[rng.randrange(len(running))]
            if rng.random() < 0.05:
                p.on_failed(d)
                loads.clear()
            else:
                p.on_loaded(d, loads.pop(0).dst)
            running = [(x, ls) for x, ls in running if ls]
        elif op < 0.9 and pins:
            p.unpin(pins.pop(rng.randrange(len(pins))))
        elif op < 0.95:
            check(p.expire_idle())
        else:
            d = rng.choice(list(sizes))
            on = rng.random() < 0.5 and len(warm) < 2
            p.set_keep_warm(d, on)
            (warm.add if on else warm.discard)(d)
        check([])
    assert p.lookups.total() > 1000 and p.rejected > 0
    assert p.lifecycle.counts[(S.ON_DEVICE, S.IN_HOST)] > 0 and p.lifecycle.counts[(S.IN_HOST, S.ON_DISK)] > 0
