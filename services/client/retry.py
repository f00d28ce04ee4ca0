"""When the Python client retries a Generate call, and how long it waits: pure logic, no gRPC.

A call is retried only while nothing was generated for it (no delta received), only for the two
statuses that mean "not now" (UNAVAILABLE: a router, worker or registry is down or restarting;
RESOURCE_EXHAUSTED: over capacity or over a tenant limit), and always with the same request id,
so the router runs it at most once even when an earlier attempt's fate is unknown to the client.

The wait is the server's `grpc-retry-pushback-ms` when it sent one (a negative value means: do
not retry), else "full jitter" exponential backoff: uniform(0, min(cap, initial * 2**attempt)).

How long to keep trying is a time budget (seconds since the first attempt began), with a count as
a backstop against a server that refuses instantly: a client wants to ride out a restart of any
one part of the stack (a registry restart with a full spool behind it takes ~10 s, a PostgreSQL
restart up to ~20 s, an object-store outage while an adapter is cold as long as it lasts), and a
count of retries says nothing about time when the router's pushback sets the waits.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.common.config import Env

PUSHBACK_KEY = "grpc-retry-pushback-ms"
# grpc.StatusCode names, so this module needs no grpc import.
RETRYABLE_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
DEFAULT_RETRIES = 40
DEFAULT_BUDGET_S = 60.0
DEFAULT_INITIAL_BACKOFF_S = 0.25
DEFAULT_MAX_BACKOFF_S = 5.0


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = DEFAULT_RETRIES  # attempts after the first; 0: never retry
    initial_backoff_s: float = DEFAULT_INITIAL_BACKOFF_S
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S
    # No retry starts later than this many seconds after the first attempt began.
    budget_s: float = DEFAULT_BUDGET_S

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {self.budget_s}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 < initial_backoff_s <= max_backoff_s, got {self.initial_backoff_s} "
                f"and {self.max_backoff_s}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetryPolicy:
        """LORAPLEX_CLIENT_RETRIES (default 40), LORAPLEX_CLIENT_RETRY_BUDGET_S (default 60) and
        LORAPLEX_CLIENT_MAX_BACKOFF_S (default 5)."""
        env = Env(environ)
        cap = env.number("CLIENT_MAX_BACKOFF_S", DEFAULT_MAX_BACKOFF_S, minimum=0.01)
        return cls(
            retries=env.integer("CLIENT_RETRIES", DEFAULT_RETRIES, minimum=0),
            initial_backoff_s=min(DEFAULT_INITIAL_BACKOFF_S, cap),
            max_backoff_s=cap,
            budget_s=env.number("CLIENT_RETRY_BUDGET_S", DEFAULT_BUDGET_S, minimum=0.01),
        )

    def delay_s(
        self,
        attempt: int,
        code: str,
        *,
        generated: bool,
        pushback_ms: int | None = None,
        elapsed_s: float = 0.0,
        rng: random.Random | None = None,
    ) -> float | None:
        """Seconds to wait before retrying after failed attempt number `attempt` (0-based), or
        None when the call must not be retried.

        generated: whether any token reached the client in this attempt (then never retry: the
        router refuses a request id that produced tokens, and the client has a partial answer).
        elapsed_s: seconds since the first attempt began; no retry starts past `budget_s`.
        """
        if generated or code not in RETRYABLE_CODES or attempt >= self.retries:
            return None
        if pushback_ms is not None:
            # The server knows when it can take the call again better than any backoff does.
            wait = None if pushback_ms < 0 else pushback_ms / 1000
        else:
            ceiling = min(self.max_backoff_s, self.initial_backoff_s * 2**attempt)
            wait = (rng or random).uniform(0, ceiling)
        if wait is None or elapsed_s + wait > self.budget_s:
            return None
        return wait


NO_RETRY = RetryPolicy(retries=0)


def pushback_ms(trailing: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """The server's grpc-retry-pushback-ms, if it sent a well-formed one."""
    for key, value in trailing or ():
        if key == PUSHBACK_KEY:
            text = value.decode() if isinstance(value, bytes) else value
            try:
                return int(text)
            except ValueError:
                return None
    return None
