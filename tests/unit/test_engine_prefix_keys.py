"""Prefix keys of KV blocks: a sha256 chain rooted in (tenant, adapter digest)."""

from __future__ import annotations

import hashlib
import struct

from services.worker.engine.prefix_keys import block_key, block_keys, root_key

BS = 4
PROMPT = list(range(100, 120))  # five full blocks
DIGEST = "sha256:" + "ab" * 32


def test_same_prompt_under_two_tenants_has_disjoint_keys() -> None:
    a = block_keys("tenant-a", None, PROMPT, BS)
    b = block_keys("tenant-b", None, PROMPT, BS)
    assert len(a) == len(b) == 5
    assert not set(a) & set(b)
    assert not set(block_keys("tenant-a", DIGEST, PROMPT, BS)) & set(
        block_keys("tenant-b", DIGEST, PROMPT, BS)
    )


def test_same_tenant_and_adapter_get_the_same_keys_for_a_shared_prefix() -> None:
    first = block_keys("t", DIGEST, PROMPT, BS)
    assert block_keys("t", DIGEST, PROMPT, BS) == first
    # Another prompt with the same first 12 tokens shares exactly the first three keys.
    other = block_keys("t", DIGEST, [*PROMPT[:12], 7, 7, 7, 7, 7], BS)
    assert other[:3] == first[:3] and other[3] != first[3]


def test_another_adapter_or_the_base_model_reuses_nothing() -> None:
    keys = {
        adapter: set(block_keys("t", adapter, PROMPT, BS))
        for adapter in (DIGEST, "sha256:" + "cd" * 32, None)
    }
    assert not keys[DIGEST] & keys[None]
    assert not keys[DIGEST] & keys["sha256:" + "cd" * 32]


def test_changing_one_token_in_block_k_changes_key_k_and_every_later_key() -> None:
    before = block_keys("t", None, PROMPT, BS)
    for k in range(5):
        changed = list(PROMPT)
        changed[k * BS + 2] += 1
        after = block_keys("t", None, changed, BS)
        assert after[:k] == before[:k]
        assert all(x != y for x, y in zip(after[k:], before[k:], strict=True))


def test_keys_are_sha256_over_the_parent_and_fixed_width_token_ids() -> None:
    root = root_key("t", DIGEST)
    expected_root = hashlib.sha256(
        b"loraplex-kv-prefix-v1"
        + (1).to_bytes(8, "little")
        + b"t"
        + (71).to_bytes(8, "little")
        + DIGEST.encode()
    ).digest()
    assert root == expected_root
    first = hashlib.sha256(root + struct.pack("<4I", *PROMPT[:4])).digest()
    assert block_keys("t", DIGEST, PROMPT, BS)[0] == first == block_key(root, PROMPT[:4])
    assert block_keys("t", DIGEST, PROMPT, BS)[1] == block_key(first, PROMPT[4:8])


def test_tenant_and_adapter_fields_cannot_be_shifted_into_each_other() -> None:
    # Without length prefixes ("ab", "c") and ("a", "bc") would encode to the same bytes.
    assert root_key("ab", "c") != root_key("a", "bc")
    assert root_key("", None) == root_key("", "") != root_key("", "x")
    # Token ids are fixed width: [1, 256] and [256, 1] differ, and so do ids that would
    # concatenate alike as decimal text.
    assert block_key(b"", [1, 256]) != block_key(b"", [256, 1])
    assert block_key(b"", [1, 23]) != block_key(b"", [12, 3])


def test_a_partial_last_block_has_no_key() -> None:
    assert len(block_keys("t", None, PROMPT[:7], BS)) == 1
    assert block_keys("t", None, PROMPT[:3], BS) == []
