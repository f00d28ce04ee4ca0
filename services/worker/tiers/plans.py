"""What the tier policy hands the worker: tiers, budgets, plans of loads and evictions, rows."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.worker.tiers.states import AdapterState


class Tier(enum.IntEnum):
    """Fastest first; the values are the proto's AdapterTier numbers."""

    __hash__ = int.__hash__  # consistent with int equality, and C-speed (see AdapterState)

    DEVICE = 1
    HOST = 2
    DISK = 3
    OBJECT_STORE = 4


@dataclass(frozen=True)
class TierBudgets:
    device_bytes: int
    host_bytes: int
    disk_bytes: int

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes", "disk_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def of(self, tier: Tier) -> int:
        return {
            Tier.DEVICE: self.device_bytes,
            Tier.HOST: self.host_bytes,
            Tier.DISK: self.disk_bytes,
        }[tier]


@dataclass(frozen=True)
class Load:
    digest: str
    size_bytes: int
    src: Tier
    dst: Tier


@dataclass(frozen=True)
class Eviction:
    """Free the copy in `src`; when `dst` is set, first copy it there (a demotion that moves bytes)."""

    digest: str
    size_bytes: int
    src: Tier
    dst: Tier | None


@dataclass(frozen=True)
class Plan:
    digest: str
    found_in: Tier  # fastest complete copy when asked
    admitted: bool
    evictions: tuple[Eviction, ...] = ()
    loads: tuple[Load, ...] = ()
    awaiting: Tier | None = None  # a load toward this tier, started earlier, is still running
    reason: str = ""

    @property
    def hit(self) -> bool:
        return self.found_in == Tier.DEVICE


@dataclass(frozen=True)
class ResidentRow:
    digest: str
    state: AdapterState
    tier: Tier  # fastest tier holding or being loaded into
    size_bytes: int
    last_used: float
    in_flight: int
    pinned: bool
    keep_warm: bool
