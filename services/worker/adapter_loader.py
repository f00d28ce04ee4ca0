"""Adapters by reference: fetch into a content-addressed disk cache, verify, parse, load to a slot.

Each adapter's life on the worker is one state in `AdapterState`, held in `_entries`. Downloads
and parsing run in threads, so the step thread keeps decoding other requests; only the final copy
into a device slot runs between two steps. Concurrent requests for one adapter share one load.
The device set is bounded by the engine's slot count: when it is full, the least recently used
adapter that no request holds is unloaded (it stays in the disk cache).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.common.adapter_errors import NotFound
from services.common.adapter_files import ADAPTER_FILES, adapter_digest, digest_hex
from services.common.object_store import open_store
from services.worker import metrics
from services.worker.async_engine import AsyncEngine
from services.worker.engine.adapter_weights import AdapterWeights, load_adapter_weights

log = logging.getLogger(__name__)


class AdapterState(enum.Enum):
    FETCHING = "fetching"  # downloading or reading the disk cache, verifying, parsing
    LOADING = "loading"  # parsed in host memory, being copied into a device slot
    ON_DEVICE = "on_device"


class Tier(enum.Enum):
    """Where an adapter was when a request asked for it (mirrors the proto's AdapterTier)."""

    DEVICE = "device"
    DISK = "disk"
    OBJECT_STORE = "object_store"


class DigestMismatch(Exception):
    """The fetched bytes are not the adapter the reference names."""


class BaseModelMismatch(Exception):
    """The adapter was trained for another base model."""


class AdapterUnreadable(Exception):
    """The adapter's files match their digest but are not a LoRA adapter this worker can serve."""


class SlotsBusy(Exception):
    """Every device slot holds an adapter that running requests use."""


@dataclass(frozen=True)
class AdapterSpec:
    """What the loader needs from an AdapterRef (kept free of proto types)."""

    digest: str
    uri: str
    base_model: str = ""
    label: str = ""  # "name@version" for messages
    adapter_id: str = ""


@dataclass
class _Entry:
    state: AdapterState
    adapter_id: str = ""
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    last_used_wall: float = field(default_factory=time.time)
    size_bytes: int = 0
    load: asyncio.Task[tuple[Tier, float]] | None = None


@dataclass(frozen=True)
class HeldAdapter:
    """One adapter the worker holds, at its fastest tier (what WatchState reports)."""

    digest: str
    adapter_id: str
    tier: Tier
    size_bytes: int
    last_used_at: float  # wall clock seconds; 0 when never used since the worker started
    in_flight: int


@dataclass
class LoadEstimate:
    """Exponentially weighted typical load time from one tier."""

    ms: float = 0.0
    samples: int = 0

    def observe(self, ms: float, weight: float = 0.2) -> None:
        self.ms = ms if self.samples == 0 else (1 - weight) * self.ms + weight * ms
        self.samples += 1


@dataclass(frozen=True)
class Lease:
    """A request's hold on an on-device adapter; release it when the request ends."""

    digest: str
    source_tier: Tier
    load_ms: float
    _entry: _Entry = field(repr=False, compare=False)

    @property
    def cold_start(self) -> bool:
        return self.source_tier is not Tier.DEVICE


class AdapterLoader:
    def __init__(
        self,
        engine: AsyncEngine,
        cache_dir: Path,
        *,
        base_model: str,
        dtype: torch.dtype,
        max_slots: int,
        max_adapter_bytes: int,
    ) -> None:
        self.engine = engine
        self.cache_dir = cache_dir
        self.base_model = base_model
        self.dtype = dtype
        self.max_slots = max_slots
        self.max_adapter_bytes = max_adapter_bytes
        self._entries: dict[str, _Entry] = {}
        self._on_disk: dict[str, int] = _scan_cache(cache_dir)  # digest -> bytes
        self.estimates: dict[Tier, LoadEstimate] = {
            Tier.DISK: LoadEstimate(),
            Tier.OBJECT_STORE: LoadEstimate(),
        }
        # Evict-then-load must be one step, or two loads could pick the same victim or overfill.
        self._slot_lock = asyncio.Lock()

    def state(self, digest: str) -> AdapterState | None:
        entry = self._entries.get(digest)
        return entry.state if entry else None

    def held(self) -> list[HeldAdapter]:
        """Adapters on the device, then those only in the disk cache."""
        out = [
            HeldAdapter(d, e.adapter_id, Tier.DEVICE, e.size_bytes, e.last_used_wall, e.in_flight)
            for d, e in self._entries.items()
            if e.state is AdapterState.ON_DEVICE
        ]
        on_device = {h.digest for h in out}
        for digest, size in self._on_disk.items():
            if digest not in on_device:
                entry = self._entries.get(digest)
                in_flight = entry.in_flight if entry else 0
                out.append(
                    HeldAdapter(digest, entry.adapter_id if entry else "", Tier.DISK, size, 0.0, in_flight)
                )
        return out

    def loading(self) -> list[str]:
        return [d for d, e in self._entries.items() if e.state is not AdapterState.ON_DEVICE]

    async def acquire(self, spec: AdapterSpec) -> Lease:
        """Make the adapter usable by the next step and pin it until `release`."""
        digest_hex(spec.digest)  # ValueError for a malformed digest, before any I/O
        if spec.base_model and spec.base_model != self.base_model:
            raise BaseModelMismatch(
                f"adapter {spec.label or spec.digest} was trained for base model {spec.base_model!r}, "
                f"but this worker serves {self.base_model!r}; route it to a {spec.base_model} worker"
            )
        entry = self._entries.get(spec.digest)
        if entry is None:
            entry = self._entries[spec.digest] = _Entry(AdapterState.FETCHING, spec.adapter_id)
        entry.in_flight += 1
        try:
            if entry.state is AdapterState.ON_DEVICE:
                metrics.ADAPTER_LOOKUPS.labels(result="hit").inc()
                entry.last_used = time.monotonic()
                return Lease(spec.digest, Tier.DEVICE, 0.0, entry)
            metrics.ADAPTER_LOOKUPS.labels(result="miss").inc()
            if entry.load is None:
                entry.load = asyncio.create_task(self._load(spec, entry))
                entry.load.add_done_callback(_retrieve)
            tier, load_ms = await asyncio.shield(entry.load)
            return Lease(spec.digest, tier, load_ms, entry)
        except BaseException:
            _unpin(entry)
            raise

    def release(self, lease: Lease) -> None:
        _unpin(lease._entry)

    def current_tier(self, digest: str) -> Tier | None:
        entry = self._entries.get(digest)
        if entry is not None and entry.state is AdapterState.ON_DEVICE:
            return Tier.DEVICE
        if (self.cache_dir / digest_hex(digest)).is_dir():
            return Tier.DISK
        return None

    async def fetch_to_disk(self, spec: AdapterSpec) -> None:
        """Warm the disk cache only (verified), using no device slot."""
        digest_hex(spec.digest)
        _, directory = await asyncio.to_thread(
            fetch_to_cache, spec, self.cache_dir, max_bytes=self.max_adapter_bytes
        )
        self._on_disk[spec.digest] = _dir_size(directory)

    async def evict(self, digest: str) -> bool:
        """Unload from the device unless a request holds it; False when it is in use."""
        entry = self._entries.get(digest)
        if entry is None:
            return True
        if entry.in_flight > 0 or entry.state is not AdapterState.ON_DEVICE:
            return False
        async with self._slot_lock:
            if self._entries.get(digest) is not entry or entry.in_flight > 0:
                return entry.in_flight == 0
            del self._entries[digest]
            await self.engine.call(lambda engine: engine.unload_adapter(digest))
        log.info("adapter %s evicted from the device on request", digest)
        return True

    async def _load(self, spec: AdapterSpec, entry: _Entry) -> tuple[Tier, float]:
        started = time.monotonic()
        try:
            tier, directory = await asyncio.to_thread(
                fetch_to_cache, spec, self.cache_dir, max_bytes=self.max_adapter_bytes
            )
            self._on_disk[spec.digest] = _dir_size(directory)
            weights = await asyncio.to_thread(_parse, spec, directory, self.dtype)
            entry.state = AdapterState.LOADING
            entry.size_bytes = weights.size_bytes
            await self._to_device(weights)
        except BaseException:
            log.info("adapter %s failed to load", spec.digest)
            self._entries.pop(spec.digest, None)
            raise
        entry.state = AdapterState.ON_DEVICE
        entry.load = None
        load_ms = (time.monotonic() - started) * 1000
        self.estimates[tier].observe(load_ms)
        metrics.ADAPTER_LOADS.labels(tier=tier.value).inc()
        metrics.ADAPTER_LOAD_SECONDS.labels(tier=tier.value).observe(load_ms / 1000)
        log.info("adapter %s on device from %s in %.0f ms", spec.digest, tier.value, load_ms)
        return tier, load_ms

    async def _to_device(self, weights: AdapterWeights) -> None:
        async with self._slot_lock:
            resident = [d for d, e in self._entries.items() if e.state is AdapterState.ON_DEVICE]
            if len(resident) >= self.max_slots:
                idle = [d for d in resident if self._entries[d].in_flight == 0]
                if not idle:
                    raise SlotsBusy(
                        f"all {self.max_slots} adapter slots serve running requests; retry shortly"
                    )
                victim = min(idle, key=lambda d: self._entries[d].last_used)
                # Forget it before awaiting, so no request can pin it while it is being unloaded.
                del self._entries[victim]
                await self.engine.call(lambda engine: engine.unload_adapter(victim))
                log.info("adapter %s evicted from the device", victim)
            await self.engine.call(lambda engine: engine.load_adapter(weights))


def fetch_to_cache(spec: AdapterSpec, cache_dir: Path, *, max_bytes: int) -> tuple[Tier, Path]:
    """The verified local copy of an adapter: `<cache_dir>/<digest hex>/`, fetched if absent.

    Blocking (runs in a thread). Bytes are downloaded into a staging directory and renamed into
    place only once their digest matches, so the cache never holds an entry that was not verified.
    """
    final = cache_dir / digest_hex(spec.digest)
    if final.is_dir():
        if adapter_digest(final) == spec.digest:
            return Tier.DISK, final
        log.warning("disk cache entry %s does not match its digest; fetching it again", final)
        shutil.rmtree(final, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".fetch-"))
    try:
        store = open_store(spec.uri.rstrip("/"))
        budget = max_bytes
        for name in ADAPTER_FILES:
            try:
                budget -= store.download(name, staging / name, max_bytes=budget)
            except NotFound as exc:
                raise NotFound(
                    f"adapter {spec.label or spec.digest} cannot be fetched: {exc} Check that the "
                    f"worker reads the same adapter store as the registry, or re-register the adapter."
                ) from None
        actual = adapter_digest(staging)
        if actual != spec.digest:
            raise DigestMismatch(
                f"the adapter's bytes do not match its digest: {spec.uri} hashes to {actual}, not "
                f"{spec.digest}; the stored files were changed or the reference is wrong, so "
                f"re-register the adapter"
            )
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():
                raise
            # Another fetch of the same digest won the race; its copy is identical.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Tier.OBJECT_STORE, final


def _parse(spec: AdapterSpec, directory: Path, dtype: torch.dtype) -> AdapterWeights:
    try:
        return load_adapter_weights(directory, spec.digest, dtype)
    except Exception as exc:  # safetensors, JSON and format errors alike: the files are unusable
        raise AdapterUnreadable(
            f"adapter {spec.label or spec.digest} cannot be read: {exc}; re-register it from a PEFT "
            f"save_pretrained output"
        ) from exc


def _unpin(entry: _Entry) -> None:
    entry.in_flight -= 1
    entry.last_used = time.monotonic()
    entry.last_used_wall = time.time()


def _dir_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def _scan_cache(cache_dir: Path) -> dict[str, int]:
    """Verified entries left by an earlier run (only complete, renamed-into-place directories)."""
    found: dict[str, int] = {}
    if cache_dir.is_dir():
        for path in cache_dir.iterdir():
            if path.is_dir() and len(path.name) == 64 and all(c in "0123456789abcdef" for c in path.name):
                found["sha256:" + path.name] = _dir_size(path)
    return found


def _retrieve(task: asyncio.Task[tuple[Tier, float]]) -> None:
    """Every waiter may have gone (cancelled); mark the outcome seen so asyncio does not warn."""
    if not task.cancelled():
        task.exception()
