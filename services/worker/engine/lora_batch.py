"""Per step: which tokens belong to which adapter, and the step's adapters stacked per group.

A group is a rank bucket and a set of target modules (DeviceAdapter.group): adapters that target
different modules are stacked apart, so none is padded with zeros at a module it does not target.

Built once per step and shared by every layer. Stacked weights are kept while the step's set of
adapters is unchanged, which in steady decoding is almost every step, so decoding never copies
adapter weights; the size of the resident pool does not enter a step at all.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from services.worker.engine.adapter_slots import DeviceAdapter
from services.worker.engine.scheduler import ScheduledBatch
from services.worker.layers.lora import LoraBatch, LoraGroup, ModuleKey
from services.worker.models.llama import LlamaForCausalLM

StackedWeights = dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]


def long_tensor(values: list[int]) -> torch.Tensor:
    """A host index tensor; the runner sends a step's index tensors to the device in one copy."""
    return torch.tensor(values, dtype=torch.long)


class LoraBatchBuilder:
    def __init__(self, model: LlamaForCausalLM, device: str) -> None:
        self.model = model
        self.device = device
        self._stacks: dict[tuple, tuple[tuple[int, ...], StackedWeights]] = {}
        self._dora: tuple[tuple[int, ...], dict[ModuleKey, torch.Tensor]] = ((), {})

    def build(
        self, batch: ScheduledBatch, offsets: list[int], adapters: dict[str, DeviceAdapter]
    ) -> LoraBatch | None:
        rows: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(batch.seqs):
            if s.adapter is not None:
                rows[s.adapter].extend(range(offsets[i], offsets[i + 1]))
        if not rows:
            return None
        by_group: dict[tuple, list[DeviceAdapter]] = defaultdict(list)
        for digest in sorted(rows):
            by_group[adapters[digest].group].append(adapters[digest])
        stacks, self._stacks = self._stacks, {}  # keep only the groups this step uses
        groups = [self._group(members, rows, stacks) for _, members in sorted(by_group.items())]
        lora = LoraBatch(groups)
        dora = [adapters[d] for d in sorted(rows) if adapters[d].is_dora]
        if dora:
            lora.dora_tokens = long_tensor([t for a in dora for t in rows[a.digest]])
            lora.dora_rows = long_tensor([j for j, a in enumerate(dora) for _ in rows[a.digest]])
            lora.dora_scales = self._dora_scales(dora)
        return lora

    def _group(
        self, members: list[DeviceAdapter], rows: dict[str, list[int]], stacks: dict[tuple, tuple]
    ) -> LoraGroup:
        seg_len = max(len(rows[a.digest]) for a in members)
        gather: list[int] = []
        valid: list[int] = []
        dest: list[int] = []
        for j, a in enumerate(members):
            toks = rows[a.digest]
            gather += toks + [toks[0]] * (seg_len - len(toks))
            valid += range(j * seg_len, j * seg_len + len(toks))
            dest += toks
        padded = len(valid) != len(gather)
        contiguous = not padded and dest == list(range(dest[0], dest[0] + len(dest)))
        return LoraGroup(
            num_adapters=len(members),
            seg_len=seg_len,
            gather_index=long_tensor(gather),
            valid=long_tensor(valid) if padded else None,
            dest=long_tensor(dest),
            weights=self._stacked(members, stacks),
            span=(dest[0], dest[0] + len(dest)) if contiguous else None,
        )

    def _stacked(self, members: list[DeviceAdapter], stacks: dict[tuple, tuple]) -> StackedWeights:
        group, bucket, uids = members[0].group, members[0].bucket, tuple(a.uid for a in members)
        cached = stacks.get(group)
        if cached is not None and cached[0] == uids:
            self._stacks[group] = cached
            return cached[1]
        weights: StackedWeights = {}
        if len(members) == 1:
            # A view, not a copy: an adapter alone in its bucket (the common case right after a
            # cold load) costs its first step nothing extra.
            (only,) = members
            weights = {k: (only.a_t[k].unsqueeze(0), only.b_t[k].unsqueeze(0)) for k in sorted(only.a_t)}
            self._stacks[group] = (uids, weights)
            return weights
        keys = sorted({k for a in members for k in a.a_t})
        for key in keys:
            linear = self.model.linear(key)
            assert linear is not None
            dtype = linear.weight.dtype
            za = torch.zeros(linear.in_features, bucket, dtype=dtype, device=self.device)
            zb = torch.zeros(bucket, linear.out_features, dtype=dtype, device=self.device)
            weights[key] = (
                torch.stack([a.a_t.get(key, za) for a in members]),
                torch.stack([a.b_t.get(key, zb) for a in members]),
            )
        self._stacks[group] = (uids, weights)
        return weights

    def _dora_scales(self, dora: list[DeviceAdapter]) -> dict[ModuleKey, torch.Tensor]:
        uids = tuple(a.uid for a in dora)
        if self._dora[0] == uids:
            return self._dora[1]
        scales: dict[ModuleKey, torch.Tensor] = {}
        for key in sorted({k for a in dora for k in a.dora_scale}):
            linear = self.model.linear(key)
            assert linear is not None
            ones = torch.ones(linear.out_features, dtype=linear.weight.dtype, device=self.device)
            scales[key] = torch.stack([a.dora_scale.get(key, ones) for a in dora])
        self._dora = (uids, scales)
        return scales

    def forget_stacks(self) -> None:
        """Drop cached stacks, e.g. after an unload, so their memory is released."""
        self._stacks.clear()
        self._dora = ((), {})
