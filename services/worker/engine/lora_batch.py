"""Per step: which tokens belong to which adapter slot, per group.

A group is a rank bucket, a DoRA flag and a set of target modules (DeviceAdapter.group). Before a
step, `arrange` brings each group's adapters of this step to the front of its slot buffers (moving
only adapters whose membership changed); the runner then orders rows by (group, slot), so each
group's weights are `buffer[:n]` views and, when its adapters have equal token counts, its
activations are a slice of x too. The size of the resident pool does not enter a step at all.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from services.worker.engine.adapter_slots import DeviceAdapter, GroupKey
from services.worker.engine.scheduler import ScheduledBatch
from services.worker.engine.slot_pool import SlotPool
from services.worker.layers.lora import LoraBatch, LoraGroup
from services.worker.models.llama import LlamaForCausalLM


def long_tensor(values: list[int]) -> torch.Tensor:
    """A host index tensor; the runner sends a step's index tensors to the device in one copy."""
    return torch.tensor(values, dtype=torch.long)


class LoraBatchBuilder:
    def __init__(self, model: LlamaForCausalLM, device: str) -> None:
        self.slots = SlotPool(model, device)
        self._members: dict[GroupKey, int] = {}

    def arrange(self, batch: ScheduledBatch, adapters: dict[str, DeviceAdapter]) -> None:
        """Put this step's adapters at the front of their groups' slots (before rows are ordered)."""
        step: dict[GroupKey, set[str]] = defaultdict(set)
        for s in batch.seqs:
            if s.adapter is not None:
                step[adapters[s.adapter].group].add(s.adapter)
        self._members = self.slots.arrange(step)

    def row_key(self, adapter: str | None, adapters: dict[str, DeviceAdapter]) -> tuple:
        """Rows sort by this: base rows first, then by group and slot."""
        if adapter is None:
            return ()
        group = adapters[adapter].group
        return (group, self.slots.groups[group].slot(adapter))

    def build(
        self, batch: ScheduledBatch, offsets: list[int], adapters: dict[str, DeviceAdapter]
    ) -> LoraBatch | None:
        """The step's groups; rows must already be ordered by `row_key` after `arrange`."""
        rows: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(batch.seqs):
            if s.adapter is not None:
                rows[s.adapter].extend(range(offsets[i], offsets[i + 1]))
        if not rows:
            return None
        by_group: dict[GroupKey, list[str]] = defaultdict(list)
        for digest in rows:
            by_group[adapters[digest].group].append(digest)
        groups = []
        for key in sorted(by_group):
            group = self.slots.groups[key]
            members = sorted(by_group[key], key=group.slot)
            n = self._members.get(key, 0)
            assert [group.slot(d) for d in members] == list(range(n)), "arrange() before build()"
            groups.append(self._group(members, rows, key))
        return LoraBatch(groups)

    def _group(self, members: list[str], rows: dict[str, list[int]], key: GroupKey) -> LoraGroup:
        slots = self.slots.groups[key]
        seg_len = max(len(rows[d]) for d in members)
        gather: list[int] = []
        valid: list[int] = []
        dest: list[int] = []
        dest_slot: list[int] = []
        for j, d in enumerate(members):
            toks = rows[d]
            gather += toks + [toks[0]] * (seg_len - len(toks))
            valid += range(j * seg_len, j * seg_len + len(toks))
            dest += toks
            dest_slot += [j] * len(toks)
        padded = len(valid) != len(gather)
        contiguous = not padded and dest == list(range(dest[0], dest[0] + len(dest)))
        n = len(members)
        return LoraGroup(
            num_adapters=n,
            seg_len=seg_len,
            gather_index=long_tensor(gather),
            valid=long_tensor(valid) if padded else None,
            dest=long_tensor(dest),
            weights=slots.weights(n),
            span=(dest[0], dest[0] + len(dest)) if contiguous else None,
            dora_scales=slots.dora_scales(n),
            dest_slot=long_tensor(dest_slot) if slots.is_dora else None,
        )
