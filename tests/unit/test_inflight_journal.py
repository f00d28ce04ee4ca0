from pathlib import Path

from loraplex.v1 import common_pb2, usage_pb2
from services.router.inflight import InflightJournal

TENANT_A = "11111111-1111-1111-1111-111111111111"
TENANT_B = "22222222-2222-2222-2222-222222222222"


def _record(request_id: str, out: int, tenant_id: str = TENANT_A) -> usage_pb2.UsageRecord:
    return usage_pb2.UsageRecord(
        request_id=request_id, tenant_id=tenant_id, usage=common_pb2.Usage(input_tokens=3, output_tokens=out)
    )


def test_the_latest_checkpoint_of_each_open_stream_is_recovered(tmp_path: Path) -> None:
    journal = InflightJournal(tmp_path, fsync=lambda fd: None)
    journal.write(_record("a/../weird id", 1))
    journal.write(_record("a/../weird id", 7))
    journal.write(_record("b", 2))
    journal.discard(TENANT_A, "b")  # its final record made it to the spool
    recovered = InflightJournal(tmp_path).recover()
    assert [(r.request_id, r.usage.output_tokens) for r in recovered] == [("a/../weird id", 7)]
    assert all(p.parent == tmp_path for p in tmp_path.iterdir())  # client ids never become paths


def test_torn_and_unreadable_leftovers_are_dropped(tmp_path: Path) -> None:
    journal = InflightJournal(tmp_path, fsync=lambda fd: None)
    journal.write(_record("ok", 4))
    (tmp_path / "deadbeef.tmp").write_bytes(b"\x0a\x05ab")  # a write the crash interrupted
    (tmp_path / "cafe.inflight").write_bytes(b"\xff\xff\xff")
    recovered = journal.recover()
    assert [r.request_id for r in recovered] == ["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [next(tmp_path.glob("*.inflight")).name]


def test_checkpoints_are_due_at_the_first_token_then_every_interval(tmp_path: Path) -> None:
    journal = InflightJournal(tmp_path, interval_s=1.0)
    assert journal.due(0.0, 100.0)
    assert not journal.due(100.0, 100.5)
    assert journal.due(100.0, 101.0)


def test_two_tenants_streams_with_one_request_id_keep_separate_checkpoints(tmp_path: Path) -> None:
    journal = InflightJournal(tmp_path, fsync=lambda fd: None)
    journal.write(_record("same", 5, TENANT_A))
    journal.write(_record("same", 9, TENANT_B))
    # Tenant B's stream ends first: A's checkpoint must survive it.
    journal.discard(TENANT_B, "same")
    recovered = journal.recover()
    assert [(r.tenant_id, r.usage.output_tokens) for r in recovered] == [(TENANT_A, 5)]
