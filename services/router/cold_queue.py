"""Requests held while their base model has no live worker: the router as activator.

At the fleet level a base model nobody calls has zero workers (KEDA `minReplicaCount: 0`). The
first request for it must not fail: it waits here, in a bounded queue per base model, while the
autoscaler (watching `loraplex_router_pending_requests{base_model}`) starts a worker. As soon as a
worker for that model sends its first state snapshot, the pool calls `wake(model)` and every
waiter of that model routes again.

Bounds, so a model that never comes up cannot pile requests up in the router:
- at most `capacity` waiters per base model (the next one is refused at once);
- each waits at most `max_wait_s`, and never past its caller's deadline (`budget`).

Pure asyncio: no gRPC, no Prometheus; the pending count goes out through `on_pending`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_CAPACITY = 256
DEFAULT_MAX_WAIT_S = 120.0


class ColdQueueFull(Exception):
    """`capacity` requests already wait for this base model."""

    def __init__(self, model: str, waiting: int) -> None:
        super().__init__(f"{waiting} requests already wait for a worker of base model {model!r}")
        self.model = model
        self.waiting = waiting


@dataclass(eq=False)
class Waiter:
    """One held request. `wait` returns True when a worker for its model may have come up."""

    model: str
    _woken: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait(self, timeout_s: float) -> bool:
        """Waits for a wake-up or `timeout_s`; True if woken. Clears the wake-up for the next wait."""
        try:
            await asyncio.wait_for(self._woken.wait(), max(timeout_s, 0.0))
        except TimeoutError:
            return False
        self._woken.clear()
        return True


def _ignore(model: str, waiting: int) -> None:
    return None


@dataclass
class ColdQueue:
    capacity: int = DEFAULT_CAPACITY
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    # Called with (base model, waiting count) whenever that count changes: the pending gauge.
    on_pending: Callable[[str, int], None] = _ignore
    _waiting: dict[str, set[Waiter]] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0 and self.max_wait_s > 0

    def budget(self, caller_remaining_s: float | None) -> float:
        """How long a request may wait: `max_wait_s`, cut to the caller's remaining deadline (None:
        the caller set none). Zero or less: do not wait."""
        if not self.enabled:
            return 0.0
        if caller_remaining_s is None:
            return self.max_wait_s
        return min(self.max_wait_s, caller_remaining_s)

    def pending(self, model: str) -> int:
        return len(self._waiting.get(model, ()))

    def models(self) -> list[str]:
        """Base models with requests waiting now."""
        return [m for m, ws in self._waiting.items() if ws]

    def enter(self, model: str) -> Waiter:
        """Holds one request for `model`; raises ColdQueueFull at capacity. Pair with `leave`."""
        waiters = self._waiting.setdefault(model, set())
        if len(waiters) >= self.capacity:
            raise ColdQueueFull(model, len(waiters))
        waiter = Waiter(model)
        waiters.add(waiter)
        self.on_pending(model, len(waiters))
        return waiter

    def leave(self, waiter: Waiter) -> None:
        """The request stopped waiting (dispatched, timed out, cancelled). Idempotent."""
        waiters = self._waiting.get(waiter.model)
        if waiters is None or waiter not in waiters:
            return
        waiters.discard(waiter)
        self.on_pending(waiter.model, len(waiters))
        if not waiters:
            del self._waiting[waiter.model]

    def wake(self, model: str) -> int:
        """A worker for `model` became routable: every waiter of it tries routing again. Returns how
        many were woken. Waking all (not one) is right here: a fresh worker takes a whole queue into
        its own continuous batch, and a waiter that finds no room fails over like any request."""
        waiters = self._waiting.get(model, ())
        for w in waiters:
            w._woken.set()
        return len(waiters)
