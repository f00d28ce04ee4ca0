"""Which workers may serve a request, best first (DESIGN §5). Pure: no gRPC, no clocks, no I/O.

Order of preference:
1. Workers where the adapter is resident (device > host > disk), fewer waiting requests first,
   unless that worker is over the load bound.
2. The adapter's *home*: rendezvous (highest-random-weight) hashing of the adapter key over the
   workers, skipping any home whose load exceeds (1 + eps) x the average. A cold adapter therefore
   lands on the same worker every time (one cold load, not one per worker), and removing a worker
   moves only the adapters whose home it was.
3. Every other live worker, in the same rendezvous order, as failover candidates.

Requests for the bare base model have no home: the least loaded worker goes first.
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


@dataclass(frozen=True)
class WorkerView:
    """What the router knows about one worker when it routes."""

    worker_id: str
    base_model: str
    # Requests waiting or running there (reported by the worker plus the router's own in-flight).
    load: int = 0
    accepting: bool = True
    # adapter key (content digest) -> the fastest tier holding it; absent means cold / unknown.
    residency: Mapping[str, Residency] = field(default_factory=dict)


class Reason(enum.StrEnum):
    """Why the first candidate was chosen (a metric label)."""

    RESIDENT = "resident"
    HOME = "home"
    LEAST_LOADED = "least_loaded"
    NO_WORKER = "no_worker"


@dataclass(frozen=True)
class Decision:
    candidates: tuple[str, ...]  # worker ids, best first
    reason: Reason


DEFAULT_LOAD_EPS = 0.25


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


def choose(
    workers: Sequence[WorkerView],
    base_model: str,
    adapter_key: str,
    *,
    eps: float = DEFAULT_LOAD_EPS,
) -> Decision:
    """Candidates for one request on `base_model` with adapter `adapter_key` ("" = none)."""
    live = [w for w in workers if w.accepting and w.base_model == base_model]
    if not live:
        return Decision((), Reason.NO_WORKER)
    bound = load_bound(live, eps)
    if not adapter_key:
        ordered = sorted(live, key=lambda w: (w.load, hrw_weight(base_model, w.worker_id)))
        return Decision(tuple(w.worker_id for w in ordered), Reason.LEAST_LOADED)

    hashed = rendezvous_order(adapter_key, live)
    under = [w for w in hashed if w.load < bound]
    over = [w for w in hashed if w.load >= bound]
    resident = sorted(
        (w for w in under if w.residency.get(adapter_key, Residency.COLD) < Residency.COLD),
        key=lambda w: (w.residency[adapter_key], w.load),
    )
    first: list[WorkerView] = resident or under[:1]
    seen = {w.worker_id for w in first}
    rest = [w for w in (*under, *over) if w.worker_id not in seen]
    reason = Reason.RESIDENT if resident else Reason.HOME
    return Decision(tuple(w.worker_id for w in (*first, *rest)), reason)
