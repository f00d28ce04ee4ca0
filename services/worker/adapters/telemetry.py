"""What the loader reports as Prometheus metrics: lookups, loads, evictions, by tier label."""

from __future__ import annotations

from services.worker import metrics
from services.worker.tiers import Eviction, Plan, Tier


def tier_label(tier: Tier) -> str:
    return tier.name.lower()


def record_lookup(plan: Plan) -> None:
    """A request asked for an adapter on the device: a hit or a miss, and where it was found."""
    metrics.ADAPTER_LOOKUPS.labels(result="hit" if plan.hit else "miss").inc()
    metrics.ADAPTER_LOOKUPS_BY_TIER.labels(tier=tier_label(plan.found_in)).inc()


def record_device_load(source: Tier, seconds: float) -> None:
    metrics.ADAPTER_LOADS.labels(tier=tier_label(source)).inc()
    metrics.ADAPTER_LOAD_SECONDS.labels(tier=tier_label(source)).observe(seconds)


def record_eviction(ev: Eviction) -> None:
    metrics.ADAPTER_EVICTIONS.labels(
        tier=tier_label(ev.src), to=tier_label(ev.dst) if ev.dst else "none"
    ).inc()
