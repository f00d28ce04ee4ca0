"""One worker's pushed state as the router holds it (WorkerService.WatchState). Pure: no gRPC, no I/O.

The worker sends a snapshot first, then deltas and heartbeats, each with `seq` one more than the
last. `PushedState.apply` folds them in; a message that does not follow (a gap, a delta before any
snapshot, a snapshot of another worker) raises `StateOutOfSync`, and the caller resubscribes for a
fresh snapshot. Until that snapshot arrives the worker is not routable.

A worker is *live* when it is synced and its last message is at most `stale_s` old: a worker that
stops talking (hung, partitioned) leaves routing without waiting for TCP to notice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.v1 import common_pb2, worker_pb2
from services.router.policy import Residency

_RESIDENCY = {
    common_pb2.ADAPTER_TIER_DEVICE: Residency.DEVICE,
    common_pb2.ADAPTER_TIER_HOST: Residency.HOST,
    common_pb2.ADAPTER_TIER_DISK: Residency.DISK,
}


class StateOutOfSync(Exception):
    """The stream no longer describes the worker: resubscribe for a fresh snapshot."""


@dataclass
class PushedState:
    """What the latest snapshot plus deltas say about one worker."""

    worker_id: str
    synced: bool = False
    seq: int = 0
    last_seen: float = 0.0
    base_model: str = ""
    # digest -> fastest tier; only tiers a worker can serve from without object storage.
    residency: dict[str, Residency] = field(default_factory=dict)
    loading: frozenset[str] = frozenset()
    queue_depth: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    accepting: bool = False
    # tier -> typical (exponentially weighted) load time, ms, from the snapshot; deltas carry none.
    load_estimates_ms: dict[Residency, float] = field(default_factory=dict)
    # Requests this router sent after the worker's last update and still running: not in
    # queue_depth/running yet. `updates` counts messages, to tell which update a request followed.
    unreflected: int = 0
    updates: int = 0

    def apply(self, msg: worker_pb2.WatchStateResponse, now: float) -> None:
        kind = msg.WhichOneof("update")
        if kind == "snapshot":
            self._apply_snapshot(msg.snapshot)
        elif not self.synced:
            raise StateOutOfSync(f"worker {self.worker_id} sent a {kind} before its snapshot")
        elif msg.seq != self.seq + 1:
            self.synced = False
            raise StateOutOfSync(
                f"worker {self.worker_id} state skipped from seq {self.seq} to {msg.seq}; resubscribing"
            )
        elif kind == "delta":
            self._apply_delta(msg.delta)
        self.seq = msg.seq
        self.last_seen = now
        self.updates += 1
        # Any message is the worker's view after what it had received by then; a heartbeat says
        # nothing changed, so requests sent before it are either reflected or already finished.
        self.unreflected = 0

    def disconnect(self) -> None:
        """The stream ended: nothing is known until the next snapshot."""
        self.synced = False

    def live(self, now: float, stale_s: float) -> bool:
        return self.synced and now - self.last_seen <= stale_s

    def routable(self, now: float, stale_s: float) -> bool:
        return self.live(now, stale_s) and self.accepting

    @property
    def kv_fraction(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    def load(self, in_flight: int) -> int:
        """Requests waiting or running there as best this router knows.

        The worker's count plus what this router sent since; never below this router's own
        in-flight streams (a worker that reports no queue still has them).
        """
        return max(self.queue_depth + self.running + self.unreflected, in_flight)

    def note_dispatched(self) -> int:
        """Counts a request sent now; pass the returned token to `note_finished` when it ends."""
        self.unreflected += 1
        return self.updates

    def note_finished(self, token: int) -> None:
        # Sent and finished between two updates: the worker never reported it, so stop counting it.
        if token == self.updates and self.unreflected > 0:
            self.unreflected -= 1

    def _apply_snapshot(self, s: worker_pb2.WorkerState) -> None:
        if s.worker_id and s.worker_id != self.worker_id:
            self.synced = False
            raise StateOutOfSync(f"the worker at this address is now {s.worker_id!r}, not {self.worker_id!r}")
        self.base_model = s.base_model
        self.residency = {}
        for a in s.adapters:
            self._upsert(a)
        self.loading = frozenset(s.loading)
        self.queue_depth, self.running = s.queue_depth, s.running
        self.kv_blocks_used, self.kv_blocks_total = s.kv_blocks_used, s.kv_blocks_total
        self.accepting = s.accepting
        self.load_estimates_ms = {
            _RESIDENCY[e.tier]: e.p50_ms for e in s.load_estimates if e.tier in _RESIDENCY
        }
        self.synced = True

    def _apply_delta(self, d: worker_pb2.WorkerStateDelta) -> None:
        for a in d.upserted:
            self._upsert(a)
        for digest in d.removed:
            self.residency.pop(digest, None)
        self.loading = frozenset(d.loading)
        self.queue_depth, self.running = d.queue_depth, d.running
        self.kv_blocks_used = d.kv_blocks_used
        self.accepting = d.accepting

    def _upsert(self, a: worker_pb2.ResidentAdapter) -> None:
        tier = _RESIDENCY.get(a.tier)
        if tier is None:  # object store only: as cold as not holding it
            self.residency.pop(a.digest, None)
        else:
            self.residency[a.digest] = tier
