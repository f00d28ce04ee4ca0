"""Two sizes per adapter: DISK counts its files, DEVICE and HOST its bytes in the engine's layout."""

from __future__ import annotations

import math

import pytest

from services.worker.tiers import AdapterSizes, AdapterState, Eviction, Load, Tier, TierBudgets, TierPolicy

S = AdapterState
OS, DISK, HOST, DEV = Tier.OBJECT_STORE, Tier.DISK, Tier.HOST, Tier.DEVICE


def make(device: int = 100, host: int = 100, disk: int = 1000, order: str = "lru") -> TierPolicy:
    return TierPolicy(TierBudgets(device, host, disk), math.inf, lambda: 0.0, order=order)


def on_device(p: TierPolicy, digest: str, size: int, device: int) -> None:
    plan = p.access(digest, size, device_bytes=device)
    assert plan.admitted, plan.reason
    for load in plan.loads:
        p.on_loaded(digest, load.dst)
    p.unpin(digest)


def test_device_bytes_four_times_the_file_fill_the_device_four_times_faster() -> None:
    p = make(device=100, host=0)
    plan = p.access("a", 10, device_bytes=40)
    assert plan.loads == (Load("a", 10, OS, DISK), Load("a", 40, DISK, DEV))
    for load in plan.loads:
        p.on_loaded("a", load.dst)
    p.unpin("a")
    on_device(p, "b", 10, 40)
    assert (p.resident_bytes(DEV), p.resident_bytes(DISK)) == (80, 20)
    # 30 file bytes on the device by file size, but 120 slot bytes: the third evicts the first.
    plan = p.access("c", 10, device_bytes=40)
    assert plan.evictions == (Eviction("a", 40, DEV, None),)
    assert (p.resident_bytes(DEV), p.resident_bytes(DISK)) == (80, 30)


def test_an_adapter_whose_device_bytes_exceed_the_device_budget_is_refused() -> None:
    p = make(device=100)
    plan = p.access("big", 10, device_bytes=101)
    assert not plan.admitted and "101 bytes exceed the whole DEVICE budget" in plan.reason
    assert p.resident_bytes(DISK) == 0


def test_a_device_or_host_target_without_device_bytes_is_a_caller_bug() -> None:
    p = make()
    for target in (DEV, HOST):
        with pytest.raises(ValueError, match="needs its device bytes"):
            p.access("a", 10, target=target, pin=False)
    assert p.known_size("a") is None


def test_an_adapter_first_seen_on_disk_learns_its_device_bytes_at_the_first_access_passing_them() -> None:
    p = make()
    p.access("a", 10, target=DISK, pin=False)
    p.on_loaded("a", DISK)
    assert p.known_size("a") == AdapterSizes(10, None)
    with pytest.raises(ValueError, match="needs its device bytes"):
        p.access("a", 10)
    plan = p.access("a", 10, device_bytes=25)
    assert plan.loads == (Load("a", 25, DISK, DEV),)
    assert p.known_size("a") == AdapterSizes(10, 25)
    assert (p.resident_bytes(DEV), p.resident_bytes(DISK)) == (25, 10)
    with pytest.raises(ValueError, match="device bytes 26 != known 25"):
        p.access("a", 10, device_bytes=26)


def test_a_demotion_moves_the_device_bytes_to_host() -> None:
    p = make(device=50, host=100)
    on_device(p, "a", 10, 40)
    plan = p.access("b", 10, device_bytes=40)
    assert plan.evictions == (Eviction("a", 40, DEV, HOST),)
    assert (p.resident_bytes(DEV), p.resident_bytes(HOST), p.resident_bytes(DISK)) == (40, 40, 20)
    for load in plan.loads:
        p.on_loaded("b", load.dst)
    p.unpin("b")
    # Back from HOST: the host copy's device bytes are freed as the device reserves them.
    plan = p.access("a", 10, device_bytes=40)
    assert plan.loads == (Load("a", 40, HOST, DEV),)
    assert plan.evictions == (Eviction("b", 40, DEV, HOST),)
    assert p.resident_bytes(HOST) == 80  # a's host copy until its move lands, and b's
    p.on_loaded("a", DEV)
    assert (p.resident_bytes(DEV), p.resident_bytes(HOST)) == (40, 40)


def test_a_demotion_that_does_not_fit_host_by_device_bytes_drops_to_disk() -> None:
    p = make(device=50, host=30)  # the file (10) would fit HOST, its device layout (40) not
    on_device(p, "a", 10, 40)
    assert p.access("b", 10, device_bytes=40).evictions == (Eviction("a", 40, DEV, None),)
    assert p.state("a") == S.ON_DISK and p.resident_bytes(HOST) == 0


def test_reconcile_counts_each_tier_with_its_own_size() -> None:
    p = make()
    on_device(p, "a", 10, 40)
    assert p.evict("a", (DEV, HOST, DISK)) and p.known_size("a") is None
    # Nothing would leave: the engine kept it and the file stayed.
    p.reconcile("a", AdapterSizes(10, 40), {DEV, DISK})
    assert (p.resident_bytes(DEV), p.resident_bytes(HOST), p.resident_bytes(DISK)) == (40, 0, 10)
    assert p.state("a") == S.ON_DEVICE
    p.reconcile("a", AdapterSizes(10, 40), {DISK})
    assert (p.resident_bytes(DEV), p.resident_bytes(DISK)) == (0, 10)
    with pytest.raises(ValueError):
        p.reconcile("b", AdapterSizes(10, None), {DEV})  # a device copy needs its device bytes
    assert p.known_size("b") is None


@pytest.mark.parametrize("order", ["lru", "gdsf", "lfu_size"])
def test_orders_evict_by_the_size_in_their_own_tier(order: str) -> None:
    # "small" has small files and a large device layout; "large" the reverse.
    p = make(device=100, host=0, disk=100, order=order)
    on_device(p, "small", 10, 60)
    on_device(p, "large", 60, 10)
    # DEVICE needs 30 more bytes. By device bytes "small" has the fewest accesses per byte and
    # frees 60 alone (lru: it is also the oldest). Counted by file bytes, gdsf/lfu_size would
    # evict "large" and lru would need both (10 freed is not enough).
    plan = p.access("c", 25, device_bytes=60)
    dev = [ev for ev in plan.evictions if ev.src == DEV]
    assert [(ev.digest, ev.size_bytes) for ev in dev] == [("small", 60)]
    # DISK (100) holds 70 + 25 = 95 file bytes; 30 more evict by file size: "large" (60) has the
    # fewest accesses per file byte and is enough alone; lru takes the oldest, "small" (10), then
    # "large".
    p.on_loaded("c", DISK)
    p.on_loaded("c", DEV)
    p.unpin("c")
    plan = p.access("d", 30, target=DISK, pin=False)
    disk = [(ev.digest, ev.size_bytes) for ev in plan.evictions if ev.src == DISK]
    assert disk == ([("small", 10), ("large", 60)] if order == "lru" else [("large", 60)])
