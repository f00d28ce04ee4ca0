"""One request as the engine sees it: token ids, status, block table, counters."""

from __future__ import annotations

import random
from enum import Enum, auto
from typing import TYPE_CHECKING

import torch

from services.worker.engine.prefix_keys import root_key
from services.worker.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from services.worker.engine.constrained import RowGrammar


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        adapter: str | None,
        tenant_id: str = "",
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.adapter = adapter  # digest, or None for the base model
        self.tenant_id = tenant_id  # whose request: its KV is shared with no other tenant
        self.prefix_root = root_key(tenant_id, adapter)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_keys: list[bytes] = []  # prefix keys of the full blocks whose KV is computed
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.finish_reason: str | None = None
        self.grammar: RowGrammar | None = None  # response_format's matcher; None for free text
        # Every request draws from its own generator, so its samples do not depend on its batch.
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
