"""The usage spool on real files: what was appended survives restarts and kills, torn tails are
ignored, and only acknowledged segments disappear."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraplex.v1 import common_pb2, usage_pb2
from services.router.spool import Spool, encode_frame, read_segment

REPO = Path(__file__).resolve().parents[2]


def record(i: int) -> bytes:
    return usage_pb2.UsageRecord(
        request_id=f"req-{i}", tenant_id="t", usage=common_pb2.Usage(input_tokens=3, output_tokens=i)
    ).SerializeToString()


def replay(directory: Path) -> list[bytes]:
    spool = Spool(directory, max_bytes=1 << 30)
    out: list[bytes] = []
    for seg in spool.seal():
        out.extend(read_segment(seg).records)
    return out


def test_appended_records_replay_in_order_after_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.append_many([record(0), record(1)])
    spool.append_many([record(2)])
    spool.close()
    assert replay(tmp_path) == [record(0), record(1), record(2)]


def test_records_are_protobuf_frames_with_length_and_crc(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.append_many([record(7)])
    (segment,) = spool.seal()
    assert segment.read_bytes() == encode_frame(record(7))
    assert usage_pb2.UsageRecord.FromString(read_segment(segment).records[0]).request_id == "req-7"


def test_torn_last_record_is_ignored_and_earlier_ones_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.append_many([record(1), record(2), record(3)])
    (segment,) = spool.seal()
    data = segment.read_bytes()
    segment.write_bytes(data[:-5])
    contents = read_segment(segment)
    assert contents.records == [record(1), record(2)]
    assert contents.torn_bytes == len(encode_frame(record(3))) - 5


def test_corrupt_record_stops_the_read_at_the_bad_crc(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.append_many([record(1), record(2)])
    (segment,) = spool.seal()
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert read_segment(segment).records == [record(1)]


def test_restart_never_appends_after_a_torn_tail(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.append_many([record(1), record(2)])
    (segment,) = spool.seal()
    segment.write_bytes(segment.read_bytes()[:-3])
    restarted = Spool(tmp_path, max_bytes=1 << 30)
    restarted.append_many([record(9)])
    assert replay(tmp_path) == [record(1), record(9)]


def test_delete_after_ack_removes_only_that_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.append_many([record(1)])
    first = spool.seal()
    spool.append_many([record(2)])
    both = spool.seal()
    assert both[0] == first[0] and len(both) == 2
    spool.delete(both[0])
    assert spool.size_bytes == len(encode_frame(record(2)))
    assert replay(tmp_path) == [record(2)]
    with pytest.raises(ValueError, match="not a sealed segment"):
        spool.delete(both[0])


def test_fsync_runs_before_append_returns_and_a_failed_fsync_is_an_error(tmp_path: Path) -> None:
    synced: list[int] = []
    spool = Spool(tmp_path, max_bytes=1 << 30, fsync=lambda fd: synced.append(os.fstat(fd).st_size))
    spool.append_many([record(1)])
    # The directory (new segment entry) and then the segment file, with the record in it.
    assert synced[-1] == len(encode_frame(record(1)))

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    broken = Spool(tmp_path / "b", max_bytes=1 << 30, fsync=failing)
    with pytest.raises(OSError):
        broken.append_many([record(2)])


def test_full_spool_is_reported_but_still_accepts_admitted_records(tmp_path: Path) -> None:
    frame = len(encode_frame(record(1)))
    spool = Spool(tmp_path, max_bytes=frame * 2)
    spool.append_many([record(1)])
    assert not spool.full
    spool.append_many([record(2), record(3)])
    assert spool.full
    assert replay(tmp_path) == [record(1), record(2), record(3)]


def test_segments_roll_over_at_their_size_limit(tmp_path: Path) -> None:
    frame = len(encode_frame(record(1)))
    spool = Spool(tmp_path, max_bytes=1 << 30, segment_bytes=frame * 2)
    spool.append_many([record(i) for i in range(1, 3)])
    spool.append_many([record(3)])
    segments = spool.seal()
    assert len(segments) == 2
    assert [len(read_segment(s).records) for s in segments] == [2, 1]


def test_records_survive_sigkill_of_the_writer(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from services.router.spool import Spool
        spool = Spool(Path({str(tmp_path)!r}), max_bytes=1 << 30)
        i = 0
        while True:
            spool.append_many([b"x" * (i % 300) + str(i).encode()])
            print(i, flush=True)
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acknowledged = -1
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= 200:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    records = replay(tmp_path)
    # Every record whose append returned is there, intact and in order (later ones may be too).
    assert len(records) >= acknowledged + 1
    for i, payload in enumerate(records):
        assert payload == b"x" * (i % 300) + str(i).encode()


def test_a_torn_segment_is_truncated_to_its_last_good_record_on_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.append_many([record(1), record(2)])
    (segment,) = spool.seal()
    good = segment.stat().st_size
    segment.write_bytes(segment.read_bytes() + encode_frame(record(3))[:-4])  # killed mid-write
    Spool(tmp_path, max_bytes=1 << 30)
    assert segment.stat().st_size == good
    assert read_segment(segment).torn_bytes == 0


def test_a_failed_write_is_cut_off_before_the_next_append_so_later_records_stay_readable(
    tmp_path: Path,
) -> None:
    frame = len(encode_frame(record(1)))
    spool = Spool(tmp_path, max_bytes=1 << 30)
    spool.append_many([record(1)])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        # The disk fills up halfway through the next write: part of a frame lands in the segment.
        resource.setrlimit(resource.RLIMIT_FSIZE, (frame + frame // 2, hard))
        with pytest.raises(OSError):
            spool.append_many([record(2), record(3)])
        assert spool.failing
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    spool.append_many([record(4)])  # space again
    assert not spool.failing
    # The torn bytes were cut off: record 4 follows record 1 and is readable.
    assert replay(tmp_path) == [record(1), record(4)]


def test_probe_reports_whether_the_spool_can_write_again(tmp_path: Path) -> None:
    broken = True

    def fsync(fd: int) -> None:
        if broken:
            raise OSError(28, "No space left on device")

    spool = Spool(tmp_path, max_bytes=1 << 30, fsync=fsync)
    with pytest.raises(OSError):
        spool.append_many([record(1)])
    assert spool.failing and not spool.probe() and spool.failing
    broken = False
    assert spool.probe() and not spool.failing
    assert not (tmp_path / "probe.tmp").exists()
    spool.append_many([record(2)])
    assert replay(tmp_path) == [record(2)]
