"""What the worker holds, and where: the rows WatchState reports, bytes per tier, the typical
time to load from each tier, and where an adapter's copies really are (to reconcile the policy
after a physical step failed)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services.worker.adapters.disk_tier import DiskTier
from services.worker.adapters.host_tier import HostTier
from services.worker.adapters.telemetry import tier_label
from services.worker.tiers import Tier, TierPolicy
from services.worker.tiers.states import IN_PROGRESS


@dataclass(frozen=True)
class HeldAdapter:
    """One adapter the worker holds, at its fastest complete tier (what WatchState reports)."""

    digest: str
    adapter_id: str
    tier: Tier
    size_bytes: int  # what it occupies in `tier`: its files on DISK, its engine layout on DEVICE/HOST
    last_used_at: float  # wall clock seconds
    in_flight: int
    pinned: bool  # in use or keep_warm


@dataclass
class LoadEstimate:
    """Exponentially weighted typical time to bring an adapter onto the device from one tier."""

    ms: float = 0.0
    samples: int = 0

    def observe(self, ms: float, weight: float = 0.2) -> None:
        self.ms = ms if self.samples == 0 else (1 - weight) * self.ms + weight * ms
        self.samples += 1


def held_adapters(
    policy: TierPolicy, adapter_ids: Mapping[str, str], clock: Callable[[], float]
) -> tuple[list[HeldAdapter], list[str]]:
    """Adapters at their fastest complete tier, and the digests being loaded."""
    now_wall, now = time.time(), clock()
    held: list[HeldAdapter] = []
    loading: list[str] = []
    for row in policy.snapshot():
        if row.state in IN_PROGRESS:
            loading.append(row.digest)
        tier = policy.tier_of(row.digest)
        sizes = policy.known_size(row.digest)
        if tier == Tier.OBJECT_STORE or sizes is None:
            continue  # only being loaded, or a failed load still held by a request
        held.append(
            HeldAdapter(
                digest=row.digest,
                adapter_id=adapter_ids.get(row.digest, ""),
                tier=tier,
                size_bytes=sizes.bytes_in(tier),
                last_used_at=now_wall - max(now - row.last_used, 0.0),
                in_flight=row.in_flight,
                pinned=row.pinned or row.keep_warm,
            )
        )
    return held, loading


def resident_bytes(policy: TierPolicy) -> dict[str, int]:
    """Bytes held or reserved per budgeted tier, each counted as that tier does: file bytes on
    DISK (inclusive of the faster tiers), the engine layout's bytes on DEVICE and HOST."""
    return {tier_label(t): policy.resident_bytes(t) for t in (Tier.DEVICE, Tier.HOST, Tier.DISK)}


def copies_of(digest: str, on_device: list[str], host: HostTier, disk: DiskTier) -> set[Tier]:
    """The budgeted tiers that really hold a copy: the engine's resident list, the host tier's
    map, the content-addressed directory on disk."""
    present: set[Tier] = set()
    if digest in on_device:
        present.add(Tier.DEVICE)
    if digest in host:
        present.add(Tier.HOST)
    if disk.path(digest).is_dir():
        present.add(Tier.DISK)
    return present
