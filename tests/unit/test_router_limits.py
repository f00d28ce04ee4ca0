"""services.router.limits: token buckets, concurrency and the monthly quota, on an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.router.limits import (
    Limiter,
    MonthToDate,
    OverLimit,
    TenantLimits,
    TokenBucket,
    month_of,
    next_month_start,
)

WALL = datetime(2026, 11, 30, 12, 0, tzinfo=UTC).timestamp()


def _admitted(limiter: Limiter, limits: TenantLimits, now: float, wall: float = WALL) -> bool:
    try:
        limiter.admit("t1", "acme", limits, now, wall)
    except OverLimit:
        return False
    return True


def test_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    b = TokenBucket(rate=2.0, capacity=4.0, now=0.0)
    b.take(4.0, 0.0)
    assert b.wait_for(1.0, 0.0) == pytest.approx(0.5)
    assert b.wait_for(1.0, 0.5) == 0.0
    assert b.wait_for(4.0, 100.0) == 0.0 and b.level == 4.0  # never above capacity


def test_bucket_in_debt_waits_until_repaid() -> None:
    b = TokenBucket(rate=10.0, capacity=600.0, now=0.0)
    b.take(650.0, 0.0)  # charged after the fact: 50 tokens of debt
    assert b.wait_for(0.0, 0.0) == pytest.approx(5.0)
    assert b.wait_for(0.0, 5.0) == 0.0


def test_requests_per_s_admits_a_burst_of_the_rate_then_paces_with_pushback() -> None:
    limiter = Limiter()
    limits = TenantLimits(requests_per_s=5)
    assert all(_admitted(limiter, limits, 0.0) for _ in range(5))
    with pytest.raises(OverLimit) as refused:
        limiter.admit("t1", "acme", limits, 0.0, WALL)
    assert str(refused.value) == "tenant 'acme' is over its limit of 5 requests/s; retry in 200 ms"
    assert refused.value.retry_after_ms == 200
    assert _admitted(limiter, limits, 0.2)
    assert not _admitted(limiter, limits, 0.2)
    # Over 10 s at most 5/s pass, whatever the callers try.
    passed = sum(_admitted(limiter, limits, 1.0 + i * 0.01) for i in range(1000))
    assert passed <= 5 * 10 + 5


def test_a_refused_request_takes_nothing_from_any_limit() -> None:
    limiter = Limiter()
    limits = TenantLimits(requests_per_s=1, max_concurrent=1)
    assert _admitted(limiter, limits, 0.0)
    assert not _admitted(limiter, limits, 5.0)  # the concurrency slot is held
    limiter.release("t1", 0, 5.0, WALL)
    assert _admitted(limiter, limits, 5.0)  # the refusal did not spend the rate token


def test_concurrency_slot_is_held_until_release() -> None:
    limiter = Limiter(concurrency_pushback_ms=250)
    limits = TenantLimits(max_concurrent=2)
    assert _admitted(limiter, limits, 0.0) and _admitted(limiter, limits, 0.0)
    with pytest.raises(OverLimit) as refused:
        limiter.admit("t1", "acme", limits, 0.0, WALL)
    assert "limit of 2 concurrent requests" in str(refused.value) and refused.value.retry_after_ms == 250
    limiter.release("t1", 10, 1.0, WALL)
    assert limiter.inflight("t1") == 1
    assert _admitted(limiter, limits, 1.0)


def test_tokens_per_min_refuses_while_in_debt_and_says_when_to_retry() -> None:
    limiter = Limiter()
    limits = TenantLimits(tokens_per_min=600)  # 10 tokens/s, capacity 600
    assert _admitted(limiter, limits, 0.0)
    assert _admitted(limiter, limits, 0.0)  # admitted while not in debt: cost unknown yet
    limiter.release("t1", 500, 1.0, WALL)
    limiter.release("t1", 200, 1.0, WALL)  # 700 from a full 600: 100 tokens of debt
    with pytest.raises(OverLimit) as refused:
        limiter.admit("t1", "acme", limits, 1.0, WALL)
    assert "over its limit of 600 tokens/min; retry in 10000 ms" in str(refused.value)
    assert refused.value.retry_after_ms == 10000
    assert not _admitted(limiter, limits, 10.9)
    assert _admitted(limiter, limits, 11.01)


def test_monthly_quota_counts_the_ledger_and_unconfirmed_local_charges() -> None:
    limiter = Limiter()
    limits = TenantLimits(monthly_tokens=1000)
    month = limiter.month_to_date("t1")
    month.confirm(900, month_of(WALL), covered_through=0.0)
    assert _admitted(limiter, limits, 1.0)
    limiter.release("t1", 150, 2.0, WALL)  # not in the ledger yet: counted locally
    with pytest.raises(OverLimit) as refused:
        limiter.admit("t1", "acme", limits, 3.0, WALL)
    assert "has used 1050 of its 1000 monthly tokens" in str(refused.value)
    assert "2026-12-01 00:00 UTC" in str(refused.value)
    assert refused.value.retry_after_ms == int((next_month_start(WALL) - WALL) * 1000)
    # A ledger read that covers the charge replaces it, without counting it twice.
    month.confirm(1050, month_of(WALL), covered_through=2.5)
    assert month.used(month_of(WALL)) == 1050 and not month.local
    # A new month starts from zero.
    assert _admitted(limiter, limits, 4.0, wall=next_month_start(WALL) + 1)


def test_month_to_date_keeps_charges_the_ledger_read_did_not_cover() -> None:
    m = MonthToDate()
    key = month_of(WALL)
    m.charge(10, 1.0, key)
    m.charge(20, 5.0, key)
    m.confirm(100, key, covered_through=3.0)  # the shipper had confirmed up to t=3
    assert m.used(key) == 120


def test_a_new_limit_reshapes_the_bucket_and_zero_removes_it() -> None:
    limiter = Limiter()
    assert all(_admitted(limiter, TenantLimits(requests_per_s=100), 0.0) for _ in range(3))
    # The new, smaller burst applies at once: 2 more, then the new rate.
    assert sum(_admitted(limiter, TenantLimits(requests_per_s=2), 0.0) for _ in range(10)) == 2
    assert all(_admitted(limiter, TenantLimits(), 0.0) for _ in range(100))


def test_two_routers_with_half_shares_admit_no_more_than_the_tenants_rate_together() -> None:
    a, b = Limiter(share=0.5), Limiter(share=0.5)
    limits = TenantLimits(requests_per_s=10, max_concurrent=4)
    passed = 0
    for i in range(2000):  # 10 s of a client hammering both routers every 5 ms
        now = i * 0.005
        for router in (a, b):
            if _admitted(router, limits, now):
                passed += 1
                router.release("t1", 0, now, WALL)
    assert 10 * 10 <= passed <= 10 * 10 + 10  # rate x time, plus one burst
    # Concurrency: each router holds its half.
    held = sum(_admitted(r, limits, 100.0) for r in (a, b) for _ in range(10))
    assert held == 4


def test_a_tiny_limit_still_admits_one_per_router() -> None:
    limiter = Limiter(share=0.25)
    assert _admitted(limiter, TenantLimits(max_concurrent=1), 0.0)
    assert not _admitted(limiter, TenantLimits(max_concurrent=1), 0.0)


def test_share_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="fraction"):
        Limiter(share=0.0)
