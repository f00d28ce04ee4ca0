"""Routing policy: residency first, a stable rendezvous home for cold adapters, bounded load."""

from __future__ import annotations

from collections import Counter

from services.router.policy import Reason, Residency, WorkerView, choose, load_bound

BASE = "base-a"


def workers(n: int, **loads: int) -> list[WorkerView]:
    return [WorkerView(f"w{i}", BASE, load=loads.get(f"w{i}", 0)) for i in range(n)]


def homes(ws: list[WorkerView], keys: list[str]) -> dict[str, str]:
    return {k: choose(ws, BASE, k).candidates[0] for k in keys}


KEYS = [f"sha256:{i:064x}" for i in range(400)]


def test_cold_adapter_goes_to_the_same_home_every_time() -> None:
    ws = workers(5)
    first = homes(ws, KEYS)
    assert homes(list(reversed(ws)), KEYS) == first
    assert choose(ws, BASE, KEYS[0]).reason is Reason.HOME


def test_homes_spread_over_the_workers() -> None:
    counts = Counter(homes(workers(4), KEYS).values())
    assert set(counts) == {"w0", "w1", "w2", "w3"}
    assert min(counts.values()) > len(KEYS) / 4 * 0.6


def test_removing_a_worker_moves_only_the_adapters_it_was_home_to() -> None:
    ws = workers(5)
    before = homes(ws, KEYS)
    after = homes([w for w in ws if w.worker_id != "w2"], KEYS)
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "w2"}
    assert moved  # w2 was home to something


def test_adding_a_worker_takes_adapters_only_onto_itself() -> None:
    ws = workers(4)
    before = homes(ws, KEYS)
    after = homes([*ws, WorkerView("w-new", BASE)], KEYS)
    assert all(after[k] in (before[k], "w-new") for k in KEYS)


def test_overloaded_home_is_skipped_for_the_next_in_rendezvous_order() -> None:
    ws = workers(4)
    key = KEYS[7]
    natural = choose(ws, BASE, key).candidates
    busy = [WorkerView(w.worker_id, BASE, load=50 if w.worker_id == natural[0] else 1) for w in ws]
    decision = choose(busy, BASE, key)
    assert decision.candidates[0] == natural[1]
    # The overloaded home is still a (last-resort) failover candidate.
    assert decision.candidates[-1] == natural[0]
    assert sorted(decision.candidates) == sorted(natural)


def test_home_within_the_load_bound_keeps_its_adapter() -> None:
    ws = workers(4)
    key = KEYS[3]
    home = choose(ws, BASE, key).candidates[0]
    # Every worker busy with one request: bound ceil(1.25 * (4+1)/4) = 2, so the home stays under it.
    loaded = [WorkerView(w.worker_id, BASE, load=1) for w in ws]
    assert load_bound(loaded, 0.25) == 2
    assert choose(loaded, BASE, key).candidates[0] == home


def test_resident_worker_is_preferred_over_the_home() -> None:
    ws = workers(4)
    key = KEYS[11]
    home = choose(ws, BASE, key).candidates[0]
    other = next(w.worker_id for w in ws if w.worker_id != home)
    with_residency = [
        WorkerView(w.worker_id, BASE, residency={key: Residency.HOST}) if w.worker_id == other else w
        for w in ws
    ]
    decision = choose(with_residency, BASE, key)
    assert decision.candidates[0] == other
    assert decision.reason is Reason.RESIDENT
    assert decision.candidates[1] == home


def test_faster_tier_then_lower_queue_wins_among_resident_workers() -> None:
    key = KEYS[5]
    ws = [
        WorkerView("disk", BASE, load=0, residency={key: Residency.DISK}),
        WorkerView("dev-busy", BASE, load=2, residency={key: Residency.DEVICE}),
        WorkerView("dev-idle", BASE, load=1, residency={key: Residency.DEVICE}),
        WorkerView("cold", BASE, load=0),
    ]
    assert choose(ws, BASE, key, eps=2.0).candidates[:3] == ("dev-idle", "dev-busy", "disk")


def test_resident_worker_over_the_load_bound_yields_to_the_home() -> None:
    key = KEYS[9]
    cold = [WorkerView(f"w{i}", BASE) for i in range(3)]
    home = choose(cold, BASE, key).candidates[0]
    ws = [
        WorkerView(w.worker_id, BASE, load=30, residency={key: Residency.DEVICE})
        if w.worker_id != home
        else w
        for w in cold
    ]
    # The resident workers are above the bound ceil(1.25 * 61/3) = 26; only the idle home is under.
    decision = choose(ws, BASE, key)
    assert decision.candidates[0] == home
    assert decision.reason is Reason.HOME


def test_only_accepting_workers_of_the_base_model_are_candidates() -> None:
    ws = [
        WorkerView("draining", BASE, accepting=False),
        WorkerView("other-model", "base-b"),
        WorkerView("ok", BASE),
    ]
    assert choose(ws, BASE, KEYS[0]).candidates == ("ok",)
    none = choose(ws[:2], BASE, KEYS[0])
    assert none.candidates == () and none.reason is Reason.NO_WORKER


def test_base_model_requests_go_to_the_least_loaded_worker() -> None:
    ws = [WorkerView("a", BASE, load=3), WorkerView("b", BASE, load=0), WorkerView("c", BASE, load=1)]
    decision = choose(ws, BASE, "")
    assert decision.candidates == ("b", "c", "a")
    assert decision.reason is Reason.LEAST_LOADED
