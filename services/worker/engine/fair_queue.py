"""The waiting queue: round-robin across tenants, then across adapters within a tenant.

Each admission takes the head of the first tenant's first adapter queue, then moves that adapter
to the back of its tenant's rotation and that tenant to the back of the tenant rotation. So a
tenant with one waiting request is admitted within one round of tenants however many requests
(and adapters) another tenant has queued, and within a tenant no adapter starves another.
FIFO within one (tenant, adapter). A preempted request goes back to the very front, so it is the
next one admitted once there is room.

Pure bookkeeping, generic over the queued item; the scheduler queues Sequences.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
Tenant = str
Adapter = str | None


class FairQueue(Generic[T]):
    def __init__(self, key: Callable[[T], tuple[Tenant, Adapter]]) -> None:
        self._key = key
        self._tenants: OrderedDict[Tenant, OrderedDict[Adapter, deque[T]]] = OrderedDict()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def push(self, item: T) -> None:
        """Queue at the back of its (tenant, adapter) queue; a new tenant or adapter joins the
        back of its rotation."""
        tenant, adapter = self._key(item)
        self._tenants.setdefault(tenant, OrderedDict()).setdefault(adapter, deque()).append(item)
        self._len += 1

    def push_front(self, item: T) -> None:
        """Put an item back at the very front: it is the next peek()."""
        tenant, adapter = self._key(item)
        adapters = self._tenants.setdefault(tenant, OrderedDict())
        adapters.setdefault(adapter, deque()).appendleft(item)
        adapters.move_to_end(adapter, last=False)
        self._tenants.move_to_end(tenant, last=False)
        self._len += 1

    def peek(self) -> T | None:
        """The item the next pop() takes, or None when empty."""
        if not self._tenants:
            return None
        adapters = next(iter(self._tenants.values()))
        return next(iter(adapters.values()))[0]

    def pop(self) -> T:
        """Take the next item and rotate: its adapter to the back of its tenant's adapters, its
        tenant to the back of the tenants."""
        if not self._tenants:
            raise IndexError("pop from an empty FairQueue")
        tenant, adapters = next(iter(self._tenants.items()))
        adapter, queue = next(iter(adapters.items()))
        item = queue.popleft()
        self._len -= 1
        if queue:
            adapters.move_to_end(adapter)
        else:
            del adapters[adapter]
        if adapters:
            self._tenants.move_to_end(tenant)
        else:
            del self._tenants[tenant]
        return item

    def remove(self, item: T) -> bool:
        """Take a queued item out wherever it is (a cancelled request); False if not queued."""
        tenant, adapter = self._key(item)
        adapters = self._tenants.get(tenant)
        queue = adapters.get(adapter) if adapters is not None else None
        if adapters is None or queue is None or item not in queue:
            return False
        queue.remove(item)
        self._len -= 1
        if not queue:
            del adapters[adapter]
            if not adapters:
                del self._tenants[tenant]
        return True
