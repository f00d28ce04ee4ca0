"""Attention over the paged KV cache, for a flat batch mixing prompt chunks and decodes.

Per step the runner builds, once for all layers: the cache slot of every new token, each
sequence's block table padded to the longest, and the causal mask. Each layer writes the new
keys/values into the cache first, then gathers every sequence's context from it whole blocks at a
time (a few large copies rather than one small copy per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot for each new token
    block_tables: torch.Tensor  # [B, max_blocks] (padded with block 0, masked out)
    mask: torch.Tensor  # [B, 1, max_q, max_blocks * block_size] bool, True where a query may attend
    pad_index: torch.Tensor | None  # [B * max_q] flat token for each padded query (None: max_q == 1)
    unpad_index: torch.Tensor | None  # [T] padded position of each flat token
    max_q: int
    block_size: int


def paged_attention(
    q: torch.Tensor,  # [T, heads, d]
    k: torch.Tensor,  # [T, kv_heads, d]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks * block_size, kv_heads, d]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, heads, d]
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    b = meta.block_tables.shape[0]
    heads, d, kv_heads = q.shape[1], q.shape[2], k.shape[1]
    blocks = meta.block_tables.view(-1)
    num_blocks = k_cache.shape[0] // meta.block_size
    keys = k_cache.view(num_blocks, -1).index_select(0, blocks).view(b, -1, kv_heads, d).transpose(1, 2)
    values = v_cache.view(num_blocks, -1).index_select(0, blocks).view(b, -1, kv_heads, d).transpose(1, 2)
    if meta.pad_index is not None:
        q = q[meta.pad_index]
    queries = q.view(b, meta.max_q, heads, d).transpose(1, 2)  # [B, heads, max_q, d]
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=meta.mask, scale=scale, enable_gqa=kv_heads != heads
    )
    out = out.transpose(1, 2).reshape(b * meta.max_q, heads, d)
    if meta.unpad_index is not None:
        out = out[meta.unpad_index]
    return out
