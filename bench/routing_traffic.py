"""Pure parts of `bench.routing`: the seeded Zipf traffic and an idealised LRU model of each policy.

The model answers "how many cold loads could each policy have at best with these budgets?", so a
measured number can be told apart from a ceiling set by the benchmark's own shape (how much of the
adapter set fits on the fleet). It assumes per-worker LRU over a fixed number of device slots and
no load spill: affinity sends every adapter to its rendezvous home, round-robin cycles the
workers, and least-loaded, whose load signal is noise-level under balanced traffic, is modelled as
a seeded uniform pick.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence

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


def lru_cold_loads(
    sequence: Sequence[int],
    assign: Callable[[int, int], int],
    *,
    workers: int,
    slots: int,
    skip: int = 0,
) -> int:
    """Misses of per-worker LRU caches of `slots` entries; `assign(t, adapter)` picks the worker.

    The first `skip` requests only warm the caches.
    """
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(workers)]
    cold = 0
    for t, adapter in enumerate(sequence):
        cache = caches[assign(t, adapter)]
        if adapter in cache:
            cache.move_to_end(adapter)
            continue
        if t >= skip:
            cold += 1
        cache[adapter] = None
        if len(cache) > slots:
            cache.popitem(last=False)
    return cold


def modelled_cold_loads(
    sequence: Sequence[int], homes: Sequence[int], *, workers: int, slots: int, skip: int, seed: int
) -> dict[str, int]:
    """Cold loads per policy over sequence[skip:] under the idealised model (see module docstring)."""
    pick = random.Random(seed)
    assigners: dict[str, Callable[[int, int], int]] = {
        "affinity": lambda t, a: homes[a],
        "least_loaded": lambda t, a: pick.randrange(workers),
        "round_robin": lambda t, a: t % workers,
    }
    return {
        name: lru_cold_loads(sequence, assigners[name], workers=workers, slots=slots, skip=skip)
        for name in POLICIES
    }


def per_thousand(count: int, requests: int) -> float:
    return 1000.0 * count / requests if requests else 0.0
