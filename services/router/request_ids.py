"""Which client-chosen request ids this router is running or ran recently, per tenant.

No gRPC, no database: RecentRequests is pure (the caller passes the time), and remember_spooled
reads the spool's files.

A request id is the client's idempotency key (the ledger's key is (tenant, request id)): once a
request with that id produced anything billable, the same tenant may not generate under it again.
The registry answers for ids already shipped to the ledger; this set answers for the rest: ids in
flight on this router (so a concurrent duplicate is refused without a registry call) and ids
finished here within the idempotency window, which covers records still in the spool.

Only ids a client chose are tracked: the router's own UUIDs cannot repeat.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict

from google.protobuf.message import DecodeError

from loraplex.v1 import usage_pb2
from services.router.spool import Spool, read_segment

# (tenant_id, request_id)
Key = tuple[str, str]

DEFAULT_WINDOW_S = 24 * 3600.0
# About 200 bytes an entry: 500k finished ids is ~100 MB at most. When more finish within the
# window, the oldest go first; the registry still knows them once they are shipped.
DEFAULT_MAX_FINISHED = 500_000


class Seen(enum.Enum):
    IN_FLIGHT = "in flight"
    FINISHED = "finished"


class RecentRequests:
    """In-flight ids (no bound but the router's in-flight limit) and finished ids (bounded by
    count and by the window). Times are wall-clock seconds, so records read back from the spool
    can be entered with their own finished_at."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S, max_finished: int = DEFAULT_MAX_FINISHED) -> None:
        if window_s <= 0 or max_finished <= 0:
            raise ValueError("the window and the bound must be positive")
        self.window_s = window_s
        self.max_finished = max_finished
        self._in_flight: set[Key] = set()
        # Oldest first, by when they were entered; the value is when the request finished.
        self._finished: OrderedDict[Key, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._in_flight) + len(self._finished)

    def seen(self, key: Key, now: float) -> Seen | None:
        self._expire(now)
        if key in self._in_flight:
            return Seen.IN_FLIGHT
        if key in self._finished:
            return Seen.FINISHED
        return None

    def claim(self, key: Key, now: float) -> Seen | None:
        """Marks the id in flight and returns None, or returns what it already is (and changes nothing)."""
        found = self.seen(key, now)
        if found is None:
            self._in_flight.add(key)
        return found

    def finish(self, key: Key, finished_at: float, now: float) -> None:
        """The request produced a usage record: its id may not run again within the window."""
        self._in_flight.discard(key)
        if finished_at < now - self.window_s:
            return
        self._finished[key] = max(finished_at, self._finished.get(key, finished_at))
        self._finished.move_to_end(key)
        while len(self._finished) > self.max_finished:
            self._finished.popitem(last=False)

    def release(self, key: Key) -> None:
        """The request ended with nothing billed (refused, no worker): the client may retry the id."""
        self._in_flight.discard(key)

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        # Entries are nearly in finish order (spool records may be entered slightly out of it):
        # stop at the first one still inside the window.
        while self._finished:
            key, at = next(iter(self._finished.items()))
            if at >= horizon:
                return
            del self._finished[key]


def remember_spooled(spool: Spool, recent: RecentRequests) -> int:
    """Enters every record waiting in the spool into `recent`; returns how many. Blocking."""
    now = time.time()
    count = 0
    for segment in spool.seal():
        for payload in read_segment(segment).records:
            try:
                record = usage_pb2.UsageRecord.FromString(payload)
            except DecodeError:
                continue  # the shipper logs these when it reaches them
            finished_at = record.finished_at.ToNanoseconds() / 1e9
            recent.finish((record.tenant_id, record.request_id), finished_at, now)
            count += 1
    return count
