"""Turns a scheduled batch into flat tensors, runs the model once, and samples.

Everything a layer needs besides its input (positions, cache slots, block tables and masks, and
the rows' adapter segments from LoraBatchBuilder) is built here once per step and shared by all
layers.
"""

from __future__ import annotations

import torch

from services.worker.engine import host_memory
from services.worker.engine.adapter_slots import DeviceAdapter
from services.worker.engine.config import EngineConfig
from services.worker.engine.constrained import MaskJob
from services.worker.engine.lora_batch import LoraBatchBuilder, long_tensor
from services.worker.engine.scheduler import ScheduledBatch
from services.worker.layers.attention import AttentionMetadata, DecodeGroup, PrefillGroup
from services.worker.layers.lora_edges import build_edge_batch
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
            shape = (cfg.num_kv_heads, slots, cfg.head_dim)  # head-major: see layers/attention.py
            attn.k_cache = host_memory.zeros(shape, dtype, self.device)
            attn.v_cache = host_memory.zeros(shape, dtype, self.device)
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
        # This step's adapters at the front of their groups' slots, then rows in slot order:
        # each group's weights are views of its slot buffers, and when its adapters have equal
        # token counts (decoding) its activations are a slice of x, with no gather or scatter.
        self.lora.arrange(batch, adapters)
        order = sorted(
            range(len(batch.seqs)), key=lambda i: (self.lora.row_key(batch.seqs[i].adapter, adapters), i)
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
        lora = self.lora.build(batch, offsets, adapters)
        extra = [long_tensor(tokens), *(lora.index_tensors() if lora is not None else [])]
        attention, positions, last, extra = self._metadata(
            batch, starts, [offsets[i + 1] - 1 for i in sampling], extra
        )
        if lora is not None:
            lora.place(extra[1:])
        input_ids = extra[0]
        assert input_ids is not None
        row_adapters = [adapters[s.adapter] if s.adapter is not None else None for s in seqs]
        edges = build_edge_batch(row_adapters, offsets, sampling, self.device)
        ctx = StepContext(positions, attention, lora, edges=edges)
        # Constrained rows' token masks are computed on other threads while the forward pass runs.
        masks = MaskJob.start([seqs[i].grammar for i in sampling], self.model.config.vocab_size)
        hidden = self.model(input_ids, ctx)
        if not sampling:
            return {}
        logits = self.model.compute_logits(hidden.index_select(0, last), edges)
        if masks is not None:
            masks.apply(logits)
        # Kept for inspection (the PEFT oracle compares them); rows follow the sampling sequences.
        self.last_logits = (logits, [seqs[i].request_id for i in sampling])
        tokens = sample(logits, [seqs[i] for i in sampling])
        return {seqs[i].request_id: t for i, t in zip(sampling, tokens, strict=True)}

    def _metadata(
        self, batch: ScheduledBatch, starts: list[int], last: list[int], extra: list[torch.Tensor | None]
    ) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """Attention metadata, positions [T], the sampled rows' last tokens and `extra` (the
        token ids and LoRA indices), on the device.

        Built on the host from small per-row vectors (nothing of size B x context), sent in one
        copy with `extra`; the masks are then derived on the device.
        """
        bs = self.block_size
        window = self.model.config.sliding_window
        counts = batch.num_tokens
        b = len(counts)
        q_lens = torch.tensor(counts)
        start = torch.tensor(starts)
        ctx_lens = start + q_lens
        first = torch.cumsum(q_lens, 0) - q_lens
        row = torch.repeat_interleave(torch.arange(b), q_lens)
        offset_in_seq = torch.arange(len(row)) - first[row]
        positions = start[row] + offset_in_seq
        max_blocks = -(-int(ctx_lens.max()) // bs)
        tables = torch.zeros(b, max_blocks, dtype=torch.long)
        for i, s in enumerate(batch.seqs):
            table = s.block_table[:max_blocks]
            tables[i, : len(table)] = torch.tensor(table)
        slot_mapping = tables[row, positions // bs] * bs + positions % bs
        host: list[torch.Tensor | None] = [slot_mapping, positions, torch.tensor(last, dtype=torch.long)]
        dec_rows = [i for i, n in enumerate(counts) if n == 1]
        pre_rows = [i for i, n in enumerate(counts) if n > 1]
        dec_blocks = max_q = pre_blocks = 0
        if dec_rows:
            idx = torch.tensor(dec_rows)
            lens = ctx_lens[idx]
            dec_blocks = -(-int(lens.max()) // bs)
            host += [tables[idx, :dec_blocks], lens, None if len(dec_rows) == b else first[idx]]
        if pre_rows:
            idx = torch.tensor(pre_rows)
            q_p = q_lens[idx]
            max_q = int(q_p.max())
            pre_blocks = -(-int(ctx_lens[idx].max()) // bs)
            clamped = torch.minimum(torch.arange(max_q), (q_p - 1).unsqueeze(1))
            prow = torch.repeat_interleave(torch.arange(len(pre_rows)), q_p)
            poff = torch.arange(len(prow)) - (torch.cumsum(q_p, 0) - q_p)[prow]
            host += [
                tables[idx, :pre_blocks],
                (first[idx].unsqueeze(1) + clamped).view(-1),
                prow * max_q + poff,
                None if len(pre_rows) == b else first[idx][prow] + poff,
                start[idx],
            ]
        dev = upload(host + extra, self.device)
        extra_d = dev[len(host) :]
        dev = dev[: len(host)]
        slot_mapping_d, positions_d, last_d = dev[0], dev[1], dev[2]
        decode = prefill = None
        rest = dev[3:]
        if dec_rows:
            tables_d, lens_d, tokens_d = rest[0], rest[1], rest[2]
            rest = rest[3:]
            assert tables_d is not None and lens_d is not None
            key_pos = torch.arange(dec_blocks * bs, device=self.device)
            bias = torch.zeros(len(dec_rows), 1, 1, dec_blocks * bs, device=self.device)
            bias.masked_fill_(key_pos >= lens_d.view(-1, 1, 1, 1), float("-inf"))
            window_bias = None
            if window is not None:  # the query sits at position len - 1: keys from len - W on
                far = key_pos < lens_d.view(-1, 1, 1, 1) - window
                window_bias = bias.masked_fill(far, float("-inf"))
            decode = DecodeGroup(tokens=tokens_d, block_tables=tables_d, bias=bias, window_bias=window_bias)
        if pre_rows:
            tables_p, tokens_p, unpad, dest, start_p = rest
            assert tables_p is not None and tokens_p is not None and unpad is not None and start_p is not None
            key_pos = torch.arange(pre_blocks * bs, device=self.device)
            q_pos = start_p.unsqueeze(1) + torch.arange(max_q, device=self.device)  # [B, max_q]
            mask = key_pos.view(1, 1, 1, -1) <= q_pos.view(len(pre_rows), 1, max_q, 1)
            window_mask = None
            if window is not None:
                near = key_pos.view(1, 1, 1, -1) > q_pos.view(len(pre_rows), 1, max_q, 1) - window
                window_mask = mask & near
            prefill = PrefillGroup(
                tokens=tokens_p,
                unpad_index=unpad,
                dest=dest,
                block_tables=tables_p,
                mask=mask,
                max_q=max_q,
                window_mask=window_mask,
            )
        assert slot_mapping_d is not None and positions_d is not None and last_d is not None
        meta = AttentionMetadata(slot_mapping=slot_mapping_d, block_size=bs, decode=decode, prefill=prefill)
        return meta, positions_d, last_d, extra_d


def upload(tensors: list[torch.Tensor | None], device: str) -> list[torch.Tensor | None]:
    """Integer step metadata onto the device in one copy (pinned, asynchronous on CUDA).

    On the CPU the tensors are used where they are. On CUDA a step's many small index tensors
    would otherwise be as many synchronous copies; here they travel as one buffer, sliced on the
    device, and the copy overlaps the host's remaining work.
    """
    if device == "cpu":
        return tensors
    present = [t.reshape(-1).long() for t in tensors if t is not None]
    if not present:
        return tensors
    flat = torch.cat(present).pin_memory().to(device, non_blocking=True)
    out: list[torch.Tensor | None] = []
    offset = 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        out.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out
