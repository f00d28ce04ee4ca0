"""The pure parts of bench.routing: seeded Zipf traffic and the idealised LRU model of each policy."""

from __future__ import annotations

from collections import Counter

from bench.routing_traffic import (
    LruCache,
    TierPolicyCache,
    cold_loads,
    modelled_cold_loads,
    percentile,
    zipf_sequence,
)


def test_zipf_sequence_is_seeded_and_skewed() -> None:
    a = zipf_sequence(50, 1.0, 5000, seed=1)
    assert a == zipf_sequence(50, 1.0, 5000, seed=1) and a != zipf_sequence(50, 1.0, 5000, seed=2)
    counts = Counter(a)
    # P(0) / P(1) = 2 under alpha = 1; P(0) = 1 / H_50, about 0.22.
    assert 1.6 < counts[0] / counts[1] < 2.5 and 0.19 < counts[0] / 5000 < 0.26


def test_lru_counts_misses_per_worker_after_the_warmup() -> None:
    seq = [0, 1, 2, 0, 1, 2, 0]
    # One worker, two slots: 0 1 2(evicts 0) 0(evicts 1) 1(evicts 2) 2(evicts 0) 0 -> all miss.
    assert cold_loads(seq, lambda t, a: 0, [LruCache(2)]) == 7
    assert cold_loads(seq, lambda t, a: 0, [LruCache(3)]) == 3
    # Two workers split by adapter: each holds its own; only first uses miss; skip hides the first 3.
    assert cold_loads(seq, lambda t, a: a % 2, [LruCache(2), LruCache(2)]) == 3
    assert cold_loads(seq, lambda t, a: a % 2, [LruCache(2), LruCache(2)], skip=3) == 0


def test_tier_policy_cache_holds_what_its_byte_budget_fits() -> None:
    from services.worker.tiers import Tier

    cache = TierPolicyCache(device_bytes=2 * 100 + 50, size_bytes=100)
    assert [cache.use(a) for a in (0, 1, 0, 1)] == [False, False, True, True]
    assert not cache.use(2)  # a third does not fit beside two: one of them left the device
    assert cache.policy.resident_bytes(Tier.DEVICE) == 200
    assert [cache.use(0), cache.use(1)].count(True) <= 1


def test_affinity_models_fewer_cold_loads_than_spreading() -> None:
    seq = zipf_sequence(100, 1.0, 4000, seed=3)
    homes = [i % 3 for i in range(100)]
    for new_cache in (lambda: LruCache(20), lambda: TierPolicyCache(20 * 100 + 50, 100)):
        cold = modelled_cold_loads(seq, homes, new_cache, workers=3, skip=2000, seed=3)
        assert cold["affinity"] < cold["least_loaded"] and cold["affinity"] < cold["round_robin"]


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile(list(map(float, range(101))), 0.99) == 99.0
