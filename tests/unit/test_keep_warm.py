"""Keep-warm planning: prefetch READY keep-warm adapters no live worker has on its device, to the
worker requests would go to; eviction hints for archived content no READY version uses."""

from __future__ import annotations

from loraplex.v1 import common_pb2, registry_pb2
from services.router.keep_warm import Eviction, KeepWarmBook, Prefetch, plan_evictions, plan_prefetches
from services.router.policy import Residency, WorkerView, choose

BASE = "base-a"
D1, D2, D3 = (f"sha256:{i:064x}" for i in (1, 2, 3))
READY, ARCHIVED = common_pb2.ADAPTER_STATUS_READY, common_pb2.ADAPTER_STATUS_ARCHIVED


def adapter(adapter_id: str, digest: str, status: int, keep_warm: bool = False) -> registry_pb2.Adapter:
    ref = common_pb2.AdapterRef(
        adapter_id=adapter_id,
        name=f"n-{adapter_id}",
        version=1,
        digest=digest,
        base_model=BASE,
        keep_warm=keep_warm,
    )
    return registry_pb2.Adapter(ref=ref, status=status)  # type: ignore[arg-type]


def plan(
    workers: list[WorkerView], sent: dict[str, float] | None = None, now: float = 100.0
) -> list[Prefetch]:
    return plan_prefetches([(D1, BASE), (D2, BASE)], workers, sent or {}, now, retry_s=30.0, limit=10)


def test_book_keeps_ready_keep_warm_versions_and_forgets_them_when_archived() -> None:
    book = KeepWarmBook()
    book.apply(adapter("a1", D1, READY, keep_warm=True))
    book.apply(adapter("a2", D2, READY))
    book.apply(adapter("a3", D3, common_pb2.ADAPTER_STATUS_VALIDATING, keep_warm=True))
    refs = book.warm_refs()
    assert list(refs) == [D1] and refs[D1].keep_warm and refs[D1].adapter_id == "a1"
    assert book.pending_evictions() == []
    book.apply(adapter("a1", D1, ARCHIVED, keep_warm=True))
    assert book.warm_refs() == {}
    assert book.pending_evictions() == [D1]
    assert book.pending_evictions() == [D1]  # pending until no worker holds it
    book.evicted(D1)
    assert book.pending_evictions() == []


def test_archived_content_still_used_by_a_ready_version_is_not_evicted() -> None:
    book = KeepWarmBook()
    book.apply(adapter("a1", D1, READY))
    book.apply(adapter("b1", D1, READY))  # another tenant uploaded the same files
    book.apply(adapter("a1", D1, ARCHIVED))
    assert book.pending_evictions() == []
    book.apply(adapter("b1", D1, ARCHIVED))
    assert book.pending_evictions() == [D1]
    book.evicted(D1)
    # Archived then READY again under another id before a tick: nothing to evict.
    book.apply(adapter("c1", D2, ARCHIVED))
    book.apply(adapter("c2", D2, READY))
    assert book.pending_evictions() == []


def test_prefetch_goes_to_the_home_when_no_live_worker_has_it_on_device() -> None:
    ws = [WorkerView(f"w{i}", BASE) for i in range(3)]
    assert plan(ws) == [
        Prefetch(D1, BASE, choose(ws, BASE, D1).candidates[0]),
        Prefetch(D2, BASE, choose(ws, BASE, D2).candidates[0]),
    ]


def test_on_device_or_loading_anywhere_live_means_nothing_to_do() -> None:
    ws = [
        WorkerView("w0", BASE, residency={D1: Residency.DEVICE}),
        WorkerView("w1", BASE, loading=frozenset({D2})),
    ]
    assert plan(ws) == []
    # On device only on a worker out of routing does not count.
    ws[0] = WorkerView("w0", BASE, accepting=False, residency={D1: Residency.DEVICE})
    assert [p.digest for p in plan(ws)] == [D1] and plan(ws)[0].worker_id == "w1"


def test_a_worker_holding_it_on_host_or_disk_is_preferred_to_the_home() -> None:
    ws = [WorkerView(f"w{i}", BASE) for i in range(4)]
    home = choose(ws, BASE, D1).candidates[0]
    other = next(w.worker_id for w in ws if w.worker_id != home)
    ws = [
        WorkerView(w.worker_id, BASE, residency={D1: Residency.HOST}) if w.worker_id == other else w
        for w in ws
    ]
    assert plan(ws)[0] == Prefetch(D1, BASE, other)


def test_recently_sent_prefetches_wait_for_the_retry_interval_and_the_limit_bounds_a_tick() -> None:
    ws = [WorkerView("w0", BASE)]
    assert [p.digest for p in plan(ws, {D1: 90.0})] == [D2]
    assert [p.digest for p in plan(ws, {D1: 60.0})] == [D1, D2]
    assert len(plan_prefetches([(D1, BASE), (D2, BASE)], ws, {}, 0.0, retry_s=1.0, limit=1)) == 1
    # No live worker of that base model: nothing to send anywhere.
    assert plan_prefetches([(D1, "base-b")], ws, {}, 0.0, retry_s=1.0, limit=5) == []


def test_eviction_hints_go_to_live_workers_holding_the_digest_in_memory() -> None:
    ws = [
        WorkerView("dev", BASE, residency={D1: Residency.DEVICE}),
        WorkerView("host", BASE, residency={D1: Residency.HOST}),
        WorkerView("disk", BASE, residency={D1: Residency.DISK}),
        WorkerView("gone", BASE, accepting=False, residency={D1: Residency.DEVICE}),
        WorkerView("none", BASE),
    ]
    assert plan_evictions([D1], ws) == ([Eviction(D1, "dev"), Eviction(D1, "host")], [])
    # The worker that is not live still holds it: the hint waits for it. Once none holds it, done.
    assert plan_evictions([D1], [ws[3]]) == ([], [])
    assert plan_evictions([D1, D2], ws[2:3]) == ([], [D1, D2])
