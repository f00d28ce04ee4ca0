"""Pushed worker state: a snapshot, then deltas and heartbeats in seq order; gaps and silence."""

from __future__ import annotations

import pytest

from loraplex.v1 import common_pb2, worker_pb2
from services.router.policy import Residency
from services.router.worker_state import PushedState, StateOutOfSync

STALE_S = 3.0
D1, D2, D3 = (f"sha256:{i:064x}" for i in (1, 2, 3))


def adapter(digest: str, tier: common_pb2.AdapterTier.ValueType) -> worker_pb2.ResidentAdapter:
    return worker_pb2.ResidentAdapter(digest=digest, adapter_id=f"id-{digest[-1]}", tier=tier)


def snapshot(seq: int = 1, **fields: object) -> worker_pb2.WatchStateResponse:
    state = worker_pb2.WorkerState(worker_id="w1", base_model="base", accepting=True)
    for key, value in fields.items():
        if key in ("adapters", "loading", "load_estimates"):
            getattr(state, key).extend(value)  # type: ignore[call-overload]
        else:
            setattr(state, key, value)
    return worker_pb2.WatchStateResponse(seq=seq, snapshot=state)


def delta(seq: int, **fields: object) -> worker_pb2.WatchStateResponse:
    return worker_pb2.WatchStateResponse(seq=seq, delta=worker_pb2.WorkerStateDelta(**fields))  # type: ignore[arg-type]


def heartbeat(seq: int) -> worker_pb2.WatchStateResponse:
    msg = worker_pb2.WatchStateResponse(seq=seq)
    msg.heartbeat.GetCurrentTime()
    return msg


def test_snapshot_sets_residency_by_digest_with_tier_and_load() -> None:
    s = PushedState("w1")
    assert not s.live(0.0, STALE_S)
    s.apply(
        snapshot(
            adapters=[
                adapter(D1, common_pb2.ADAPTER_TIER_DEVICE),
                adapter(D2, common_pb2.ADAPTER_TIER_HOST),
                adapter(D3, common_pb2.ADAPTER_TIER_OBJECT_STORE),
            ],
            loading=[D3],
            queue_depth=2,
            running=3,
            kv_blocks_used=30,
            kv_blocks_total=40,
            load_estimates=[worker_pb2.TierLoadEstimate(tier=common_pb2.ADAPTER_TIER_DISK, p50_ms=12.5)],
        ),
        now=10.0,
    )
    assert s.residency == {D1: Residency.DEVICE, D2: Residency.HOST}  # object store = cold
    assert s.loading == {D3}
    assert (s.base_model, s.seq, s.load(0), s.kv_fraction) == ("base", 1, 5, 0.75)
    assert s.load_estimates_ms == {Residency.DISK: 12.5}
    assert s.routable(10.0, STALE_S)


def test_deltas_upsert_remove_and_replace_the_scalars() -> None:
    s = PushedState("w1")
    s.apply(snapshot(adapters=[adapter(D1, common_pb2.ADAPTER_TIER_DISK)], kv_blocks_total=10), now=0.0)
    s.apply(
        delta(
            2,
            upserted=[adapter(D1, common_pb2.ADAPTER_TIER_DEVICE), adapter(D2, common_pb2.ADAPTER_TIER_DISK)],
            loading=[D3],
            queue_depth=1,
            running=1,
            kv_blocks_used=9,
            accepting=True,
        ),
        now=0.5,
    )
    assert s.residency == {D1: Residency.DEVICE, D2: Residency.DISK} and s.loading == {D3}
    s.apply(delta(3, removed=[D1], loading=[], accepting=False), now=1.0)
    assert s.residency == {D2: Residency.DISK} and not s.loading
    assert (s.load(0), s.kv_blocks_used) == (0, 0)
    # Draining: live (it talks) but not routable.
    assert s.live(1.0, STALE_S) and not s.routable(1.0, STALE_S)


def test_a_seq_gap_desyncs_until_the_next_snapshot() -> None:
    s = PushedState("w1")
    s.apply(snapshot(), now=0.0)
    s.apply(heartbeat(2), now=1.0)
    with pytest.raises(StateOutOfSync, match="skipped from seq 2 to 4"):
        s.apply(delta(4, accepting=True), now=1.1)
    assert not s.routable(1.1, STALE_S)
    with pytest.raises(StateOutOfSync, match="before its snapshot"):
        s.apply(delta(5, accepting=True), now=1.2)
    s.apply(snapshot(seq=1), now=1.3)  # the resubscribed stream starts over
    assert s.routable(1.3, STALE_S)


def test_silence_past_the_stale_limit_takes_the_worker_out_and_any_message_brings_it_back() -> None:
    s = PushedState("w1")
    s.apply(snapshot(), now=0.0)
    assert s.routable(STALE_S, STALE_S)
    assert not s.routable(STALE_S + 0.01, STALE_S)
    s.apply(heartbeat(2), now=4.0)
    assert s.routable(4.0, STALE_S)
    s.disconnect()  # the stream broke
    assert not s.routable(4.0, STALE_S)


def test_a_snapshot_from_another_worker_at_the_address_is_refused() -> None:
    s = PushedState("w2")
    with pytest.raises(StateOutOfSync, match="now 'w1'"):
        s.apply(snapshot(), now=0.0)
    assert not s.synced


def test_requests_sent_since_the_last_update_count_until_the_worker_reports() -> None:
    s = PushedState("w1")
    s.apply(snapshot(queue_depth=1, running=2), now=0.0)
    first = s.note_dispatched()
    s.note_dispatched()
    third = s.note_dispatched()
    assert s.load(in_flight=3) == 6
    s.note_finished(third)  # ended before any update: the worker never counted it
    assert s.load(in_flight=2) == 5
    s.apply(delta(2, queue_depth=2, running=3, accepting=True), now=0.1)
    assert s.load(in_flight=2) == 5
    s.note_finished(first)  # ended after the worker reported it: the next update drops it
    assert s.load(in_flight=1) == 5
    # A worker that reports nothing (or lags) still carries this router's own streams.
    assert PushedState("w9").load(in_flight=4) == 4
