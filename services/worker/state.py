"""The worker's state as WatchState reports it: a full snapshot, and the delta between two of them."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.v1 import common_pb2, worker_pb2
from services.worker.adapters import AdapterLoader, HeldAdapter, Tier
from services.worker.engine.llm_engine import EngineStats

# How often a watcher looks for changes, and the longest silence before a heartbeat.
POLL_S = 0.25
HEARTBEAT_S = 2.0

_TIERS = {
    Tier.DEVICE: common_pb2.ADAPTER_TIER_DEVICE,
    Tier.HOST: common_pb2.ADAPTER_TIER_HOST,
    Tier.DISK: common_pb2.ADAPTER_TIER_DISK,
    Tier.OBJECT_STORE: common_pb2.ADAPTER_TIER_OBJECT_STORE,
}


def _timestamp(seconds: float) -> Timestamp | None:
    if seconds <= 0:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def resident_adapter(held: HeldAdapter) -> worker_pb2.ResidentAdapter:
    return worker_pb2.ResidentAdapter(
        digest=held.digest,
        adapter_id=held.adapter_id,
        tier=_TIERS[held.tier],
        size_bytes=held.size_bytes,
        last_used_at=_timestamp(held.last_used_at),
        in_flight=held.in_flight,
        pinned=held.pinned,
    )


def snapshot(
    worker_id: str, base_model: str, loader: AdapterLoader, stats: EngineStats, *, accepting: bool
) -> worker_pb2.WorkerState:
    """Built from one policy snapshot (cheap: no I/O, no engine call)."""
    held, loading = loader.view()
    return worker_pb2.WorkerState(
        worker_id=worker_id,
        base_model=base_model,
        adapters=[resident_adapter(h) for h in held],
        loading=loading,
        queue_depth=stats.waiting,
        running=stats.running,
        kv_blocks_used=stats.kv_blocks_used,
        kv_blocks_total=stats.kv_blocks_total,
        load_estimates=[
            worker_pb2.TierLoadEstimate(tier=_TIERS[tier], p50_ms=e.ms, samples=e.samples)
            for tier, e in loader.estimates.items()
            if e.samples
        ],
        accepting=accepting,
    )


def _identity(a: worker_pb2.ResidentAdapter) -> tuple[object, ...]:
    # last_used_at moves with every request; it alone is not worth a message.
    return (a.adapter_id, a.tier, a.size_bytes, a.in_flight, a.pinned)


def diff(before: worker_pb2.WorkerState, after: worker_pb2.WorkerState) -> worker_pb2.WorkerStateDelta | None:
    """What changed from `before` to `after`; None when nothing a router acts on did."""
    old = {a.digest: a for a in before.adapters}
    new = {a.digest: a for a in after.adapters}
    upserted = [a for d, a in new.items() if d not in old or _identity(old[d]) != _identity(a)]
    removed = [d for d in old if d not in new]
    scalars = ("queue_depth", "running", "kv_blocks_used", "accepting")
    changed = (
        upserted
        or removed
        or list(before.loading) != list(after.loading)
        or any(getattr(before, f) != getattr(after, f) for f in scalars)
    )
    if not changed:
        return None
    return worker_pb2.WorkerStateDelta(
        upserted=upserted,
        removed=removed,
        loading=list(after.loading),
        queue_depth=after.queue_depth,
        running=after.running,
        kv_blocks_used=after.kv_blocks_used,
        accepting=after.accepting,
    )
