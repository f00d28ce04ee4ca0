"""Turns a scheduled batch into flat tensors, runs the model once, and samples.

Everything a layer needs besides its input (positions, cache slots, block tables and mask, and
the rows' adapter segments from LoraBatchBuilder) is built here once per step and shared by all
layers.
"""

from __future__ import annotations

import torch

from services.worker.engine.adapter_slots import DeviceAdapter
from services.worker.engine.config import EngineConfig
from services.worker.engine.constrained import MaskJob
from services.worker.engine.lora_batch import LoraBatchBuilder, long_tensor
from services.worker.engine.scheduler import ScheduledBatch
from services.worker.layers.attention import AttentionMetadata
from services.worker.layers.sampler import sample
from services.worker.models.llama import LlamaForCausalLM, StepContext

CPU_KV_BYTES = 512 << 20


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
        self.lora = LoraBatchBuilder(model, self.device)
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
        ctx = StepContext(positions, attention, self.lora.build(batch, offsets, adapters))
        # Constrained rows' token masks are computed on other threads while the forward pass runs.
        masks = MaskJob.start([seqs[i].grammar for i in sampling], self.model.config.vocab_size)
        hidden = self.model(long_tensor(tokens, self.device), ctx)
        if not sampling:
            return {}
        last = long_tensor([offsets[i + 1] - 1 for i in sampling], self.device)
        logits = self.model.compute_logits(hidden.index_select(0, last))
        if masks is not None:
            masks.apply(logits)
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
