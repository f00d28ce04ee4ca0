"""TierPolicy additions the worker needs: an operator's evict, known sizes, and what counts as a
complete copy while a chain of loads runs."""

from __future__ import annotations

import math

from services.worker.tiers import AdapterSizes, AdapterState, Eviction, Tier, TierBudgets, TierPolicy

S = AdapterState
OS, DISK, HOST, DEV = Tier.OBJECT_STORE, Tier.DISK, Tier.HOST, Tier.DEVICE


def make(device: int = 30, host: int = 20, disk: int = 100) -> TierPolicy:
    return TierPolicy(TierBudgets(device, host, disk), math.inf, lambda: 0.0)


def on_device(p: TierPolicy, digest: str, size: int = 10, device: int | None = None) -> None:
    plan = p.access(digest, size, device_bytes=size if device is None else device)
    for load in plan.loads:
        p.on_loaded(digest, load.dst)
    p.unpin(digest)


def test_a_planned_chain_counts_nothing_complete_until_each_step_lands() -> None:
    p = make()
    p.access("a", 10, device_bytes=10)  # OS -> DISK -> DEVICE: both destinations reserved up front
    assert p.tier_of("a") == OS
    joined = p.access("a", 10, device_bytes=10)
    assert joined.admitted and joined.found_in == OS and joined.awaiting == DEV and not joined.hit
    p.on_loaded("a", DISK)
    assert p.tier_of("a") == DISK
    p.on_loaded("a", DEV)
    assert p.tier_of("a") == DEV


def test_evict_drops_device_and_host_copies_but_keeps_disk() -> None:
    p = make()
    on_device(p, "a")
    assert p.evict("a") == [Eviction("a", 10, DEV, None)]
    assert (p.tier_of("a"), p.state("a")) == (DISK, S.ON_DISK)
    assert (p.resident_bytes(DEV), p.resident_bytes(HOST), p.resident_bytes(DISK)) == (0, 0, 10)
    plan = p.access("a", 10, target=HOST, pin=False, device_bytes=10)
    p.on_loaded("a", HOST)
    assert plan.found_in == DISK and p.tier_of("a") == HOST
    assert p.evict("a") == [Eviction("a", 10, HOST, None)]
    assert p.tier_of("a") == DISK and p.evict("a") == []
    assert p.evict("unknown") == []


def test_evict_everything_forgets_the_adapter() -> None:
    p = make()
    on_device(p, "a")
    assert p.evict("a", (DEV, HOST, DISK)) == [Eviction("a", 10, DEV, None), Eviction("a", 10, DISK, None)]
    assert p.state("a") == S.ABSENT and p.known_size("a") is None
    assert p.resident_bytes(DISK) == 0


def test_evict_refuses_pinned_loading_and_keep_warm_adapters() -> None:
    p = make()
    p.access("held", 10, device_bytes=10)
    assert p.evict("held") is None  # loading and pinned
    p.on_loaded("held", DISK)
    p.on_loaded("held", DEV)
    assert p.evict("held") is None  # a request holds it
    p.unpin("held")
    p.set_keep_warm("held", True)
    assert p.evict("held") is None and p.tier_of("held") == DEV
    assert p.evict("held", (DISK,)) == [Eviction("held", 10, DISK, None)]  # only DEVICE is kept warm
    p.set_keep_warm("held", False)
    assert p.evict("held") == [Eviction("held", 10, DEV, None)]
    assert p.state("held") == S.ABSENT


def test_known_size_is_the_size_the_adapter_was_accounted_with() -> None:
    p = make()
    assert p.known_size("a") is None
    on_device(p, "a", 7, device=9)
    assert p.known_size("a") == AdapterSizes(7, 9)


def test_reconcile_counts_a_device_copy_that_would_not_leave() -> None:
    """The engine refused the removal (a request still ran on it): the device copy is counted
    again, so the budget and the next plans see the bytes that are really there."""
    p = make(device=10, host=20)
    on_device(p, "a")
    on_device(p, "b")  # a is demoted to HOST in the plan; its carry-out fails
    assert p.tier_of("a") == HOST and p.resident_bytes(DEV) == 10
    p.reconcile(
        "a", AdapterSizes(10, 10), {DEV, DISK}
    )  # still on the device, the host copy was never written
    assert (p.tier_of("a"), p.state("a")) == (DEV, S.ON_DEVICE)
    assert (p.resident_bytes(DEV), p.resident_bytes(HOST), p.resident_bytes(DISK)) == (20, 0, 20)
    # Over budget until the next plan: it evicts to make room, the reconciled copy included.
    plan = p.access("c", 10, device_bytes=10)
    assert {ev.digest for ev in plan.evictions if ev.src == DEV} == {"a", "b"}
    assert p.resident_bytes(DEV) == 10


def test_reconcile_releases_a_demotion_copy_that_never_arrived() -> None:
    p = make(device=10, host=20)
    on_device(p, "a")
    on_device(p, "b")
    p.reconcile("a", AdapterSizes(10, 10), {DISK})  # removed from the device, but the copy to host failed
    assert (p.tier_of("a"), p.state("a")) == (DISK, S.ON_DISK)
    assert (p.resident_bytes(DEV), p.resident_bytes(HOST), p.resident_bytes(DISK)) == (10, 0, 20)


def test_reconcile_brings_back_a_file_that_would_not_delete_and_forgets_a_vanished_one() -> None:
    p = make(disk=10)
    on_device(p, "a")
    assert p.evict("a", (DEV, HOST, DISK)) and p.known_size("a") is None
    p.reconcile("a", AdapterSizes(10, 10), {DISK})
    assert (p.tier_of("a"), p.state("a"), p.resident_bytes(DISK)) == (DISK, S.ON_DISK, 10)
    p.reconcile("a", AdapterSizes(10, 10), set())
    assert p.known_size("a") is None and p.resident_bytes(DISK) == 0


def test_reconcile_leaves_a_running_load_its_reservations() -> None:
    p = make(device=10, host=20)
    on_device(p, "a")
    on_device(p, "b")  # a -> HOST planned
    p.access("a", 10, device_bytes=10)  # and a request wants it back at once: HOST -> DEVICE, b -> HOST
    p.reconcile("a", AdapterSizes(10, 10), {DISK})  # the demotion to host failed; the load will read the disk
    assert p.state("a") == S.LOADING_DEVICE and p.resident_bytes(HOST) == 10  # b's copy only
    p.on_loaded("a", DEV)  # releasing a's host copy again changes nothing
    assert (p.resident_bytes(DEV), p.resident_bytes(HOST)) == (10, 10)
