"""Adapters on a worker: the loader that carries out the tier policy's plans (loader.py), the
object store -> disk fetch (fetch.py), the disk and host tiers (disk_tier.py, host_tier.py)."""

from services.worker.adapters.fetch import fetch_to_cache
from services.worker.adapters.loader import (
    ADMIT_WAIT_S,
    AdapterLoader,
    HeldAdapter,
    Lease,
    LoadEstimate,
    tier_label,
)
from services.worker.adapters.spec import (
    AdaptersBusy,
    AdapterSpec,
    AdapterTooLarge,
    AdapterUnreadable,
    BaseModelMismatch,
    DigestMismatch,
    StoreUnavailable,
)
from services.worker.tiers import Tier

__all__ = [
    "ADMIT_WAIT_S",
    "AdapterLoader",
    "AdapterSpec",
    "AdapterTooLarge",
    "AdapterUnreadable",
    "AdaptersBusy",
    "BaseModelMismatch",
    "DigestMismatch",
    "HeldAdapter",
    "Lease",
    "LoadEstimate",
    "StoreUnavailable",
    "Tier",
    "fetch_to_cache",
    "tier_label",
]
