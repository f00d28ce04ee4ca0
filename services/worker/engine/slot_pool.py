"""Device-tier adapters in preallocated slot buffers, one set per group and module.

A group is a rank bucket, a DoRA flag and a set of target modules (DeviceAdapter.group). For each
of its modules it owns A [capacity, bucket, in], (sB)^T [capacity, bucket, out] and, for DoRA,
the row scale [capacity, out], in the engine's dtype on the engine's device. Installing writes an
adapter into a free slot once; a step reads its group's adapters as `buffer[:n]`, a view (the slot
table keeps them at the front), so the batched matmuls never read a stacked copy. Bytes moved to
keep that order are counted, so tests and metrics can see that steady decoding copies nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import torch

from services.worker.engine.adapter_slots import DeviceAdapter, GroupKey
from services.worker.engine.slot_table import SlotTable
from services.worker.layers.lora import ModuleKey
from services.worker.models.llama import LlamaForCausalLM


@dataclass
class SlotStats:
    bytes_copied: int = 0  # moved between slots: membership swaps and compaction after removal
    bytes_installed: int = 0  # written by installs
    bytes_regrown: int = 0  # copied into larger or smaller buffers when capacity changed


class SlotGroup:
    def __init__(
        self,
        key: GroupKey,
        shapes: dict[ModuleKey, tuple[int, int]],
        dtype: torch.dtype,
        device: str,
        stats: SlotStats,
    ) -> None:
        self.key = key
        self.bucket, self.is_dora, self.modules = key
        self.shapes = shapes
        self.dtype, self.device = dtype, device
        self.stats = stats
        self.table = SlotTable()
        self.a: dict[ModuleKey, torch.Tensor] = {}
        self.b: dict[ModuleKey, torch.Tensor] = {}
        self.dora: dict[ModuleKey, torch.Tensor] = {}
        self._capacity = 0
        self._views: tuple[int, dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]] = (-1, {})
        self._dora_views: tuple[int, dict[ModuleKey, torch.Tensor]] = (-1, {})
        self._resize(0)
        element = torch.empty(0, dtype=dtype).element_size()
        self.slot_bytes = element * sum(
            i * self.bucket + self.bucket * o + (o if self.is_dora else 0) for i, o in shapes.values()
        )

    def __len__(self) -> int:
        return len(self.table)

    @property
    def slack_bytes(self) -> int:
        return self.table.slack * self.slot_bytes

    def install(self, adapter: DeviceAdapter) -> None:
        slot = self.table.add(adapter.digest)
        if self.table.capacity != self._capacity:
            self._resize(self.table.capacity)
        for k in self.modules:
            self.a[k][slot].copy_(adapter.a[k], non_blocking=True)
            self.b[k][slot].copy_(adapter.b_t[k], non_blocking=True)
            if self.is_dora:
                scale = adapter.dora_scale.get(k)
                if scale is None:
                    self.dora[k][slot].fill_(1)
                else:
                    self.dora[k][slot].copy_(scale, non_blocking=True)
        self.stats.bytes_installed += self.slot_bytes

    def remove(self, digest: str, template: DeviceAdapter) -> DeviceAdapter:
        """Take an adapter out; returns `template` holding copies of its slot's tensors."""
        slot = self.table.slot(digest)
        out = replace(
            template,
            a={k: self.a[k][slot].clone() for k in self.modules},
            b_t={k: self.b[k][slot].clone() for k in self.modules},
            dora_scale={k: self.dora[k][slot].clone() for k in self.modules} if self.is_dora else {},
        )
        for src, dst in self.table.remove(digest):
            self._copy_slot(src, dst)
        if self.table.capacity != self._capacity:
            self._resize(self.table.capacity)
        return out

    def arrange(self, step: Collection[str]) -> int:
        """Bring the step's adapters to slots [0, n); returns n."""
        for i, j in self.table.arrange(step):
            self._swap_slots(i, j)
        return self.table.members

    def slot(self, digest: str) -> int:
        return self.table.slot(digest)

    def weights(self, n: int) -> dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]:
        """Each module's A and B_t of slots [0, n), as views. The last n's views are kept until the
        buffers are reallocated: slicing every module's buffers anew cost ~0.7 ms a group a step
        (all-linear, 30 layers), and steady decoding asks for the same n step after step."""
        if self._views[0] != n:
            self._views = (n, {k: (self.a[k][:n], self.b[k][:n]) for k in self.modules})
        return self._views[1]

    def dora_scales(self, n: int) -> dict[ModuleKey, torch.Tensor]:
        if not self.is_dora:
            return {}
        if self._dora_views[0] != n:
            self._dora_views = (n, {k: self.dora[k][:n] for k in self.modules})
        return self._dora_views[1]

    def _buffers(self) -> list[dict[ModuleKey, torch.Tensor]]:
        return [self.a, self.b, self.dora] if self.is_dora else [self.a, self.b]

    def _copy_slot(self, src: int, dst: int) -> None:
        for buf in self._buffers():
            for t in buf.values():
                t[dst].copy_(t[src])
        self.stats.bytes_copied += self.slot_bytes

    def _swap_slots(self, i: int, j: int) -> None:
        for buf in self._buffers():
            for t in buf.values():
                held = t[i].clone()
                t[i].copy_(t[j])
                t[j].copy_(held)
        self.stats.bytes_copied += 2 * self.slot_bytes

    def _resize(self, capacity: int) -> None:
        used = min(len(self.table), self._capacity, capacity)  # slots holding weights already
        for k, (i, o) in self.shapes.items():
            new_a = torch.zeros(capacity, self.bucket, i, dtype=self.dtype, device=self.device)
            new_b = torch.zeros(capacity, self.bucket, o, dtype=self.dtype, device=self.device)
            if k in self.a and used:
                new_a[:used].copy_(self.a[k][:used])
                new_b[:used].copy_(self.b[k][:used])
            self.a[k], self.b[k] = new_a, new_b
            if self.is_dora:
                new_d = torch.ones(capacity, o, dtype=self.dtype, device=self.device)
                if k in self.dora and used:
                    new_d[:used].copy_(self.dora[k][:used])
                self.dora[k] = new_d
        if used:
            self.stats.bytes_regrown += used * self.slot_bytes
        self._capacity = capacity
        self._views, self._dora_views = (-1, {}), (-1, {})  # views of the old buffers


class SlotPool:
    """Every device-tier adapter's slot, by group."""

    def __init__(self, model: LlamaForCausalLM, device: str) -> None:
        self.model = model
        self.device = device
        self.dtype = model.lm_head.weight.dtype
        self.groups: dict[GroupKey, SlotGroup] = {}
        self.stats = SlotStats()

    def install(self, adapter: DeviceAdapter) -> None:
        group = self.groups.get(adapter.group)
        if group is None:
            shapes: dict[ModuleKey, tuple[int, int]] = {}
            for k in adapter.targets:
                linear = self.model.linear(k)
                assert linear is not None  # to_device checked every target
                shapes[k] = (linear.in_features, linear.out_features)
            group = SlotGroup(adapter.group, shapes, self.dtype, self.device, self.stats)
            self.groups[adapter.group] = group
        group.install(adapter)

    def remove(self, adapter: DeviceAdapter) -> DeviceAdapter:
        group = self.groups[adapter.group]
        out = group.remove(adapter.digest, adapter)
        if not len(group):
            del self.groups[adapter.group]
        return out

    def arrange(self, step: Mapping[GroupKey, Collection[str]]) -> dict[GroupKey, int]:
        """Each group's step adapters at its front (a group absent from `step` keeps none there)."""
        return {key: group.arrange(step.get(key, ())) for key, group in self.groups.items()}

    @property
    def slack_bytes(self) -> int:
        return sum(g.slack_bytes for g in self.groups.values())

    @property
    def occupied_bytes(self) -> int:
        return sum(len(g) * g.slot_bytes for g in self.groups.values())
