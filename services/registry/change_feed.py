"""Wakes WatchAdapters streams when an adapter changes, in this process or any other registry replica.

Local writes wake watchers directly; PostgreSQL NOTIFY (sent by the writing transaction) wakes
watchers of other replicas. A timeout bounds every wait, so a lost notification only delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)


class ChangeFeed:
    def __init__(self) -> None:
        self._latest = 0
        self._changed = asyncio.Condition()

    def wake_all(self) -> None:
        asyncio.get_running_loop().create_task(self._wake())

    def notify_local(self, revision: int) -> None:
        self._latest = max(self._latest, revision)
        asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_change(self, *, after: int, timeout_s: float) -> None:
        """Returns when a revision > `after` may exist, or after `timeout_s`."""
        if self._latest > after:
            return
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)

    def on_notify(self, payload: str) -> None:
        """Callback for PostgreSQL NOTIFY adapter_changes (payload: the revision)."""
        try:
            revision = int(payload) if payload else self._latest + 1
        except ValueError:
            revision = self._latest + 1
        self.notify_local(revision)
