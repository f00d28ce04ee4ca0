"""Object store -> this worker: fetches on their own threads, and the disk copies written behind.

A cold load fetches into memory (hashed as it arrives) so the next step parses those bytes at
once, while one writer thread puts the disk copy behind it (fetch.write_to_cache); past
WRITE_BEHIND_MAX_BYTES held for the writer, fetches stream straight to disk instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from services.common.adapter_files import ADAPTER_WEIGHTS, SafetensorsHeader, read_safetensors_header
from services.worker.adapters.disk_tier import DiskTier
from services.worker.adapters.fetch import (
    FetchedAdapter,
    fetch_to_cache,
    fetch_to_memory,
    fetch_weights_header,
    s3_client,
    write_to_cache,
)
from services.worker.adapters.spec import AdapterSpec
from services.worker.tiers import Tier

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

T = TypeVar("T")
# Fetched bytes waiting for the disk writer, at most: past this, cold fetches stream to disk.
WRITE_BEHIND_MAX_BYTES = 1 << 30
DOWNLOAD_THREADS = 8  # one hung object-store fetch holds one thread, never the others' loads


class Fetcher:
    def __init__(self, disk: DiskTier, *, max_adapter_bytes: int, object_store_timeout_s: float) -> None:
        self.disk = disk
        self.cache_dir = disk.root
        self.max_adapter_bytes = max_adapter_bytes
        self.object_store_timeout_s = object_store_timeout_s
        # Digests whose disk copy this process hashed (or fetched and hashed) already.
        self.verified: set[str] = set()
        self._downloads = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="adapter-fetch")
        # Disk-cache writes behind cold loads: one thread, so they queue on the disk, not on us.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="adapter-write")
        self._fetched: dict[str, FetchedAdapter] = {}  # cold bytes between a plan's two steps
        self._writes: dict[str, asyncio.Future[Path]] = {}  # disk copies being written behind
        self._write_behind_bytes = 0  # held in memory for them (bounded by WRITE_BEHIND_MAX_BYTES)
        self._s3: S3Client | None = None

    def close(self) -> None:
        self._downloads.shutdown(wait=False, cancel_futures=True)
        self._writer.shutdown(wait=False, cancel_futures=True)  # a staging dir left is swept at start

    def pending_writes(self) -> list[asyncio.Future[Path]]:
        return list(self._writes.values())

    def take_fetched(self, digest: str) -> FetchedAdapter | None:
        """The bytes a cold fetch kept in memory for the plan's next step, if any."""
        return self._fetched.pop(digest, None)

    async def fetch(self, spec: AdapterSpec) -> tuple[Tier, Path]:
        """The verified files on disk (fetched if missing); where they really came from."""
        await self.written(spec.digest)
        s3 = self._s3_client() if spec.uri.startswith("s3://") else None
        return await self._in(
            self._downloads,
            fetch_to_cache,
            spec,
            self.cache_dir,
            max_bytes=self.read_limit(spec),
            s3=s3,
            verified=self.verified,
        )

    async def fetch_write_behind(self, spec: AdapterSpec, size: int) -> Tier:
        """A cold fetch into memory (verified) for the plan's next step; the disk copy follows."""
        await self.written(spec.digest)
        if self.disk.path(spec.digest).is_dir() or self._write_behind_bytes + size > WRITE_BEHIND_MAX_BYTES:
            # On disk already, or the disk is behind: stream to disk rather than hold more in memory.
            got, _ = await self.fetch(spec)
            return got
        s3 = self._s3_client() if spec.uri.startswith("s3://") else None
        fetched = await self._in(
            self._downloads, fetch_to_memory, spec, max_bytes=self.read_limit(spec), s3=s3
        )
        self._fetched[spec.digest] = fetched
        self._write_behind_bytes += fetched.size_bytes
        write = asyncio.get_running_loop().run_in_executor(
            self._writer, write_to_cache, fetched, self.cache_dir, self.verified
        )
        self._writes[spec.digest] = write

        def written(f: asyncio.Future[Path]) -> None:
            self._write_behind_bytes -= fetched.size_bytes
            if self._writes.get(spec.digest) is f:
                del self._writes[spec.digest]
            if not f.cancelled() and f.exception() is not None:
                # The policy counts a disk copy that is not there; the next load fetches again.
                log.warning("writing adapter %s to the disk cache failed: %s", spec.digest, f.exception())

        write.add_done_callback(written)
        return Tier.OBJECT_STORE

    async def weights_header(self, spec: AdapterSpec) -> SafetensorsHeader:
        """The safetensors header of the adapter's weights: from the disk copy when there is one,
        else a ranged read of the object store's (unverified: see fetch_weights_header)."""
        local = self.disk.path(spec.digest) / ADAPTER_WEIGHTS
        try:
            return await asyncio.to_thread(read_safetensors_header, local)
        except (FileNotFoundError, NotADirectoryError):
            pass  # not on disk (or deleted while we looked)
        s3 = self._s3_client() if spec.uri.startswith("s3://") else None
        return await self._in(
            self._downloads, fetch_weights_header, spec, max_bytes=self.read_limit(spec), s3=s3
        )

    async def written(self, digest: str) -> None:
        """Wait for a disk copy being written behind (its failure is logged, not raised here)."""
        write = self._writes.get(digest)
        if write is not None:
            await asyncio.wait([write])

    def read_limit(self, spec: AdapterSpec) -> int:
        """The most bytes a fetch may read: the registry's size for the reference, within the cap."""
        if spec.size_bytes > 0:
            return min(spec.size_bytes, self.max_adapter_bytes)
        return self.max_adapter_bytes

    def _s3_client(self) -> S3Client:
        if self._s3 is None:  # built on the event loop: boto3 sessions are not thread-safe
            self._s3 = s3_client(self.object_store_timeout_s)
        return self._s3

    async def _in(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, lambda: fn(*args, **kwargs))
