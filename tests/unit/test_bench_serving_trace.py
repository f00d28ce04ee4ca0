"""The serving benchmark's trace: seeded, Poisson, Zipf-popular, lengths around their means."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest

from bench.serving import TARGET_SETS, TraceRequest, adapter_kind, make_trace


def _trace(**overrides: Any) -> list[TraceRequest]:
    kwargs: dict[str, Any] = dict(
        rate=4.0,
        requests=4000,
        num_adapters=1000,
        zipf_s=1.0,
        prompt_mean=200,
        output_mean=100,
        vocab=(10, 500),
        seed=3,
    )
    return make_trace(**(kwargs | overrides))


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    assert _trace(requests=50) == _trace(requests=50)
    assert _trace(requests=50) != _trace(requests=50, seed=4)


def test_arrivals_are_poisson_at_the_offered_rate() -> None:
    trace = _trace()
    gaps = [b.arrival - a.arrival for a, b in itertools.pairwise(trace)]
    assert all(g > 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 4.0, rel=0.08)
    # Exponential gaps: the standard deviation equals the mean (a fixed interval would give 0).
    mean = sum(gaps) / len(gaps)
    std = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert std == pytest.approx(mean, rel=0.1)


def test_lengths_are_spread_around_their_means() -> None:
    trace = _trace()
    prompts = [len(r.prompt) for r in trace]
    outputs = [r.output_tokens for r in trace]
    assert min(prompts) >= 100 and max(prompts) <= 300
    assert min(outputs) >= 50 and max(outputs) <= 150
    assert sum(prompts) / len(prompts) == pytest.approx(200, rel=0.05)
    assert sum(outputs) / len(outputs) == pytest.approx(100, rel=0.05)
    assert all(10 <= t < 500 for r in trace[:20] for t in r.prompt)


def test_adapter_popularity_is_zipf() -> None:
    counts = Counter(r.adapter for r in _trace()).most_common()
    # Zipf(1.0) over 1,000: the top adapter draws 1/H(1000) ~ 13% of requests, the second half that.
    harmonic = sum(1 / k for k in range(1, 1001))
    assert counts[0][1] / 4000 == pytest.approx(1 / harmonic, rel=0.2)
    assert counts[1][1] / counts[0][1] == pytest.approx(0.5, abs=0.15)
    # A long tail: many adapters, most of them seen once or twice.
    assert len(counts) > 300
    # The popular ones are a seeded permutation, not simply adapter 0, 1, 2...
    assert [a for a, _ in counts[:3]] != [0, 1, 2]


def test_every_rank_and_target_set_is_in_the_population() -> None:
    kinds = {adapter_kind(i, [8, 16, 32, 64]) for i in range(12)}
    assert kinds == {(r, k) for r in (8, 16, 32, 64) for k in TARGET_SETS}
