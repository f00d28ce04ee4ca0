"""Keep-warm planning: which adapters to prefetch where, and which to hint for eviction. Pure.

The registry's change feed (WatchAdapters) tells `KeepWarmBook` about every adapter version. Each
READY version registered with keep_warm should be on some live worker's device: `plan_prefetches`
picks, for each one that no live worker of its base model holds on its device (or is loading),
the worker the router would send its first request to (resident first, else its rendezvous home
under the load bound), so the prefetch and later traffic meet on the same worker.

When a version is archived and no other READY version shares its content digest, the workers
holding it may drop it: `plan_evictions` lists them (a hint; the worker keeps what is in use).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from loraplex.v1 import common_pb2, registry_pb2
from services.router.policy import (
    DEFAULT_KV_FULL,
    DEFAULT_LOAD_EPS,
    Residency,
    WorkerView,
    choose,
    live_workers,
)

MAX_PENDING_EVICTIONS = 10_000


@dataclass(frozen=True)
class Prefetch:
    digest: str
    base_model: str
    worker_id: str


@dataclass(frozen=True)
class Eviction:
    digest: str
    worker_id: str


class KeepWarmBook:
    """What the change feed said about adapters, as far as keep-warm and eviction hints need."""

    def __init__(self) -> None:
        self._ready: dict[str, str] = {}  # adapter version id -> digest, READY versions only
        self._ready_per_digest: Counter[str] = Counter()
        # adapter version id -> its ref (keep_warm set), READY keep-warm versions only
        self._warm: dict[str, common_pb2.AdapterRef] = {}
        self._evict: OrderedDict[str, None] = OrderedDict()

    def apply(self, adapter: registry_pb2.Adapter) -> None:
        ref = adapter.ref
        old = self._ready.pop(ref.adapter_id, None)
        if old is not None:
            self._ready_per_digest[old] -= 1
            if self._ready_per_digest[old] <= 0:
                del self._ready_per_digest[old]
        self._warm.pop(ref.adapter_id, None)
        if adapter.status == common_pb2.ADAPTER_STATUS_READY:
            self._ready[ref.adapter_id] = ref.digest
            self._ready_per_digest[ref.digest] += 1
            self._evict.pop(ref.digest, None)
            if ref.keep_warm:
                warm = common_pb2.AdapterRef()
                warm.CopyFrom(ref)
                self._warm[ref.adapter_id] = warm
        elif adapter.status == common_pb2.ADAPTER_STATUS_ARCHIVED and not self._ready_per_digest[ref.digest]:
            self._evict[ref.digest] = None
            if len(self._evict) > MAX_PENDING_EVICTIONS:
                self._evict.popitem(last=False)

    def warm_refs(self) -> dict[str, common_pb2.AdapterRef]:
        """digest -> ref (keep_warm=true) of every READY keep-warm version."""
        return {ref.digest: ref for ref in self._warm.values()}

    def pending_evictions(self) -> list[str]:
        """Archived digests whose content no READY version uses, oldest first: hinted every tick
        until no worker reports them in memory (a hint can fail, be refused while in use, or wait
        for a worker that is not live now)."""
        return list(self._evict)

    def evicted(self, digest: str) -> None:
        self._evict.pop(digest, None)


def plan_prefetches(
    targets: Iterable[tuple[str, str]],
    workers: Sequence[WorkerView],
    last_sent: Mapping[str, float],
    now: float,
    *,
    retry_s: float,
    limit: int,
    eps: float = DEFAULT_LOAD_EPS,
    kv_full: float = DEFAULT_KV_FULL,
) -> list[Prefetch]:
    """Prefetches for (digest, base model) targets not on any live worker's device.

    A digest prefetched within `retry_s` is left alone (the worker is loading it, or failed to and
    should not be asked every tick); at most `limit` prefetches per call.
    """
    plan: list[Prefetch] = []
    for digest, base_model in sorted(set(targets), key=lambda t: (t[1], t[0])):
        if len(plan) >= limit:
            break
        live = live_workers(workers, base_model)
        if not live or now - last_sent.get(digest, float("-inf")) < retry_s:
            continue
        if any(w.residency.get(digest) is Residency.DEVICE or digest in w.loading for w in live):
            continue
        # The same choice a request would make, so the adapter is warm where its traffic goes.
        first = choose(live, base_model, digest, eps=eps, kv_full=kv_full).candidates[0]
        plan.append(Prefetch(digest, base_model, first))
    return plan


def plan_evictions(digests: Iterable[str], workers: Sequence[WorkerView]) -> tuple[list[Eviction], list[str]]:
    """EvictAdapter calls for the live workers holding these digests in memory (device or host),
    and the digests no worker at all holds any more (their hints are done)."""
    calls: list[Eviction] = []
    done: list[str] = []
    for d in digests:
        holders = [w for w in workers if _in_memory(w, d)]
        if not holders:
            done.append(d)
        calls += [Eviction(d, w.worker_id) for w in holders if w.accepting]
    return calls, done


def _in_memory(w: WorkerView, digest: str) -> bool:
    return w.residency.get(digest, Residency.COLD) <= Residency.HOST or digest in w.loading
