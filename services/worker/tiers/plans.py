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
class AdapterSizes:
    """An adapter's two sizes. `size_bytes`: its files (what DISK holds and a download reads).
    `device_bytes`: what it occupies in the engine's layout (slots with the rank padded to its
    bucket and the engine's dtype, plus edge LoRA), on DEVICE and on HOST, which keeps that
    layout; None until someone needs it on either."""

    size_bytes: int
    device_bytes: int | None = None

    def bytes_in(self, tier: Tier) -> int:
        if tier == Tier.DISK:
            return self.size_bytes
        if tier in (Tier.DEVICE, Tier.HOST) and self.device_bytes is not None:
            return self.device_bytes
        raise ValueError(f"no size in {tier.name} is known (device_bytes {self.device_bytes})")


@dataclass(frozen=True)
class Load:
    """Bring a copy from `src` into `dst`; `size_bytes` is what it occupies in `dst`."""

    digest: str
    size_bytes: int
    src: Tier
    dst: Tier


@dataclass(frozen=True)
class Eviction:
    """Free the copy in `src`; when `dst` is set, first copy it there (a demotion that moves bytes).
    `size_bytes` is what it occupies in `src` (a demotion DEVICE -> HOST moves the same bytes)."""

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
    size_bytes: int  # what it occupies (or reserves) in `tier`; its file bytes when OBJECT_STORE
    last_used: float
    in_flight: int
    pinned: bool
    keep_warm: bool
