"""Attention over the paged KV cache, for a flat batch mixing prompt chunks and decodes.

Per step the runner builds, once for all layers: the cache slot of every new token, each
sequence's key slots padded to the longest context, and the causal mask. Each layer writes the
new keys/values into the cache first, then reads every sequence's whole context from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot for each new token
    key_slots: torch.Tensor  # [B, max_ctx] cache slots of each sequence's context (padded)
    mask: torch.Tensor  # [B, 1, max_q, max_ctx] bool, True where a query may attend
    pad_index: torch.Tensor | None  # [B * max_q] flat token for each padded query (None: max_q == 1)
    unpad_index: torch.Tensor | None  # [T] padded position of each flat token
    max_q: int


def paged_attention(
    q: torch.Tensor,  # [T, heads, d]
    k: torch.Tensor,  # [T, kv_heads, d]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [slots, kv_heads, d]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, heads, d]
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    b = meta.key_slots.shape[0]
    heads, d = q.shape[1], q.shape[2]
    keys = k_cache[meta.key_slots].transpose(1, 2)  # [B, kv_heads, max_ctx, d]
    values = v_cache[meta.key_slots].transpose(1, 2)
    if meta.pad_index is not None:
        q = q[meta.pad_index]
    queries = q.view(b, meta.max_q, heads, d).transpose(1, 2)  # [B, heads, max_q, d]
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=meta.mask, scale=scale, enable_gqa=keys.shape[1] != heads
    )
    out = out.transpose(1, 2).reshape(b * meta.max_q, heads, d)
    if meta.unpad_index is not None:
        out = out[meta.unpad_index]
    return out
