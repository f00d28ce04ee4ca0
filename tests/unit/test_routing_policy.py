"""Routing policy: residency first, a stable rendezvous home for cold adapters, bounded load (queue
and KV), and the least_loaded / round_robin baselines."""

from __future__ import annotations

from collections import Counter

from services.common.config import DEFAULT_ROUTE_LOAD_EPS, ROUTER_POLICIES
from services.router.policy import (
    DEFAULT_LOAD_EPS,
    PolicyKind,
    Reason,
    Residency,
    WorkerView,
    choose,
    least_loaded,
    load_bound,
    rendezvous_order,
    round_robin,
    route,
)

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


def test_faster_tier_then_the_home_order_wins_among_resident_workers() -> None:
    key = KEYS[5]
    ids = ["disk", "dev-a", "dev-b", "cold"]
    first, second = (w.worker_id for w in rendezvous_order(key, [WorkerView(i, BASE) for i in ids[1:3]]))
    ws = [
        WorkerView("disk", BASE, load=0, residency={key: Residency.DISK}),
        # The later worker in rendezvous order is the less loaded one: within the bound, load does
        # not pull an adapter away from the worker nearer its home.
        WorkerView(first, BASE, load=2, residency={key: Residency.DEVICE}),
        WorkerView(second, BASE, load=1, residency={key: Residency.DEVICE}),
        WorkerView("cold", BASE, load=0),
    ]
    assert choose(ws, BASE, key, eps=2.0).candidates[:3] == (first, second, "disk")


def test_a_spilled_disk_copy_does_not_pull_an_adapter_from_its_home() -> None:
    key = KEYS[6]
    names = [f"w{i}" for i in range(3)]
    home, other, _ = (w.worker_id for w in rendezvous_order(key, [WorkerView(n, BASE) for n in names]))
    ws = [
        WorkerView(n, BASE, load=1 if n == home else 0, residency={key: Residency.DISK})
        if n in (home, other)
        else WorkerView(n, BASE)
        for n in names
    ]
    assert choose(ws, BASE, key).candidates[0] == home


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
    decision = choose(ws, BASE, key, eps=0.25)
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


def test_host_beats_disk_beats_loading_beats_cold_home() -> None:
    key = KEYS[13]
    ws = [
        WorkerView("cold", BASE),
        WorkerView("loading", BASE, loading=frozenset({key})),
        WorkerView("disk", BASE, residency={key: Residency.DISK}),
        WorkerView("host", BASE, residency={key: Residency.HOST}),
    ]
    decision = choose(ws, BASE, key)
    # A worker loading the adapter ranks with disk; equal tier and load keep the rendezvous order.
    assert decision.candidates[0] == "host"
    assert set(decision.candidates[1:3]) == {"disk", "loading"}
    assert decision.candidates[3] == "cold"


def test_nearly_full_kv_cache_counts_as_over_the_bound() -> None:
    key = KEYS[17]
    ws = [
        WorkerView("full", BASE, residency={key: Residency.DEVICE}, kv_fraction=0.95),
        WorkerView("roomy", BASE, residency={key: Residency.DISK}, kv_fraction=0.5),
        WorkerView("cold", BASE),
    ]
    assert choose(ws, BASE, key).candidates == ("roomy", *choose(ws[2:], BASE, key).candidates, "full")
    assert choose(ws, BASE, key, kv_full=0.99).candidates[0] == "full"
    # The bare model: a full cache goes last even with the shortest queue.
    bare = [WorkerView("full", BASE, kv_fraction=0.95), WorkerView("busy", BASE, load=1)]
    assert choose(bare, BASE, "").candidates == ("busy", "full")


def test_when_every_worker_is_over_the_bound_residency_still_orders_them() -> None:
    key = KEYS[19]
    ws = [
        WorkerView("a", BASE, kv_fraction=0.99),
        WorkerView("b", BASE, kv_fraction=0.99, residency={key: Residency.DEVICE}),
    ]
    decision = choose(ws, BASE, key)
    assert decision.candidates == ("b", "a") and decision.reason is Reason.RESIDENT


def test_least_loaded_ignores_residency_and_breaks_ties_by_hash() -> None:
    key = KEYS[21]
    ws = [
        WorkerView("dev", BASE, load=2, residency={key: Residency.DEVICE}),
        WorkerView("x", BASE, load=0),
        WorkerView("y", BASE, load=0),
        WorkerView("draining", BASE, accepting=False),
    ]
    d = least_loaded(ws, BASE, key)
    assert d.candidates[2] == "dev" and set(d.candidates[:2]) == {"x", "y"}
    assert d.reason is Reason.LEAST_LOADED
    assert least_loaded(list(reversed(ws)), BASE, key).candidates == d.candidates
    # Ties go to different workers for different adapters.
    firsts = {least_loaded(ws[1:3], BASE, k).candidates[0] for k in KEYS[:20]}
    assert firsts == {"x", "y"}


def test_round_robin_rotates_over_the_live_workers() -> None:
    ws = [WorkerView(i, BASE) for i in ("c", "a", "b")] + [WorkerView("z", BASE, accepting=False)]
    firsts = [round_robin(ws, BASE, turn).candidates[0] for turn in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert round_robin(ws, BASE, 1).candidates == ("b", "c", "a")
    assert round_robin(ws, "base-b", 0).reason is Reason.NO_WORKER


def test_route_dispatches_on_the_policy_kind_and_the_settings_know_every_kind() -> None:
    key = KEYS[23]
    ws = [WorkerView("a", BASE, load=1, residency={key: Residency.DEVICE}), WorkerView("b", BASE)]
    assert route(PolicyKind.AFFINITY, ws, BASE, key).reason is Reason.RESIDENT
    assert route(PolicyKind.LEAST_LOADED, ws, BASE, key).candidates[0] == "b"
    assert route(PolicyKind.ROUND_ROBIN, ws, BASE, key, turn=1).candidates[0] == "b"
    assert tuple(k.value for k in PolicyKind) == ROUTER_POLICIES
    assert DEFAULT_ROUTE_LOAD_EPS == DEFAULT_LOAD_EPS
