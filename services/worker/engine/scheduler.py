"""Which sequences run this step, and how many of their tokens.

Decodes go first (one token each), then chunks of prompts, all under one token budget. The
waiting queue (fair_queue.py) admits round-robin across tenants, then across adapters within a
tenant, so one tenant's burst cannot starve another tenant, nor one adapter's the others. When
blocks run out, the newest running sequence is preempted: its blocks are freed and it goes back
to the front of the waiting queue to be recomputed later.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import EngineConfig
from services.worker.engine.fair_queue import FairQueue
from services.worker.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens of each sequence computed this step

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_batch_size = config.max_batch_size
        self.max_step_tokens = config.max_step_tokens
        self.max_waiting = config.max_waiting
        self.blocks = block_manager
        self.waiting: FairQueue[Sequence] = FairQueue(lambda seq: (seq.tenant_id, seq.adapter))
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, seq: Sequence) -> None:
        self.waiting.push(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of whichever queue holds it and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.remove(seq)
        self.blocks.free_sequence(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.push_front(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [])
        budget = self.max_step_tokens
        # Running sequences: decodes and unfinished prompt chunks, oldest first.
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted below to make room for an older one
            n = min(seq.num_uncomputed_tokens, budget)
            if n == 0:
                continue
            while self.blocks.blocks_needed(seq, n) > self.blocks.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.allocate(seq, n)
            batch.seqs.append(seq)
            batch.num_tokens.append(n)
            budget -= n
        # New sequences, round-robin across tenants, then across a tenant's adapters.
        while budget > 0 and len(self.running) < self.max_batch_size:
            head = self.waiting.peek()
            if head is None:
                break
            if not head.block_table:
                self.blocks.reuse_prefix(head)
            n = min(head.num_uncomputed_tokens, budget)
            if self.blocks.blocks_needed(head, n) > self.blocks.num_free:
                break
            self.waiting.pop()
            self.blocks.allocate(head, n)
            head.status = SequenceStatus.RUNNING
            self.running.append(head)
            batch.seqs.append(head)
            batch.num_tokens.append(n)
            budget -= n
        return batch
