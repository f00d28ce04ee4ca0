"""Adapters on a worker, one question per module:
loader.py       carries out the tier policy's plans, in order, per adapter
planning.py     may this reference be planned here at all (allow-list, base model, size)
fetcher.py      object store -> memory / disk, with disk copies written behind (fetch.py: one fetch)
preparation.py  verified files -> the engine's device layout
accounting.py   what the worker holds where (WatchState rows, bytes per tier, real copies)
telemetry.py    the Prometheus counters the loader moves
disk_tier.py, host_tier.py   the two tiers' storage
"""

from services.worker.adapters.accounting import HeldAdapter, LoadEstimate
from services.worker.adapters.fetch import fetch_to_cache
from services.worker.adapters.loader import AdapterLoader, Lease
from services.worker.adapters.planning import ADMIT_WAIT_S
from services.worker.adapters.spec import (
    AdaptersBusy,
    AdapterSpec,
    AdapterTooLarge,
    AdapterUnreadable,
    BaseModelMismatch,
    DigestMismatch,
    StoreUnavailable,
)
from services.worker.adapters.telemetry import tier_label
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
