"""Admits requests under their tenant's limits: services.router.limits plus the ledger's monthly figure.

The month-to-date usage of a tenant with a monthly quota is read from the registry's ledger
(UsageService.TenantTokens, shared by every router) at most every `refresh_s`; between reads,
this router adds the tokens it charged that the ledger may not hold yet. A charge counts locally
until a ledger read that started after the shipper confirmed a shipping round begun after the
charge (the usage record is spooled before the charge), so nothing is counted zero times, and a
charge is counted twice only for the few seconds until the next read. While the ledger cannot be
read, the last figure plus every local charge since stands in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.router.limits import Limiter, OverLimit, month_of, month_start
from services.router.registry_view import Principal, RegistryUnavailable

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 2.0


@dataclass(frozen=True)
class Ticket:
    """A request admitted under its tenant's limits; released once, when its stream ends."""

    tenant_id: str


class LimitGate:
    def __init__(
        self,
        limiter: Limiter,
        month_usage: Callable[[str, float], Awaitable[int]],
        confirmed_through: Callable[[], float],
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.limiter = limiter
        self._month_usage = month_usage
        self._confirmed_through = confirmed_through
        self._refresh_s = refresh_s
        self._clock = clock
        self._wall = wall
        self._read_at: dict[str, float] = {}
        self._reads: dict[str, asyncio.Task[None]] = {}

    async def admit(self, principal: Principal) -> Ticket:
        """Raises OverLimit with a sentence and the pushback; otherwise the request holds a slot."""
        limits = principal.limits
        if limits.monthly_tokens:
            await self._refresh_month(principal.tenant_id)
        self.limiter.admit(principal.tenant_id, principal.tenant_name, limits, self._clock(), self._wall())
        return Ticket(principal.tenant_id)

    def release(self, ticket: Ticket, tokens: int) -> None:
        self.limiter.release(ticket.tenant_id, tokens, self._clock(), self._wall())

    async def _refresh_month(self, tenant_id: str) -> None:
        read_at = self._read_at.get(tenant_id)
        if read_at is not None and self._clock() - read_at < self._refresh_s:
            return
        task = self._reads.get(tenant_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._read_month(tenant_id))
            self._reads[tenant_id] = task
            task.add_done_callback(lambda _: self._reads.pop(tenant_id, None))
        # Shielded: a cancelled client does not cancel the read the others wait for.
        await asyncio.shield(task)

    async def _read_month(self, tenant_id: str) -> None:
        started, wall = self._clock(), self._wall()
        covered = self._confirmed_through()
        try:
            tokens = await self._month_usage(tenant_id, month_start(wall))
        except RegistryUnavailable as exc:
            log.warning(
                "cannot read the month-to-date usage of tenant %s (%s); using the last figure", tenant_id, exc
            )
            self._read_at[tenant_id] = started
            return
        self.limiter.month_to_date(tenant_id).confirm(tokens, month_of(wall), covered)
        self._read_at[tenant_id] = started


__all__ = ["LimitGate", "OverLimit", "Ticket"]
