"""Which adapter sits in which slot of a group's preallocated buffers (pure bookkeeping, no tensors).

Occupied slots are always dense, [0, len), so a buffer's occupied part is one slice. The adapters
of the current step come first, [0, members), so a step reads the group's weights as a view of the
buffers' front and never stacks them. Keeping that order costs swaps only for the adapters whose
membership changed: a leaver trades places with a joiner, or with the last member; a joiner with
the first non-member. Steady decoding (the same adapters as the last step) swaps nothing.

Capacity grows when full by a chunk (at least `chunk` slots, an eighth of the capacity beyond
that, so filling a pool of 2,000 regrows its buffers a few dozen times, not hundreds), and is
trimmed back when the empty slots exceed one growth step, so slack stays bounded by it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

Swap = tuple[int, int]


@dataclass
class SlotTable:
    chunk: int = 8
    capacity: int = 0
    digests: list[str] = field(default_factory=list)  # the adapter in each occupied slot
    members: int = 0  # slots [0, members) hold the current step's adapters
    _where: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.digests)

    def __contains__(self, digest: str) -> bool:
        return digest in self._where

    def slot(self, digest: str) -> int:
        return self._where[digest]

    @property
    def slack(self) -> int:
        return self.capacity - len(self.digests)

    def growth(self) -> int:
        """Slots added when full; also the most slack kept after a removal."""
        return max(self.chunk, self.capacity // 8)

    def add(self, digest: str) -> int:
        """Its new slot (the first free one). Grows `capacity` when full: the caller grows buffers."""
        if digest in self._where:
            raise ValueError(f"adapter {digest} already has slot {self._where[digest]}")
        if len(self.digests) == self.capacity:
            self.capacity += self.growth()
        self._where[digest] = len(self.digests)
        self.digests.append(digest)
        return self._where[digest]

    def remove(self, digest: str) -> list[Swap]:
        """Free its slot, keeping members and occupied slots dense. Returns the slot moves (src, dst)
        to apply to the buffers, in order; a move's source slot is free afterwards. May lower
        `capacity` (the caller trims buffers after applying the moves)."""
        moves: list[Swap] = []
        pos = self._where[digest]
        if pos < self.members:
            # Out of the member run first: the last member fills its place.
            last_member = self.members - 1
            if pos != last_member:
                moves.append((last_member, pos))
                self._place(self.digests[last_member], pos)
                pos = last_member
            self.members -= 1
        last = len(self.digests) - 1
        if pos != last:
            moves.append((last, pos))
            self._place(self.digests[last], pos)
        self.digests.pop()
        del self._where[digest]
        if self.slack > self.growth():
            self.capacity = self._trimmed()
        return moves

    def _trimmed(self) -> int:
        n = len(self.digests)
        return -(-n // self.chunk) * self.chunk

    def arrange(self, step: Collection[str]) -> list[Swap]:
        """Bring exactly `step`'s adapters to the front, [0, len(step)). Returns the slot swaps to
        apply to the buffers, in order; none when the step's adapters are the last step's."""
        swaps: list[Swap] = []
        current = set(self.digests[: self.members])
        leavers = sorted((d for d in current if d not in step), key=self._where.__getitem__)
        joiners = sorted((d for d in step if d not in current), key=self._where.__getitem__)
        for d in joiners:
            if d not in self._where:
                raise KeyError(f"adapter {d} has no slot in this group")
        paired = min(len(leavers), len(joiners))
        for leaver, joiner in zip(leavers[:paired], joiners[:paired], strict=True):
            swaps.append(self._swap(self._where[leaver], self._where[joiner]))
        for leaver in reversed(leavers[paired:]):
            swaps.append(self._swap(self._where[leaver], self.members - 1))
            self.members -= 1
        for joiner in joiners[paired:]:
            swaps.append(self._swap(self._where[joiner], self.members))
            self.members += 1
        return [s for s in swaps if s[0] != s[1]]

    def _swap(self, i: int, j: int) -> Swap:
        if i != j:
            di, dj = self.digests[i], self.digests[j]
            self._place(di, j)
            self._place(dj, i)
        return (i, j)

    def _place(self, digest: str, pos: int) -> None:
        self.digests[pos] = digest
        self._where[digest] = pos
