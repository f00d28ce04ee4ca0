"""WatchState deltas: exactly what changed between two snapshots, nothing for noise."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.v1 import common_pb2, worker_pb2
from services.worker.state import diff

DEVICE, DISK = common_pb2.ADAPTER_TIER_DEVICE, common_pb2.ADAPTER_TIER_DISK


def adapter(
    digest: str, tier: int = DEVICE, in_flight: int = 0, used_s: int = 1
) -> worker_pb2.ResidentAdapter:
    return worker_pb2.ResidentAdapter(
        digest=digest,
        tier=tier,  # type: ignore[arg-type]
        size_bytes=100,
        in_flight=in_flight,
        pinned=in_flight > 0,
        last_used_at=Timestamp(seconds=used_s),
    )


def state(*adapters: worker_pb2.ResidentAdapter, **fields: object) -> worker_pb2.WorkerState:
    base: dict[str, object] = {"queue_depth": 0, "running": 0, "kv_blocks_used": 0, "accepting": True}
    return worker_pb2.WorkerState(worker_id="w", adapters=adapters, **{**base, **fields})  # type: ignore[arg-type]


def test_no_delta_when_only_last_used_moved() -> None:
    assert diff(state(adapter("a", used_s=1)), state(adapter("a", used_s=9))) is None


def test_added_changed_and_removed_adapters_are_reported() -> None:
    before = state(adapter("a"), adapter("b"), adapter("gone"))
    after = state(adapter("a"), adapter("b", in_flight=2), adapter("new", tier=DISK))
    delta = diff(before, after)
    assert delta is not None
    assert sorted(a.digest for a in delta.upserted) == ["b", "new"]
    assert list(delta.removed) == ["gone"]
    assert next(a for a in delta.upserted if a.digest == "b").pinned


def test_scalar_changes_carry_the_new_values() -> None:
    delta = diff(state(), state(queue_depth=3, running=2, kv_blocks_used=17, accepting=False))
    assert delta is not None and not delta.upserted and not delta.removed
    assert (delta.queue_depth, delta.running, delta.kv_blocks_used, delta.accepting) == (3, 2, 17, False)


def test_loading_list_is_replaced_when_it_changes() -> None:
    delta = diff(state(loading=["x"]), state(loading=["x", "y"]))
    assert delta is not None and list(delta.loading) == ["x", "y"]
    assert diff(state(loading=["x"]), state(loading=["x"])) is None
