"""Object store -> disk tier: download into a staging directory, verify the digest, rename into place.

Blocking; the loader runs it on its download threads. S3 calls use a client with connect and read
timeouts and two attempts, so a store that accepts connections and never answers fails the fetch
of the adapters it holds within a bounded time instead of hanging a download thread forever.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from services.common import object_store
from services.common.adapter_errors import InvalidSafetensors, NotFound, TooLarge
from services.common.adapter_files import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    AdapterDigest,
    SafetensorsHeader,
    adapter_digest,
    digest_hex,
    parse_safetensors_header,
    safetensors_header_length,
)
from services.common.object_store import ObjectStore, open_store
from services.worker.adapters.spec import AdapterSpec, DigestMismatch, StoreUnavailable
from services.worker.tiers import Tier

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

STAGING_PREFIX = ".fetch-"
# First read of a remote weights file's header: a real adapter's header (a few hundred tensor
# entries) fits, so one ranged GET usually does; a longer one takes a second, exact read.
HEADER_READ_BYTES = 64 << 10


def s3_client(timeout_s: float) -> S3Client:
    """A client for adapter fetches: bounded connect/read waits, one retry."""
    return object_store.s3_client(
        Config(
            connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 2, "mode": "standard"}
        )
    )


def open_adapter_store(uri: str, s3: S3Client | None) -> ObjectStore:
    return open_store(uri.rstrip("/"), s3)


def fetch_to_cache(
    spec: AdapterSpec,
    cache_dir: Path,
    *,
    max_bytes: int,
    s3: S3Client | None = None,
    verified: set[str] | None = None,
) -> tuple[Tier, Path]:
    """The verified local copy of an adapter, `<cache_dir>/<digest hex>/`, fetched if absent.

    Returns DISK when a verified copy was there, else OBJECT_STORE. Bytes are hashed as they
    arrive, land in a staging directory and are renamed into place only once their digest matches,
    so the cache never holds an entry that was not verified; on any failure nothing of this adapter
    is left behind. `verified` holds the digests this process already checked on disk (a fetch
    adds its own): their directories are trusted without hashing them again, which is most of a
    disk load for a large adapter. Entries found on disk at start are hashed once, on first use.
    """
    final = cache_dir / digest_hex(spec.digest)
    if final.is_dir():
        if verified is not None and spec.digest in verified:
            return Tier.DISK, final
        if adapter_digest(final) == spec.digest:
            if verified is not None:
                verified.add(spec.digest)
            return Tier.DISK, final
        log.warning("disk cache entry %s does not match its digest; fetching it again", final)
        shutil.rmtree(final, ignore_errors=True)
    if verified is not None:
        verified.discard(spec.digest)
    with _staged(cache_dir, final) as staging:
        _check_digest(spec, _download(spec, staging, max_bytes, s3))
    if verified is not None:
        verified.add(spec.digest)
    return Tier.OBJECT_STORE, final


@contextlib.contextmanager
def _staged(cache_dir: Path, final: Path) -> Iterator[Path]:
    """A staging directory, renamed to `final` when the block succeeds and removed in any case."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=STAGING_PREFIX))
    try:
        yield staging
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            # Another fetch of the same digest won the race; its copy is identical.
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download(spec: AdapterSpec, staging: Path, max_bytes: int, s3: S3Client | None) -> str:
    """Download the adapter's files into `staging`; returns the digest of what arrived."""
    store = open_adapter_store(spec.uri, s3)
    budget = max_bytes
    digest = AdapterDigest()
    for name in ADAPTER_FILES:
        with _fetch_errors(spec):
            budget -= store.download(
                name, staging / name, max_bytes=budget, on_chunk=functools.partial(digest.update, name)
            )
    return digest.hexdigest()


def fetch_weights_header(
    spec: AdapterSpec, *, max_bytes: int, s3: S3Client | None = None
) -> SafetensorsHeader:
    """Only the safetensors header of the adapter's weights, from its object store, to size its
    device layout before anything is downloaded: one ranged read (two past HEADER_READ_BYTES),
    within the header cap and `max_bytes`. Not verified (the digest covers whole files), so
    whoever plans with it checks the plan against the verified bytes."""
    store = open_adapter_store(spec.uri, s3)
    with _fetch_errors(spec):
        head, size = store.read_head(ADAPTER_WEIGHTS, HEADER_READ_BYTES)
        uri = store.uri_for(ADAPTER_WEIGHTS)
        if size > max_bytes:
            raise TooLarge(f"{uri} is {size} bytes, over the limit of {max_bytes} bytes.", limit=max_bytes)
        end = 8 + safetensors_header_length(head, size)
        if end > len(head):
            head, size = store.read_head(ADAPTER_WEIGHTS, end)
            if len(head) < end:
                raise InvalidSafetensors(f"{uri} changed while its header was read; retry the request.")
    return parse_safetensors_header(head[8:end], data_size=size - end, file_name=ADAPTER_WEIGHTS)


@dataclass(frozen=True)
class FetchedAdapter:
    """An adapter's files in memory, digest verified: a cold load parses these while the disk
    copy is written behind it, so a slow disk never delays the first token."""

    digest: str
    files: dict[str, bytearray]

    @property
    def size_bytes(self) -> int:
        return sum(len(b) for b in self.files.values())


def fetch_to_memory(spec: AdapterSpec, *, max_bytes: int, s3: S3Client | None = None) -> FetchedAdapter:
    """The adapter's files from its object store, hashed as they arrive; DigestMismatch if wrong."""
    store = open_adapter_store(spec.uri, s3)
    budget = max_bytes
    digest = _HashBehind()
    files: dict[str, bytearray] = {}
    try:
        for name in ADAPTER_FILES:
            with _fetch_errors(spec):
                files[name] = store.read(
                    name, max_bytes=budget, on_chunk=functools.partial(digest.update, name)
                )
            budget -= len(files[name])
    finally:
        actual = digest.hexdigest()
    _check_digest(spec, actual)
    return FetchedAdapter(spec.digest, files)


class _HashBehind:
    """AdapterDigest on its own thread, fed chunks as they arrive: hashing (which releases the GIL)
    overlaps the download instead of adding to it."""

    def __init__(self) -> None:
        self._digest = AdapterDigest()
        self._chunks: queue.SimpleQueue[tuple[str, memoryview] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="adapter-hash", daemon=True)
        self._thread.start()

    def update(self, name: str, chunk: memoryview) -> None:
        self._chunks.put((name, chunk))

    def hexdigest(self) -> str:
        self._chunks.put(None)
        self._thread.join()
        return self._digest.hexdigest()

    def _run(self) -> None:
        while (item := self._chunks.get()) is not None:
            self._digest.update(*item)


def write_to_cache(fetched: FetchedAdapter, cache_dir: Path, verified: set[str] | None = None) -> Path:
    """Put verified in-memory files into the disk cache (staged, then renamed into place)."""
    final = cache_dir / digest_hex(fetched.digest)
    if final.is_dir():
        return final
    with _staged(cache_dir, final) as staging:
        for name, data in fetched.files.items():
            (staging / name).write_bytes(data)
    if verified is not None:
        verified.add(fetched.digest)
    return final


def _check_digest(spec: AdapterSpec, actual: str) -> None:
    if actual != spec.digest:
        raise DigestMismatch(
            f"the adapter's bytes do not match its digest: {spec.uri} hashes to {actual}, not "
            f"{spec.digest}; the stored files were changed or the reference is wrong, so "
            f"re-register the adapter"
        )


@contextlib.contextmanager
def _fetch_errors(spec: AdapterSpec) -> Iterator[None]:
    """Store errors as the worker reports them: which adapter, what happened, what to do."""
    try:
        yield
    except NotFound as exc:
        raise NotFound(
            f"adapter {spec.name} cannot be fetched: {exc} Check that the worker reads the same "
            f"adapter store as the registry, or re-register the adapter."
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise NotFound(
                f"adapter {spec.name} cannot be fetched: the bucket of {spec.uri} does not exist; "
                f"check the worker's AWS_ENDPOINT_URL and the registry's adapter store"
            ) from None
        raise StoreUnavailable(
            f"adapter {spec.name} cannot be fetched from {spec.uri}: the object store answered "
            f"{code or exc}; retry later or check the worker's credentials"
        ) from exc
    except BotoCoreError as exc:
        raise StoreUnavailable(
            f"adapter {spec.name} cannot be fetched from {spec.uri}: {exc}; the object store is "
            f"unreachable or too slow, retry later"
        ) from exc
