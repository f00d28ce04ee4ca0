"""The worker's content-addressed adapter disk cache: nothing unverified ever lands in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.adapter_errors import NotFound, TooLarge
from services.common.adapter_files import ADAPTER_WEIGHTS, adapter_digest, digest_hex
from services.worker.adapters import AdapterSpec, DigestMismatch, Tier, fetch_to_cache
from tests.fixtures.tiny_peft import write_adapter


@pytest.fixture
def stored(tmp_path: Path) -> AdapterSpec:
    directory = write_adapter("lora", tmp_path / "store" / "x")
    return AdapterSpec(digest=adapter_digest(directory), uri=directory.as_uri(), label="support@1")


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_first_fetch_comes_from_the_store_then_from_disk(stored: AdapterSpec, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    tier, path = fetch_to_cache(stored, cache, max_bytes=1 << 20)
    assert tier is Tier.OBJECT_STORE and path == cache / digest_hex(stored.digest)
    assert adapter_digest(path) == stored.digest
    assert fetch_to_cache(stored, cache, max_bytes=1 << 20) == (Tier.DISK, path)
    assert leftovers(cache) == [digest_hex(stored.digest)]


def test_wrong_digest_is_refused_and_leaves_nothing(stored: AdapterSpec, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    wrong = AdapterSpec(digest="sha256:" + "0" * 64, uri=stored.uri)
    with pytest.raises(DigestMismatch, match="the adapter's bytes do not match its digest"):
        fetch_to_cache(wrong, cache, max_bytes=1 << 20)
    assert leftovers(cache) == []


def test_a_tampered_cache_entry_is_fetched_again(stored: AdapterSpec, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _, path = fetch_to_cache(stored, cache, max_bytes=1 << 20)
    (path / ADAPTER_WEIGHTS).write_bytes(b"not the adapter")
    tier, again = fetch_to_cache(stored, cache, max_bytes=1 << 20)
    assert tier is Tier.OBJECT_STORE and adapter_digest(again) == stored.digest


def test_missing_files_say_which_adapter_and_where(tmp_path: Path) -> None:
    spec = AdapterSpec(digest="sha256:" + "1" * 64, uri=(tmp_path / "gone").as_uri(), label="support@2")
    with pytest.raises(NotFound, match=r"adapter support@2 cannot be fetched: .*does not exist"):
        fetch_to_cache(spec, tmp_path / "cache", max_bytes=1 << 20)
    assert leftovers(tmp_path / "cache") == []


def test_oversized_adapters_stop_downloading_at_the_limit(stored: AdapterSpec, tmp_path: Path) -> None:
    with pytest.raises(TooLarge):
        fetch_to_cache(stored, tmp_path / "cache", max_bytes=100)
    assert leftovers(tmp_path / "cache") == []


def test_a_fetch_remembers_what_it_verified_and_only_unverified_entries_are_hashed(
    stored: AdapterSpec, tmp_path: Path
) -> None:
    cache, verified = tmp_path / "cache", set[str]()
    tier, path = fetch_to_cache(stored, cache, max_bytes=1 << 20, verified=verified)
    assert tier is Tier.OBJECT_STORE and verified == {stored.digest}
    assert fetch_to_cache(stored, cache, max_bytes=1 << 20, verified=verified) == (Tier.DISK, path)
    # An entry this process did not fetch (left by an earlier run) is hashed before it is trusted.
    (path / ADAPTER_WEIGHTS).write_bytes(b"not the adapter")
    restarted: set[str] = set()
    tier, again = fetch_to_cache(stored, cache, max_bytes=1 << 20, verified=restarted)
    assert tier is Tier.OBJECT_STORE and adapter_digest(again) == stored.digest
    assert restarted == {stored.digest}
