"""Keys of cached KV blocks: a sha256 chain rooted in (tenant, adapter digest).

A block's KV depends on every token before it and on the adapter, and who computed it is
private: tenant B must never be served (or even learn of, through `cached_input_tokens`) a
block tenant A's prompt filled. So the chain starts at

    root = sha256("loraplex-kv-prefix-v1" || len(tenant) || tenant || len(adapter) || adapter)

(lengths as 8-byte little-endian, adapter = its digest, or "" for the base model), and each
full block of `block_size` tokens gets

    key_k = sha256(key_{k-1} || token ids of block k as 4-byte little-endian unsigned ints)

with key_{-1} = root. Every field has a fixed width or a length prefix, so two different
(tenant, adapter, tokens) never encode to the same bytes, and sha256 makes an accidental (or
crafted) collision between two encodings infeasible, unlike Python's 64-bit hash().
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

_DOMAIN = b"loraplex-kv-prefix-v1"


def _field(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(8, "little") + raw


def root_key(tenant_id: str, adapter_digest: str | None) -> bytes:
    """Where a sequence's chain starts: one per (tenant, adapter), "" for the base model."""
    return hashlib.sha256(_DOMAIN + _field(tenant_id) + _field(adapter_digest or "")).digest()


def block_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of one full block, given the key before it (or the root for the first block)."""
    # Token ids as uint32: every vocabulary the engine serves is far below 2**32 (the engine
    # refuses ids outside [0, vocab) before they get here; struct refuses them too).
    packed = struct.pack(f"<{len(token_ids)}I", *token_ids)
    return hashlib.sha256(parent + packed).digest()


def block_keys(
    tenant_id: str, adapter_digest: str | None, token_ids: Sequence[int], block_size: int
) -> list[bytes]:
    """The keys of every full block of `token_ids`, in order (a trailing partial block has none)."""
    keys: list[bytes] = []
    parent = root_key(tenant_id, adapter_digest)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_key(parent, token_ids[start : start + block_size])
        keys.append(parent)
    return keys
