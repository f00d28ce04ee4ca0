"""Checkpoints of streams in flight, so a router killed mid-stream still bills what it streamed.

A usage record is spooled when a stream ends; a router that dies (SIGKILL, OOM, power) before
that would bill nothing for its open streams. So each stream also keeps one small checkpoint file:
written when its second message of tokens arrives, then at most every `interval_s`, atomically
(temp file, fsync, rename), and removed once the final record is in the spool. A checkpoint
counts only the tokens of messages already handed to the client's stream, never the message about
to be sent, so a router killed in between bills no token the client did not get (the chaos soak
caught that: a checkpoint written with the first token, the router killed before the client read
it, the client's retry then refused as a replay). On start the router spools what the dead process
left as records with finish reason ERROR. Tokens streamed after the last checkpoint (at most
`interval_s` of them, plus the last message) are the bounded loss; the ledger's (tenant,
request id) idempotency makes a checkpoint that races its final record harmless. Files are named
by (tenant, request id): two tenants' streams with the same id never share a checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from google.protobuf.message import DecodeError

from loraplex.v1 import usage_pb2
from services.common.private_files import open_private, private_dir

log = logging.getLogger(__name__)

SUFFIX = ".inflight"


class InflightJournal:
    def __init__(
        self, directory: Path, *, interval_s: float = 1.0, fsync: Callable[[int], None] = os.fsync
    ) -> None:
        self.directory = directory
        self.interval_s = interval_s
        self._fsync = fsync
        private_dir(directory)

    def _path(self, tenant_id: str, request_id: str) -> Path:
        # Request ids are client-chosen text: hash them, with their tenant (a UUID, so the NUL
        # separator is unambiguous), into a safe file name.
        key = f"{tenant_id}\0{request_id}".encode()
        return self.directory / (hashlib.sha256(key).hexdigest()[:32] + SUFFIX)

    def due(self, last_checkpoint_s: float, now_s: float) -> bool:
        return last_checkpoint_s == 0.0 or now_s - last_checkpoint_s >= self.interval_s

    def write(self, record: usage_pb2.UsageRecord) -> None:
        """Blocking (fsync): call it off the event loop."""
        path = self._path(record.tenant_id, record.request_id)
        tmp = path.with_suffix(".tmp")
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            f.write(record.SerializeToString())
            f.flush()
            self._fsync(f.fileno())
        os.replace(tmp, path)

    def discard(self, tenant_id: str, request_id: str) -> None:
        self._path(tenant_id, request_id).unlink(missing_ok=True)

    def recover(self) -> list[usage_pb2.UsageRecord]:
        """Records of streams a previous process left open; unreadable leftovers are removed."""
        records = []
        for path in sorted(self.directory.iterdir()):
            if path.suffix != SUFFIX:
                path.unlink(missing_ok=True)  # a temp file from a write the crash interrupted
                continue
            try:
                records.append(usage_pb2.UsageRecord.FromString(path.read_bytes()))
            except DecodeError:
                log.error("dropping unreadable in-flight checkpoint %s", path)
                path.unlink(missing_ok=True)
        return records
