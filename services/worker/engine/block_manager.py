"""Paged KV blocks: a free list, reference counts, and a key map for prefix reuse.

A full block is registered under its prefix key (prefix_keys.py): a sha256 chain rooted in the
sequence's (tenant, adapter digest), so the same tokens under two adapters never share KV (their
keys and values differ), and no block is ever shared, or reported as cached, across tenants. A
freed block keeps its key until it is handed out again, so a later request can still hit it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.worker.engine.prefix_keys import block_key
from services.worker.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: bytes | None = None  # its prefix key once full and computed


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered: the oldest freed block is reused first (LRU for cached prefixes).
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.key_to_block: dict[bytes, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def _take(self, block_id: int) -> Block:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
        return block

    def _take_fresh(self) -> int:
        block_id = next(iter(self.free))
        block = self._take(block_id)
        if block.key is not None and self.key_to_block.get(block.key) == block_id:
            del self.key_to_block[block.key]
        block.key = None
        return block_id

    def reuse_prefix(self, seq: Sequence) -> None:
        """Point a new sequence at cached blocks of its prompt; the last token is always computed."""
        assert not seq.block_table
        bs = self.block_size
        parent = seq.prefix_root
        num_full = (seq.num_prompt_tokens - 1) // bs
        self.prefix_queries += num_full
        for i in range(num_full):
            key = block_key(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block_id = self.key_to_block.get(key)
            if block_id is None:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_keys.append(key)
            parent = key
            self.prefix_hits += 1
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * bs

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_fresh())

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: make the newly completed blocks findable by later prompts."""
        bs = self.block_size
        while (len(seq.block_keys) + 1) * bs <= seq.num_computed_tokens:
            i = len(seq.block_keys)
            parent = seq.block_keys[-1] if seq.block_keys else seq.prefix_root
            key = block_key(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block = self.blocks[seq.block_table[i]]
            if block.key is None:
                block.key = key
                self.key_to_block.setdefault(key, block.block_id)
            seq.block_keys.append(key)

    def free_sequence(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.block_keys = []
        seq.num_computed_tokens = 0
