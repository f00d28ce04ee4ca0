"""The router's window of recent client-chosen request ids: pure, no clock but the one passed in."""

import time
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.v1 import usage_pb2
from services.router.request_ids import RecentRequests, Seen, remember_spooled
from services.router.spool import Spool

A, B = "tenant-a", "tenant-b"


def test_an_id_in_flight_or_finished_is_refused_and_nothing_changes() -> None:
    recent = RecentRequests(window_s=100)
    assert recent.claim((A, "r1"), now=0) is None
    assert recent.claim((A, "r1"), now=1) is Seen.IN_FLIGHT
    recent.finish((A, "r1"), finished_at=2, now=2)
    assert recent.claim((A, "r1"), now=3) is Seen.FINISHED
    assert recent.seen((A, "r1"), now=3) is Seen.FINISHED


def test_ids_belong_to_their_tenant() -> None:
    recent = RecentRequests(window_s=100)
    assert recent.claim((A, "shared"), now=0) is None
    assert recent.claim((B, "shared"), now=0) is None
    recent.finish((A, "shared"), finished_at=0, now=0)
    recent.release((B, "shared"))
    assert recent.seen((B, "shared"), now=1) is None
    assert recent.seen((A, "shared"), now=1) is Seen.FINISHED


def test_a_released_id_may_be_retried() -> None:
    recent = RecentRequests(window_s=100)
    assert recent.claim((A, "retry"), now=0) is None
    recent.release((A, "retry"))  # refused before any worker ran it
    assert recent.claim((A, "retry"), now=1) is None


def test_finished_ids_leave_after_the_window() -> None:
    recent = RecentRequests(window_s=10)
    recent.claim((A, "old"), now=0)
    recent.finish((A, "old"), finished_at=0, now=0)
    recent.claim((A, "new"), now=5)
    recent.finish((A, "new"), finished_at=5, now=5)
    assert recent.seen((A, "old"), now=10) is Seen.FINISHED  # the window includes its edge
    assert recent.seen((A, "old"), now=10.5) is None
    assert recent.seen((A, "new"), now=10.5) is Seen.FINISHED
    assert len(recent) == 1


def test_a_record_older_than_the_window_is_not_entered() -> None:
    recent = RecentRequests(window_s=10)
    recent.finish((A, "ancient"), finished_at=0, now=50)  # e.g. read back from an old spool
    assert recent.seen((A, "ancient"), now=50) is None and len(recent) == 0


def test_in_flight_ids_never_expire_and_the_finished_set_is_bounded() -> None:
    recent = RecentRequests(window_s=10, max_finished=3)
    recent.claim((A, "long"), now=0)
    for i in range(5):
        recent.claim((A, f"f{i}"), now=i)
        recent.finish((A, f"f{i}"), finished_at=i, now=i)
    assert [recent.seen((A, f"f{i}"), now=5) for i in range(5)] == [None, None] + [Seen.FINISHED] * 3
    assert recent.seen((A, "long"), now=1000) is Seen.IN_FLIGHT
    assert len(recent) == 1


def test_the_window_and_bound_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RecentRequests(window_s=0)
    with pytest.raises(ValueError):
        RecentRequests(max_finished=0)


def test_records_waiting_in_the_spool_are_remembered_after_a_restart(tmp_path: Path) -> None:
    """Ids not yet shipped are unknown to the registry: a restarted router learns them from its spool."""
    now = time.time()

    def spooled(tenant: str, rid: str, finished_at: float) -> bytes:
        ts = Timestamp()
        ts.FromNanoseconds(int(finished_at * 1e9))
        return usage_pb2.UsageRecord(tenant_id=tenant, request_id=rid, finished_at=ts).SerializeToString()

    spool = Spool(tmp_path, max_bytes=1 << 20, fsync=lambda fd: None)
    spool.append_many([spooled(A, "r1", now - 5), spooled(B, "r2", now - 2 * 86_400), b"\xff not a record"])
    spool.close()
    recent = RecentRequests(window_s=86_400)
    assert remember_spooled(Spool(tmp_path, max_bytes=1 << 20), recent) == 2
    assert recent.seen((A, "r1"), now) is Seen.FINISHED
    assert recent.seen((B, "r1"), now) is None
    assert recent.seen((B, "r2"), now) is None  # older than the window
