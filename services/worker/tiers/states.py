"""An adapter's life on one worker: one enum state, a transition table, a counter per transition.

    up:    ABSENT -> QUEUED -> DOWNLOADING -> ON_DISK -> LOADING_HOST -> IN_HOST
           ON_DISK | IN_HOST -> LOADING_DEVICE -> ON_DEVICE
    down:  ON_DEVICE -> IN_HOST | ON_DISK | ABSENT;  IN_HOST -> ON_DISK | ABSENT;  ON_DISK -> ABSENT
    fail:  DOWNLOADING | LOADING_HOST | LOADING_DEVICE -> FAILED -> QUEUED (retry) | ABSENT

ABSENT means "only in object storage" (the policy keeps no row for it). QUEUED is a cold or failed
adapter whose load plan was just admitted; `access` moves it on to its first load step at once,
so it shows in the transition counts, not in snapshots. The LOADING_* and
DOWNLOADING states reserve their destination's bytes until `on_loaded` or `on_failed`; a FAILED
adapter keeps its finished copies (a failed device load leaves the disk file) and its row until
no request holds it.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter

log = logging.getLogger(__name__)


class AdapterState(enum.Enum):
    # Members are singletons, so identity hashing is exact; Enum's default hashes the name in
    # Python code, which the policy pays several times per cache miss.
    __hash__ = object.__hash__

    ABSENT = "absent"
    QUEUED = "queued"
    DOWNLOADING = "downloading"  # object store -> disk
    ON_DISK = "on_disk"
    LOADING_HOST = "loading_host"  # disk -> parsed tensors in host RAM
    IN_HOST = "in_host"
    LOADING_DEVICE = "loading_device"  # host or disk -> a device slot
    ON_DEVICE = "on_device"
    FAILED = "failed"


S = AdapterState

TRANSITIONS: dict[AdapterState, frozenset[AdapterState]] = {
    S.ABSENT: frozenset({S.QUEUED}),
    S.QUEUED: frozenset({S.DOWNLOADING, S.LOADING_HOST, S.LOADING_DEVICE}),
    S.DOWNLOADING: frozenset({S.ON_DISK, S.FAILED}),
    S.ON_DISK: frozenset({S.LOADING_HOST, S.LOADING_DEVICE, S.ABSENT}),
    S.LOADING_HOST: frozenset({S.IN_HOST, S.FAILED}),
    S.IN_HOST: frozenset({S.LOADING_DEVICE, S.ON_DISK, S.ABSENT}),
    S.LOADING_DEVICE: frozenset({S.ON_DEVICE, S.FAILED}),
    S.ON_DEVICE: frozenset({S.IN_HOST, S.ON_DISK, S.ABSENT}),
    S.FAILED: frozenset({S.QUEUED, S.ABSENT}),
}

IN_PROGRESS: frozenset[AdapterState] = frozenset({S.DOWNLOADING, S.LOADING_HOST, S.LOADING_DEVICE})


class IllegalTransition(Exception):
    """A state change the table does not allow (a bug in the caller, never a runtime condition)."""


class Lifecycle:
    """Checks every state change against `TRANSITIONS` and counts it per (from, to)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[AdapterState, AdapterState]] = Counter()

    def move(self, digest: str, src: AdapterState, dst: AdapterState) -> AdapterState:
        if dst not in TRANSITIONS[src]:
            raise IllegalTransition(f"adapter {digest[:12]}: {src.value} -> {dst.value}")
        self.counts[(src, dst)] += 1
        if log.isEnabledFor(logging.DEBUG):  # the policy moves states on every miss
            log.debug("adapter %s: %s -> %s", digest[:12], src.value, dst.value)
        return dst

    def correct(self, digest: str, src: AdapterState, dst: AdapterState) -> AdapterState:
        """A state set to match reality after a physical step failed (see TierPolicy.reconcile):
        not a transition of the table, so not checked against it, but counted like one."""
        self.counts[(src, dst)] += 1
        log.warning("adapter %s: state corrected %s -> %s", digest[:12], src.value, dst.value)
        return dst

    def as_dict(self) -> dict[str, int]:
        """Counts keyed "from->to", for logs, metrics and benchmark output."""
        return {f"{a.value}->{b.value}": n for (a, b), n in sorted(self.counts.items(), key=str)}
