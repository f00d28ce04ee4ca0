"""Eviction orders within one tier: which resident adapter goes first.

`LruOrder` evicts the least recently used. `GdsfOrder` is Greedy-Dual-Size-Frequency (Cherkasova
1998): priority = L + frequency / size, the lowest goes first and L rises to the evicted priority,
so small, often used adapters outlive large, rarely used ones while L ages out stale ones.
"lfu_size" is the same heap with no L: priority = frequency / size (the knapsack order that is
optimal for a fixed popularity), aged instead by the policy halving every frequency every
`aging_window` accesses (LFU with aging, as TinyLFU's reset), so a burst's adapters lose their
counts within a few windows. All answer `victims(...)` without changing anything, so the policy
can check that a whole plan fits before it commits to any eviction.

One order per tier, each reading an adapter's size in its own tier (`size_of`): file bytes on
DISK, the engine layout's bytes on DEVICE and HOST, so priorities and freed bytes are the bytes
that tier's budget counts.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol


class Item(Protocol):
    digest: str
    last_used: float
    freq: int


SizeOf = Callable[[Item], int]  # an item's bytes in the order's tier


class Order(Protocol):
    ages: bool  # priorities depend on frequencies the policy halves now and then

    def touch(self, item: Item) -> None: ...
    def refresh(self, item: Item) -> None: ...
    def discard(self, digest: str, *, evicted: bool) -> None: ...
    def victims(
        self,
        needed: int,
        evictable: Callable[[str], Item | None],
        colder_than: Item | None = None,
    ) -> list[Item] | None: ...


class LruOrder:
    ages = False

    def __init__(self, size_of: SizeOf) -> None:
        self.size_of = size_of
        self._od: OrderedDict[str, None] = OrderedDict()

    def touch(self, item: Item) -> None:
        self._od[item.digest] = None
        self._od.move_to_end(item.digest)

    def refresh(self, item: Item) -> None:
        pass  # recency did not change

    def discard(self, digest: str, *, evicted: bool) -> None:
        self._od.pop(digest, None)

    def victims(
        self,
        needed: int,
        evictable: Callable[[str], Item | None],
        colder_than: Item | None = None,
    ) -> list[Item] | None:
        """Least recent first until `needed` bytes are covered; None if they cannot be."""
        out: list[Item] = []
        freed = 0
        for digest in self._od:
            if freed >= needed:
                break
            item = evictable(digest)
            if item is None:
                continue
            if colder_than is not None and item.last_used > colder_than.last_used:
                break  # everything after this one is more recent still
            out.append(item)
            freed += self.size_of(item)
        return out if freed >= needed else None


class GdsfOrder:
    def __init__(self, size_of: SizeOf, *, inflate: bool = True) -> None:
        self.size_of = size_of
        self._heap: list[tuple[float, int, str]] = []
        self._live: dict[str, tuple[float, int]] = {}
        self._seq = itertools.count()  # ties go to the one touched longest ago
        self.inflation = 0.0
        self.inflate = inflate
        self.ages = not inflate

    def priority(self, item: Item) -> float:
        return self.inflation + item.freq * 1e6 / max(self.size_of(item), 1)

    def touch(self, item: Item) -> None:
        key = (self.priority(item), next(self._seq))
        self._live[item.digest] = key
        heapq.heappush(self._heap, (key[0], key[1], item.digest))
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [(p, s, d) for d, (p, s) in self._live.items()]
            heapq.heapify(self._heap)

    def refresh(self, item: Item) -> None:
        self.touch(item)

    def discard(self, digest: str, *, evicted: bool) -> None:
        key = self._live.pop(digest, None)
        if evicted and self.inflate and key is not None:
            self.inflation = max(self.inflation, key[0])

    def victims(
        self,
        needed: int,
        evictable: Callable[[str], Item | None],
        colder_than: Item | None = None,
    ) -> list[Item] | None:
        limit = self.priority(colder_than) if colder_than is not None else float("inf")
        out: list[Item] = []
        popped: list[tuple[float, int, str]] = []
        freed = 0
        while freed < needed and self._heap:
            top = heapq.heappop(self._heap)
            prio, seq, digest = top
            if self._live.get(digest) != (prio, seq):
                continue  # stale: touched again or gone since it was pushed
            popped.append(top)
            if prio > limit:
                break
            item = evictable(digest)
            if item is not None:
                out.append(item)
                freed += self.size_of(item)
        for top in popped:  # the caller discards the victims it evicts
            heapq.heappush(self._heap, top)
        return out if freed >= needed else None


def make_order(kind: str, size_of: SizeOf) -> Order:
    if kind == "lru":
        return LruOrder(size_of)
    if kind == "gdsf":
        return GdsfOrder(size_of)
    if kind == "lfu_size":
        return GdsfOrder(size_of, inflate=False)
    raise ValueError(f"unknown eviction order {kind!r} (lfu_size, gdsf or lru)")
