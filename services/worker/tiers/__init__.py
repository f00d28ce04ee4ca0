"""Adapter tiers on a worker: the pure cache policy (policy.py), the plans it returns (plans.py),
its eviction orders (orders.py) and the adapter-on-worker state machine (states.py). No I/O here;
the worker executes the plans."""

from services.worker.tiers.plans import AdapterSizes, Eviction, Load, Plan, ResidentRow, Tier, TierBudgets
from services.worker.tiers.policy import TierPolicy
from services.worker.tiers.states import AdapterState, IllegalTransition, Lifecycle

__all__ = [
    "AdapterSizes",
    "AdapterState",
    "Eviction",
    "IllegalTransition",
    "Lifecycle",
    "Load",
    "Plan",
    "ResidentRow",
    "Tier",
    "TierBudgets",
    "TierPolicy",
]
