"""Per-tenant limits at the router: token buckets, a concurrency counter and the monthly quota.

Pure: no gRPC, no registry, no clock of its own (every call takes `now`, a monotonic time, and
`wall`, seconds since the epoch, for the calendar month). services.router.limit_gate feeds it the
limits the registry stores and the month-to-date usage from the ledger.

- requests_per_s: a token bucket of rate r and burst max(1, r); one token per admitted request.
- tokens_per_min: a token bucket of rate t/60 per second and capacity t, charged with the tokens a
  request actually consumed (input + output) as its stream ends. The cost of a request is not known
  when it is admitted, so a request is admitted while the bucket is not in debt, and the bucket may
  go into debt by the cost of the streams already open; new requests wait until it has refilled.
- max_concurrent: streams open at once; a slot is released when the stream ends, however it ends.
- monthly_tokens: the month-to-date tokens in the registry's ledger (shared by every router) plus
  the tokens this router charged that the ledger did not yet hold when it was read.

With several routers, each enforces `share` of the rates and of the concurrency (share = 1/N for N
routers behind one balancer), so together they admit no more than the tenant's limit; each
router admits at least one request at a time and a burst of one, so a tiny limit over many routers
rounds up. The monthly quota is not shared out: every router reads the same ledger.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime


@dataclass(frozen=True)
class TenantLimits:
    """What the registry stores for a tenant; 0 is unlimited."""

    requests_per_s: int = 0
    tokens_per_min: int = 0
    max_concurrent: int = 0
    monthly_tokens: int = 0


NO_LIMITS = TenantLimits()


class OverLimit(Exception):
    """Refused: `str(exc)` names the limit, `retry_after_ms` is when to try again."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second. `charge` may take it into debt (below 0)."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self._updated = now

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self.level = min(self.capacity, self.level + (now - self._updated) * self.rate)
            self._updated = now

    def wait_for(self, n: float, now: float) -> float:
        """Seconds until `n` tokens are there (0: now)."""
        self._refill(now)
        return 0.0 if self.level >= n else (n - self.level) / self.rate

    def take(self, n: float, now: float) -> None:
        self._refill(now)
        self.level -= n

    def reshape(self, rate: float, capacity: float, now: float) -> None:
        """A new limit: keeps what was used (and any debt), never more than the new capacity."""
        self._refill(now)
        self.rate, self.capacity = rate, capacity
        self.level = min(self.level, capacity)


@dataclass
class MonthToDate:
    """One tenant's tokens this calendar month: the ledger's figure plus local charges it lacks."""

    month: tuple[int, int] = (0, 0)
    ledger_tokens: int = 0
    # (monotonic time, month, tokens) charged here; dropped once a ledger read covers them.
    local: deque[tuple[float, tuple[int, int], int]] = field(default_factory=deque)

    def charge(self, tokens: int, now: float, month: tuple[int, int]) -> None:
        if tokens > 0:
            self.local.append((now, month, tokens))

    def confirm(self, ledger_tokens: int, month: tuple[int, int], covered_through: float) -> None:
        """The ledger held `ledger_tokens` for `month`, with every local charge before `covered_through`."""
        self.month, self.ledger_tokens = month, ledger_tokens
        while self.local and (self.local[0][0] < covered_through or self.local[0][1] != month):
            self.local.popleft()

    def used(self, month: tuple[int, int]) -> int:
        ledger = self.ledger_tokens if self.month == month else 0
        return ledger + sum(tokens for _, m, tokens in self.local if m == month)


def month_of(wall: float) -> tuple[int, int]:
    d = datetime.fromtimestamp(wall, UTC)
    return d.year, d.month


def month_start(wall: float) -> float:
    """The first instant (UTC) of the calendar month `wall` falls in, in seconds since the epoch."""
    year, month = month_of(wall)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def next_month_start(wall: float) -> float:
    year, month = month_of(wall)
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


@dataclass
class _Tenant:
    limits: TenantLimits = NO_LIMITS
    inflight: int = 0
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    month: MonthToDate = field(default_factory=MonthToDate)


class Limiter:
    """This router's limit state for every tenant."""

    def __init__(self, share: float = 1.0, *, concurrency_pushback_ms: int = 250) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be a fraction in (0, 1], got {share}")
        self.share = share
        self._pushback_ms = max(1, concurrency_pushback_ms)
        self._tenants: dict[str, _Tenant] = {}

    def _state(self, tenant_id: str, limits: TenantLimits, now: float) -> _Tenant:
        t = self._tenants.get(tenant_id)
        if t is None:
            t = self._tenants[tenant_id] = _Tenant()
        if t.limits != limits:
            t.requests = self._bucket(t.requests, limits.requests_per_s, 1.0, now)
            t.tokens = self._bucket(t.tokens, limits.tokens_per_min, 60.0, now)
            t.limits = limits
        return t

    def _bucket(self, bucket: TokenBucket | None, limit: int, per_s: float, now: float) -> TokenBucket | None:
        if not limit:
            return None
        rate = limit * self.share / per_s
        # Requests/s: a burst of one second's worth; tokens/min: one minute's worth.
        capacity = max(1.0, limit * self.share)
        if bucket is None:
            return TokenBucket(rate, capacity, now)
        bucket.reshape(rate, capacity, now)
        return bucket

    def concurrency_limit(self, limits: TenantLimits) -> int:
        return max(1, math.floor(limits.max_concurrent * self.share)) if limits.max_concurrent else 0

    def month_to_date(self, tenant_id: str) -> MonthToDate:
        t = self._tenants.get(tenant_id)
        if t is None:
            t = self._tenants[tenant_id] = _Tenant()
        return t.month

    def inflight(self, tenant_id: str) -> int:
        t = self._tenants.get(tenant_id)
        return t.inflight if t is not None else 0

    def admit(self, tenant_id: str, name: str, limits: TenantLimits, now: float, wall: float) -> None:
        """Takes a request slot (release it with `release`), or raises OverLimit and changes nothing."""
        t = self._state(tenant_id, limits, now)
        if limits.monthly_tokens:
            used = t.month.used(month_of(wall))
            if used >= limits.monthly_tokens:
                resets = next_month_start(wall)
                when = datetime.fromtimestamp(resets, UTC).strftime("%Y-%m-%d %H:%M UTC")
                raise OverLimit(
                    f"tenant {name!r} has used {used} of its {limits.monthly_tokens} monthly tokens; "
                    f"the quota renews at {when}",
                    _ms(resets - wall),
                )
        slots = self.concurrency_limit(limits)
        if slots and t.inflight >= slots:
            raise OverLimit(
                f"tenant {name!r} is over its limit of {limits.max_concurrent} concurrent requests"
                f"{self._per_router(slots)}; retry when one of its streams ends",
                self._pushback_ms,
            )
        if t.tokens is not None:
            # Admitted while not in debt: any positive cost would wait for the bucket to reach 0.
            wait = t.tokens.wait_for(0.0, now)
            if wait > 0:
                raise OverLimit(
                    f"tenant {name!r} is over its limit of {limits.tokens_per_min} tokens/min; "
                    f"retry in {_ms(wait)} ms",
                    _ms(wait),
                )
        if t.requests is not None:
            wait = t.requests.wait_for(1.0, now)
            if wait > 0:
                raise OverLimit(
                    f"tenant {name!r} is over its limit of {limits.requests_per_s} requests/s; "
                    f"retry in {_ms(wait)} ms",
                    _ms(wait),
                )
            t.requests.take(1.0, now)
        t.inflight += 1

    def release(self, tenant_id: str, tokens: int, now: float, wall: float) -> None:
        """The stream ended: frees its slot and charges what it consumed (input + output tokens)."""
        t = self._tenants.get(tenant_id)
        if t is None:
            return
        t.inflight = max(0, t.inflight - 1)
        if t.tokens is not None:
            t.tokens.take(tokens, now)
        if t.limits.monthly_tokens:
            t.month.charge(tokens, now, month_of(wall))

    def _per_router(self, slots: int) -> str:
        return f" ({slots} on this router)" if self.share < 1.0 else ""
