"""Turns a scheduled batch into flat tensors, runs the model once, and samples.

Everything a layer needs besides its input (positions, cache slots, key slots and mask, the
rows' adapter segments and stacked adapter weights) is built here once per step and shared by
all layers. Stacked adapter weights are kept while the step's set of adapters is unchanged,
which in steady decoding is almost every step.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from services.worker.engine.adapter_slots import DeviceAdapter
from services.worker.engine.config import EngineConfig
from services.worker.engine.scheduler import ScheduledBatch
from services.worker.layers.attention import AttentionMetadata
from services.worker.layers.lora import LoraBatch, LoraGroup, ModuleKey
from services.worker.layers.sampler import sample
from services.worker.models.llama import LlamaForCausalLM, StepContext

CPU_KV_BYTES = 512 << 20

StackedWeights = dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]


def _long(values: list[int], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: LlamaForCausalLM) -> None:
        self.model = model
        self.device = config.device
        self.block_size = config.kv_block_size
        cfg = model.config
        dtype = model.lm_head.weight.dtype
        self.num_blocks = config.kv_cache_blocks or self._blocks_from_budget(config, dtype)
        slots = self.num_blocks * self.block_size
        for attn in model.attention_layers():
            shape = (slots, cfg.num_kv_heads, cfg.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self._stacks: dict[int, tuple[tuple[int, ...], StackedWeights]] = {}
        self._dora: tuple[tuple[int, ...], dict[ModuleKey, torch.Tensor]] = ((), {})
        self.last_logits: tuple[torch.Tensor, list[str]] = (torch.empty(0), [])

    def _blocks_from_budget(self, config: EngineConfig, dtype: torch.dtype) -> int:
        cfg = self.model.config
        per_block = 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim
        per_block *= torch.empty(0, dtype=dtype).element_size()
        budget = config.kv_cache_bytes
        if budget is None:
            budget = torch.cuda.mem_get_info()[0] // 2 if config.device.startswith("cuda") else CPU_KV_BYTES
        return max(2, budget // per_block)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, adapters: dict[str, DeviceAdapter]) -> dict[str, int]:
        """Compute this step's tokens; returns request id -> sampled token for every sequence that
        reached its end (prompt chunks that are not the last sample nothing)."""
        # Rows of one adapter side by side, adapters of one rank bucket side by side: then most
        # LoRA segments are plain slices of the activations, with no gather or scatter.
        order = sorted(
            range(len(batch.seqs)),
            key=lambda i: (self._bucket_of(batch.seqs[i].adapter, adapters), batch.seqs[i].adapter or "", i),
        )
        batch = ScheduledBatch([batch.seqs[i] for i in order], [batch.num_tokens[i] for i in order])
        seqs, counts = batch.seqs, batch.num_tokens
        starts = [s.num_computed_tokens for s in seqs]
        tokens: list[int] = []
        for s, start, n in zip(seqs, starts, counts, strict=True):
            tokens.extend(s.token_ids[start : start + n])
        sampling = [
            i for i, (s, st, n) in enumerate(zip(seqs, starts, counts, strict=True)) if st + n == len(s)
        ]
        offsets = [0]
        for n in counts:
            offsets.append(offsets[-1] + n)
        attention, positions = self._attention(batch, starts)
        ctx = StepContext(positions, attention, self._lora(batch, offsets, adapters))
        hidden = self.model(_long(tokens, self.device), ctx)
        if not sampling:
            return {}
        last = _long([offsets[i + 1] - 1 for i in sampling], self.device)
        logits = self.model.compute_logits(hidden.index_select(0, last))
        # Kept for inspection (the PEFT oracle compares them); rows follow the sampling sequences.
        self.last_logits = (logits, [seqs[i].request_id for i in sampling])
        tokens = sample(logits, [seqs[i] for i in sampling])
        return {seqs[i].request_id: t for i, t in zip(sampling, tokens, strict=True)}

    @staticmethod
    def _bucket_of(adapter: str | None, adapters: dict[str, DeviceAdapter]) -> int:
        return 0 if adapter is None else adapters[adapter].bucket

    def _attention(self, batch: ScheduledBatch, starts: list[int]) -> tuple[AttentionMetadata, torch.Tensor]:
        bs = self.block_size
        q_lens = torch.tensor(batch.num_tokens)
        start = torch.tensor(starts)
        ctx_lens = start + q_lens
        b, max_q, max_ctx = len(starts), int(q_lens.max()), int(ctx_lens.max())
        max_blocks = -(-max_ctx // bs)
        tables = torch.zeros(b, max_blocks, dtype=torch.long)
        for i, s in enumerate(batch.seqs):
            table = s.block_table[:max_blocks]
            tables[i, : len(table)] = torch.tensor(table)
        row = torch.repeat_interleave(torch.arange(b), q_lens)
        first = torch.cumsum(q_lens, 0) - q_lens
        offset_in_seq = torch.arange(len(row)) - first[row]
        positions = start[row] + offset_in_seq
        slot_mapping = tables[row, positions // bs] * bs + positions % bs
        key_pos = torch.arange(max_blocks * bs)
        q_pos = start.unsqueeze(1) + torch.arange(max_q)  # [B, max_q]
        mask = (key_pos < ctx_lens.view(b, 1, 1)) & (key_pos <= q_pos.unsqueeze(2))
        pad_index = unpad_index = None
        if max_q > 1:
            clamped = torch.minimum(torch.arange(max_q), (q_lens - 1).unsqueeze(1))
            pad_index = (first.unsqueeze(1) + clamped).view(-1).to(self.device)
            unpad_index = (row * max_q + offset_in_seq).to(self.device)
        meta = AttentionMetadata(
            slot_mapping=slot_mapping.to(self.device),
            block_tables=tables.to(self.device),
            mask=mask.unsqueeze(1).to(self.device),
            pad_index=pad_index,
            unpad_index=unpad_index,
            max_q=max_q,
            block_size=bs,
        )
        return meta, positions.to(self.device)

    def _lora(
        self, batch: ScheduledBatch, offsets: list[int], adapters: dict[str, DeviceAdapter]
    ) -> LoraBatch | None:
        rows: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(batch.seqs):
            if s.adapter is not None:
                rows[s.adapter].extend(range(offsets[i], offsets[i + 1]))
        if not rows:
            return None
        by_bucket: dict[int, list[DeviceAdapter]] = defaultdict(list)
        for digest in sorted(rows):
            by_bucket[adapters[digest].bucket].append(adapters[digest])
        groups = [self._group(members, rows) for _, members in sorted(by_bucket.items())]
        lora = LoraBatch(groups)
        dora = [adapters[d] for d in sorted(rows) if adapters[d].is_dora]
        if dora:
            lora.dora_tokens = _long([t for a in dora for t in rows[a.digest]], self.device)
            lora.dora_rows = _long([j for j, a in enumerate(dora) for _ in rows[a.digest]], self.device)
            lora.dora_scales = self._dora_scales(dora)
        return lora

    def _group(self, members: list[DeviceAdapter], rows: dict[str, list[int]]) -> LoraGroup:
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
            gather_index=_long(gather, self.device),
            valid=_long(valid, self.device) if padded else None,
            dest=_long(dest, self.device),
            weights=self._stacked(members),
            span=(dest[0], dest[0] + len(dest)) if contiguous else None,
        )

    def _stacked(self, members: list[DeviceAdapter]) -> StackedWeights:
        bucket, uids = members[0].bucket, tuple(a.uid for a in members)
        cached = self._stacks.get(bucket)
        if cached is not None and cached[0] == uids:
            return cached[1]
        keys = sorted({k for a in members for k in a.a_t})
        weights: StackedWeights = {}
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
        self._stacks[bucket] = (uids, weights)
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
