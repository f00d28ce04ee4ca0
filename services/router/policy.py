"""Which workers may serve a request, best first (DESIGN §5). Pure: no gRPC, no clocks, no I/O.

Only *live* workers of the request's base model are candidates (`WorkerView.accepting`: the worker
pushed its state recently, is not draining and is not cooling down after a failure).

`affinity` (the default), for a request with an adapter:
1. Workers holding the adapter (device > host > disk; a worker loading it counts as disk), unless
   that worker is *over the bound*; among equal tiers the rendezvous order below (home first), so
   a copy that spilled elsewhere does not pull its adapter's traffic away from home.
2. Otherwise the adapter's *home*: rendezvous (highest-random-weight) hashing of the adapter key
   over the workers, skipping homes over the bound. A cold adapter therefore lands on the same
   worker every time (one cold load, not one per worker), and removing a worker moves only the
   adapters whose home it was.
3. Every other live worker, in the same rendezvous order (those over the bound last), as failover
   candidates.

Over the bound: load >= ceil((1 + eps) x average load) (consistent hashing with bounded loads), or
KV cache more than `kv_full` used (a nearly full cache means preemption, whatever the queue says).
eps defaults to 1 (up to twice the average), not the 0.25 usual for caches: a worker runs its
requests in one continuous batch, so one more request there costs a share of a step, while a
spill costs a cold load and evicts another adapter; at a few requests per worker a tight bound
spills the busiest adapters on almost every request (bench/routing.py measures both).
If every worker is over the bound, the bound is ignored and the order above applies to all.

Requests for the bare base model have no home: fewest queued + running first.

Baselines for benchmarks: `least_loaded` (fewest queued + running, ties by rendezvous hash) and
`round_robin` (rotate over the live workers), both blind to residency.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class Residency(enum.IntEnum):
    """How fast a worker can use an adapter; lower is better."""

    DEVICE = 0
    HOST = 1
    DISK = 2
    COLD = 3


class PolicyKind(enum.StrEnum):
    AFFINITY = "affinity"
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"


@dataclass(frozen=True)
class WorkerView:
    """What the router knows about one worker when it routes."""

    worker_id: str
    base_model: str
    # Requests waiting or running there (reported by the worker plus the router's own not yet reported).
    load: int = 0
    accepting: bool = True
    # adapter key (content digest) -> the fastest tier holding it; absent means cold / unknown.
    residency: Mapping[str, Residency] = field(default_factory=dict)
    # Digests the worker is loading now.
    loading: frozenset[str] = frozenset()
    # Fraction of the KV cache in use, 0..1.
    kv_fraction: float = 0.0

    def tier_of(self, key: str) -> Residency:
        tier = self.residency.get(key, Residency.COLD)
        if tier is Residency.COLD and key in self.loading:
            return Residency.DISK
        return tier


class Reason(enum.StrEnum):
    """Why the first candidate was chosen (a metric label)."""

    RESIDENT = "resident"
    HOME = "home"
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"
    NO_WORKER = "no_worker"


@dataclass(frozen=True)
class Decision:
    candidates: tuple[str, ...]  # worker ids, best first
    reason: Reason


DEFAULT_LOAD_EPS = 1.0
DEFAULT_KV_FULL = 0.9


def hrw_weight(key: str, worker_id: str) -> int:
    """Rendezvous weight of (key, worker): stable across processes and restarts."""
    digest = hashlib.blake2b(f"{key}\x00{worker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def load_bound(workers: Sequence[WorkerView], eps: float) -> float:
    """The most load a worker may carry and still take new requests by preference.

    ceil((1+eps) x average load after adding this request), as in consistent hashing with bounded
    loads (Mirrokni et al.): with eps > 0 some worker is always under the bound.
    """
    if not workers:
        return 0.0
    average = (sum(w.load for w in workers) + 1) / len(workers)
    return float(math.ceil((1.0 + eps) * average))


def rendezvous_order(key: str, workers: Sequence[WorkerView]) -> list[WorkerView]:
    return sorted(workers, key=lambda w: (-hrw_weight(key, w.worker_id), w.worker_id))


def live_workers(workers: Sequence[WorkerView], base_model: str) -> list[WorkerView]:
    return [w for w in workers if w.accepting and w.base_model == base_model]


def choose(
    workers: Sequence[WorkerView],
    base_model: str,
    adapter_key: str,
    *,
    eps: float = DEFAULT_LOAD_EPS,
    kv_full: float = DEFAULT_KV_FULL,
) -> Decision:
    """`affinity`: candidates for one request on `base_model` with adapter `adapter_key` ("" = none)."""
    live = live_workers(workers, base_model)
    if not live:
        return Decision((), Reason.NO_WORKER)
    bound = load_bound(live, eps)

    def over(w: WorkerView) -> bool:
        return w.load >= bound or w.kv_fraction > kv_full

    if not adapter_key:
        ordered = sorted(live, key=lambda w: (over(w), w.load, hrw_weight(base_model, w.worker_id)))
        return Decision(_ids(ordered), Reason.LEAST_LOADED)

    hashed = rendezvous_order(adapter_key, live)
    under = [w for w in hashed if not over(w)]
    if not under:  # everyone is busy: rank them all as if none were
        under = hashed
    in_under = {w.worker_id for w in under}
    rest_over = [w for w in hashed if w.worker_id not in in_under]
    # sorted() is stable: equal tiers keep the rendezvous order.
    resident = sorted(
        (w for w in under if w.tier_of(adapter_key) < Residency.COLD), key=lambda w: w.tier_of(adapter_key)
    )
    first = resident or under[:1]
    taken = {w.worker_id for w in first}
    rest = [w for w in (*under, *rest_over) if w.worker_id not in taken]
    return Decision(_ids([*first, *rest]), Reason.RESIDENT if resident else Reason.HOME)


def least_loaded(workers: Sequence[WorkerView], base_model: str, adapter_key: str) -> Decision:
    """Baseline: fewest queued + running first, ties by rendezvous hash of the adapter (or model)."""
    live = live_workers(workers, base_model)
    if not live:
        return Decision((), Reason.NO_WORKER)
    key = adapter_key or base_model
    ordered = sorted(live, key=lambda w: (w.load, -hrw_weight(key, w.worker_id), w.worker_id))
    return Decision(_ids(ordered), Reason.LEAST_LOADED)


def round_robin(workers: Sequence[WorkerView], base_model: str, turn: int) -> Decision:
    """Baseline: the live workers by id, rotated by `turn` (the caller's request counter)."""
    live = sorted(live_workers(workers, base_model), key=lambda w: w.worker_id)
    if not live:
        return Decision((), Reason.NO_WORKER)
    k = turn % len(live)
    return Decision(_ids([*live[k:], *live[:k]]), Reason.ROUND_ROBIN)


def route(
    kind: PolicyKind,
    workers: Sequence[WorkerView],
    base_model: str,
    adapter_key: str,
    *,
    turn: int = 0,
    eps: float = DEFAULT_LOAD_EPS,
    kv_full: float = DEFAULT_KV_FULL,
) -> Decision:
    if kind is PolicyKind.LEAST_LOADED:
        return least_loaded(workers, base_model, adapter_key)
    if kind is PolicyKind.ROUND_ROBIN:
        return round_robin(workers, base_model, turn)
    return choose(workers, base_model, adapter_key, eps=eps, kv_full=kv_full)


def _ids(workers: Sequence[WorkerView]) -> tuple[str, ...]:
    return tuple(w.worker_id for w in workers)
