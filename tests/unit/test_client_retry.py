"""The client's retry policy: which failures are retried, and how long it waits."""

from __future__ import annotations

import random

import pytest

from services.client.retry import NO_RETRY, RetryPolicy, pushback_ms
from services.common.config import ConfigError


def test_retryable_failures_before_the_first_token_are_retried_until_the_budget_is_spent() -> None:
    policy = RetryPolicy(retries=3)
    for code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
        assert [policy.delay_s(a, code, generated=False) is not None for a in range(5)] == [
            True,
            True,
            True,
            False,
            False,
        ]


def test_nothing_is_retried_after_a_token_or_for_a_status_that_is_not_transient() -> None:
    policy = RetryPolicy(retries=3)
    assert policy.delay_s(0, "UNAVAILABLE", generated=True) is None
    for code in ("INVALID_ARGUMENT", "ALREADY_EXISTS", "DEADLINE_EXCEEDED", "UNAUTHENTICATED", "INTERNAL"):
        assert policy.delay_s(0, code, generated=False) is None
    assert NO_RETRY.delay_s(0, "UNAVAILABLE", generated=False) is None


def test_backoff_is_full_jitter_under_a_doubling_ceiling_with_a_cap() -> None:
    policy = RetryPolicy(retries=20, initial_backoff_s=0.1, max_backoff_s=1.0)
    rng = random.Random(7)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (12, 1.0)]:
        waits = [policy.delay_s(attempt, "UNAVAILABLE", generated=False, rng=rng) for _ in range(200)]
        assert all(w is not None and 0 <= w <= ceiling for w in waits)
        assert max(w for w in waits if w is not None) > ceiling * 0.8  # spread over the range, not fixed
        assert len(set(waits)) > 100


def test_server_pushback_replaces_the_backoff_and_a_negative_one_stops_retries() -> None:
    policy = RetryPolicy(retries=3, initial_backoff_s=0.1, max_backoff_s=0.2)
    assert policy.delay_s(0, "RESOURCE_EXHAUSTED", generated=False, pushback_ms=1500) == 1.5
    assert policy.delay_s(0, "RESOURCE_EXHAUSTED", generated=False, pushback_ms=-1) is None
    assert pushback_ms([("other", "1"), ("grpc-retry-pushback-ms", "250")]) == 250
    assert pushback_ms([("grpc-retry-pushback-ms", b"40")]) == 40
    assert pushback_ms([("grpc-retry-pushback-ms", "soon")]) is None
    assert pushback_ms(None) is None


def test_no_retry_starts_past_the_time_budget_whatever_the_count() -> None:
    policy = RetryPolicy(retries=100, initial_backoff_s=0.1, max_backoff_s=1.0, budget_s=10.0)
    assert policy.delay_s(3, "UNAVAILABLE", generated=False, pushback_ms=1000, elapsed_s=8.9) == 1.0
    assert policy.delay_s(3, "UNAVAILABLE", generated=False, pushback_ms=1000, elapsed_s=9.5) is None
    assert policy.delay_s(3, "UNAVAILABLE", generated=False, elapsed_s=10.01) is None


def test_the_default_policy_rides_out_a_registry_restart_at_the_routers_pushback() -> None:
    # The router answers "registry unreachable" with 1 s pushback; a restart with a full spool
    # behind it keeps refusing for ~10 s and a PostgreSQL restart up to ~20 s.
    policy = RetryPolicy()
    elapsed, attempt = 0.0, 0
    while elapsed < 30:
        wait = policy.delay_s(attempt, "UNAVAILABLE", generated=False, pushback_ms=1000, elapsed_s=elapsed)
        assert wait is not None, f"gave up after {attempt} retries, {elapsed:.0f} s"
        elapsed, attempt = elapsed + wait + 0.2, attempt + 1


def test_policy_from_env_is_validated() -> None:
    assert RetryPolicy.from_env({}) == RetryPolicy()
    p = RetryPolicy.from_env({"LORAPLEX_CLIENT_RETRIES": "0", "LORAPLEX_CLIENT_MAX_BACKOFF_S": "0.1"})
    assert (p.retries, p.max_backoff_s, p.initial_backoff_s) == (0, 0.1, 0.1)
    assert RetryPolicy.from_env({"LORAPLEX_CLIENT_RETRY_BUDGET_S": "5"}).budget_s == 5.0
    with pytest.raises(ConfigError, match="LORAPLEX_CLIENT_RETRY_BUDGET_S"):
        RetryPolicy.from_env({"LORAPLEX_CLIENT_RETRY_BUDGET_S": "0"})
    with pytest.raises(ConfigError, match="LORAPLEX_CLIENT_RETRIES"):
        RetryPolicy.from_env({"LORAPLEX_CLIENT_RETRIES": "-1"})
    with pytest.raises(ConfigError, match="LORAPLEX_CLIENT_MAX_BACKOFF_S"):
        RetryPolicy.from_env({"LORAPLEX_CLIENT_MAX_BACKOFF_S": "never"})
