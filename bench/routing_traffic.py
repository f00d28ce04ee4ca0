"""Pure parts of `bench.routing`: the seeded Zipf traffic and an idealised model of each policy.

The model answers "how many cold loads could each policy have at best with these budgets?", so a
measured number can be told apart from a ceiling set by the benchmark's own shape (how much of the
adapter set fits on the fleet). Each worker's device is replayed through the worker's own
`TierPolicy` (its default eviction order, the same byte budget, no host tier), one request at a
time, with no load spill: affinity sends every adapter to its rendezvous home, round-robin cycles
the workers, and least-loaded, whose load signal is noise-level under balanced traffic, is
modelled as a seeded uniform pick. Plain per-worker LRU over the same slots is kept as a reference.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

POLICIES = ("affinity", "least_loaded", "round_robin")


def zipf_sequence(n: int, alpha: float, count: int, seed: int) -> list[int]:
    """`count` draws of adapter indices 0..n-1 with P(i) proportional to 1 / (i+1)**alpha."""
    weights = [1.0 / (i + 1) ** alpha for i in range(n)]
    return random.Random(seed).choices(range(n), weights=weights, k=count)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class DeviceCache(Protocol):
    def use(self, adapter: int) -> bool:
        """Serves one request for `adapter`; True when it was already on the device."""
        ...


class LruCache:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._held: OrderedDict[int, None] = OrderedDict()

    def use(self, adapter: int) -> bool:
        if adapter in self._held:
            self._held.move_to_end(adapter)
            return True
        self._held[adapter] = None
        if len(self._held) > self.slots:
            self._held.popitem(last=False)
        return False


class TierPolicyCache:
    """The worker's own tier policy at one device byte budget, every adapter `size_bytes`."""

    def __init__(self, device_bytes: int, size_bytes: int) -> None:
        from services.worker.tiers import TierBudgets, TierPolicy

        self.size = size_bytes
        self._t = 0.0
        budgets = TierBudgets(device_bytes=device_bytes, host_bytes=0, disk_bytes=1 << 40)
        self.policy = TierPolicy(budgets, idle_ttl_s=math.inf, clock=lambda: self._t)

    def use(self, adapter: int) -> bool:
        self._t += 1.0
        digest = f"{adapter:064x}"
        plan = self.policy.access(digest, self.size, now=self._t, device_bytes=self.size)
        if not plan.admitted:  # cannot happen one request at a time; counted as a miss
            return False
        for load in plan.loads:
            self.policy.on_loaded(digest, load.dst)
        self.policy.unpin(digest)
        return bool(plan.hit)


def cold_loads(
    sequence: Sequence[int],
    assign: Callable[[int, int], int],
    caches: Sequence[DeviceCache],
    *,
    skip: int = 0,
) -> int:
    """Requests that found their adapter off the device of the worker `assign(t, adapter)` picked.

    The first `skip` requests only warm the caches.
    """
    cold = 0
    for t, adapter in enumerate(sequence):
        hit = caches[assign(t, adapter)].use(adapter)
        cold += t >= skip and not hit
    return cold


def modelled_cold_loads(
    sequence: Sequence[int],
    homes: Sequence[int],
    new_cache: Callable[[], DeviceCache],
    *,
    workers: int,
    skip: int,
    seed: int,
) -> dict[str, int]:
    """Cold loads per policy over sequence[skip:] under the idealised model (see module docstring)."""
    pick = random.Random(seed)
    assigners: dict[str, Callable[[int, int], int]] = {
        "affinity": lambda t, a: homes[a],
        "least_loaded": lambda t, a: pick.randrange(workers),
        "round_robin": lambda t, a: t % workers,
    }
    return {
        name: cold_loads(sequence, assigners[name], [new_cache() for _ in range(workers)], skip=skip)
        for name in POLICIES
    }


def per_thousand(count: int, requests: int) -> float:
    return 1000.0 * count / requests if requests else 0.0
