"""A durable, append-only spool of usage records: plain files, no gRPC, no database.

Layout: `<dir>/seg-<20-digit sequence>.log`, each a run of records framed as

    u32 little-endian payload length | u32 little-endian CRC-32 of the payload | payload

where the payload is a serialized `UsageRecord` (protobuf bytes; nothing is ever pickled). A record
counts as written only once `append_many` returned, i.e. after the segment's fsync. A process
killed mid-write leaves at most one torn record at the tail of its last segment: on start the
spool truncates every segment to its last good record (so a torn frame is never followed by
anything), and a restarted writer always starts a new segment. A write that fails in a running
process (disk full, I/O error) is cut off the segment the same way before anything else is
appended, and the spool reports `failing` until a write succeeds again.

The shipper `seal()`s the active segment, ships the sealed ones oldest first and `delete()`s a
segment only after the registry acknowledged every record in it. A crash between the ack and the
delete replays records the ledger already holds; it ignores them (idempotent on (tenant, request id)).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from services.common.private_files import open_private, private_dir

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
# A frame longer than this is corruption, not a record (UsageRecords are a few hundred bytes).
MAX_RECORD_BYTES = 1 << 20
DEFAULT_SEGMENT_BYTES = 4 << 20
_PREFIX, _SUFFIX = "seg-", ".log"
# Records the registry rejected as invalid, kept (same framing) for an operator to look at.
QUARANTINE = "rejected.log"


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"a spool record is at most {MAX_RECORD_BYTES} bytes, got {len(payload)}")
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class SegmentContents:
    records: list[bytes]
    # Bytes after the last good record (a torn or corrupt tail); 0 for a clean segment.
    torn_bytes: int


def read_segment(path: Path) -> SegmentContents:
    """Every intact record of a segment, stopping at the first torn or corrupt frame."""
    data = path.read_bytes()
    records: list[bytes] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + length
        if length > MAX_RECORD_BYTES or end > len(data):
            break
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            break
        records.append(payload)
        offset = end
    torn = len(data) - offset
    if torn:
        log.warning("spool segment %s: ignoring %d bytes of torn or corrupt tail", path.name, torn)
    return SegmentContents(records, torn)


def _segment_name(seq: int) -> str:
    return f"{_PREFIX}{seq:020d}{_SUFFIX}"


def _segment_seq(path: Path) -> int | None:
    name = path.name
    if not (name.startswith(_PREFIX) and name.endswith(_SUFFIX)):
        return None
    digits = name[len(_PREFIX) : -len(_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def _fsync_dir(path: Path, fsync: Callable[[int], None]) -> None:
    # Creating or unlinking a file is durable only once its directory entry is.
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Thread-safe: the router appends from a writer thread while the shipper seals and deletes."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: Callable[[int], None] = os.fsync,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._lock = threading.Lock()
        private_dir(directory)
        existing = self._segments_on_disk()
        for segment in existing:
            self._truncate_torn_tail(segment)
        self._sealed: list[Path] = existing
        self._size = sum(p.stat().st_size for p in existing)
        self._next_seq = (_segment_seq(existing[-1]) or 0) + 1 if existing else 1
        self._active: Path | None = None
        self._active_fd: int | None = None
        self._active_size = 0
        # A write failed and none has succeeded since: the router takes no new requests.
        self.failing = False
        if existing:
            log.info(
                "spool %s: %d segment(s), %d bytes left from before", directory, len(existing), self._size
            )

    def _truncate_torn_tail(self, segment: Path) -> None:
        """Cuts a torn or corrupt tail (a crash mid-write) off a segment left from before."""
        contents = read_segment(segment)
        if not contents.torn_bytes:
            return
        good = segment.stat().st_size - contents.torn_bytes
        fd = os.open(segment, os.O_WRONLY)
        try:
            os.ftruncate(fd, good)
            self._fsync(fd)
        finally:
            os.close(fd)
        log.warning("spool segment %s: truncated to its last good record (%d bytes)", segment.name, good)

    def _segments_on_disk(self) -> list[Path]:
        found = [(seq, p) for p in self.directory.iterdir() if (seq := _segment_seq(p)) is not None]
        return [p for _, p in sorted(found)]

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def full(self) -> bool:
        return self._size >= self.max_bytes

    def append_many(self, payloads: Iterable[bytes]) -> None:
        """Appends records and fsyncs; when this returns they survive a crash.

        Never refuses for size: records of requests already admitted must be kept (the cap is
        enforced at admission through `full`).
        """
        blob = b"".join(encode_frame(p) for p in payloads)
        if not blob:
            return
        with self._lock:
            try:
                fd = self._active_fd if self._active_fd is not None else self._open_active()
                written = 0
                while written < len(blob):
                    written += os.write(fd, blob[written:])
                self._fsync(fd)
            except OSError:
                self.failing = True
                self._cut_failed_write()
                raise
            self.failing = False
            self._active_size += len(blob)
            self._size += len(blob)
            if self._active_size >= self._segment_bytes:
                self._seal_locked()

    def _cut_failed_write(self) -> None:
        """After a failed append: the active segment back to its last acknowledged record, or, if
        even that fails, sealed as it is (its torn tail then ends it, and is cut on the next start)."""
        if self._active_fd is None:
            return
        try:
            os.ftruncate(self._active_fd, self._active_size)
        except OSError:
            log.exception("cannot cut a failed write off %s; sealing it", self._active)
            self._seal_locked()

    def probe(self) -> bool:
        """Whether a small write into the spool's directory succeeds now (fsynced); clears
        `failing` when it does. For a router that stopped admitting requests after a failed write."""
        path = self.directory / "probe.tmp"
        try:
            fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                os.write(fd, b"\0" * 4096)
                self._fsync(fd)
            finally:
                os.close(fd)
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("usage spool %s is still not writable: %s", self.directory, exc)
            return False
        self.failing = False
        return True

    def _open_active(self) -> int:
        path = self.directory / _segment_name(self._next_seq)
        self._next_seq += 1
        fd = open_private(path, os.O_WRONLY | os.O_EXCL | os.O_APPEND)
        _fsync_dir(self.directory, self._fsync)
        self._active, self._active_fd, self._active_size = path, fd, 0
        return fd

    def _seal_locked(self) -> None:
        if self._active_fd is None or self._active is None:
            return
        os.close(self._active_fd)
        self._sealed.append(self._active)
        self._active, self._active_fd, self._active_size = None, None, 0

    def seal(self) -> list[Path]:
        """Closes the active segment (if any) and returns every sealed segment, oldest first."""
        with self._lock:
            self._seal_locked()
            return list(self._sealed)

    def delete(self, segment: Path) -> None:
        """Drops a sealed segment whose records the ledger acknowledged."""
        with self._lock:
            if segment not in self._sealed:
                raise ValueError(f"{segment.name} is not a sealed segment of this spool")
            size = segment.stat().st_size
            segment.unlink()
            _fsync_dir(self.directory, self._fsync)
            self._sealed.remove(segment)
            self._size -= size

    def quarantine(self, payloads: list[bytes]) -> Path:
        """Keeps records the ledger refused (a bug, not an outage) out of the shipping path."""
        path = self.directory / QUARANTINE
        with self._lock, os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "ab") as f:
            f.write(b"".join(encode_frame(p) for p in payloads))
            f.flush()
            self._fsync(f.fileno())
        return path

    def close(self) -> None:
        with self._lock:
            self._seal_locked()
