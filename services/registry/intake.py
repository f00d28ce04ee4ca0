"""From "some bytes arrived" to "a validated adapter is stored under its content digest".

The registry servicer stages the two adapter files into a private directory (from a source URI
or a client-streamed upload), then calls `accept_staged`. Validation happens before anything is
written to the store, and a failed upload removes what it wrote, so a rejected adapter leaves no
object behind. All calls block; run them in a thread from async code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from services.common.adapter_errors import AdapterRejected, NotFound, TooLarge
from services.common.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    adapter_digest,
    digest_hex,
    is_pickle_name,
    pickle_refusal,
    read_safetensors_header,
)
from services.common.model_spec import BaseModelSpec
from services.common.object_store import ObjectStore, open_store
from services.registry.validation import AdapterLimits, ValidatedAdapter, validate_adapter

# Names PEFT and torch use for pickled adapter weights, probed to explain a missing safetensors file.
_PICKLE_PROBES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
_EXPECTED = (
    f"an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, as PEFT's save_pretrained "
    f"writes them"
)


@dataclass(frozen=True)
class AcceptedAdapter:
    digest: str  # "sha256:<hex>"
    uri: str  # the stored directory, e.g. "s3://bucket/adapters/<hex>"
    validated: ValidatedAdapter
    size_bytes: int  # both files together
    # False when identical bytes were already stored (dedupe): undoing must not delete them.
    stored_new: bool = True


def _too_large(what: str, limit: int) -> TooLarge:
    return TooLarge(
        f"{what} is larger than this registry's limit of {limit} bytes for an adapter's two files "
        f"together (LORAPLEX_MAX_ADAPTER_BYTES).",
        limit=limit,
    )


def stage_from_uri(uri: str, staging_dir: Path, *, max_bytes: int) -> None:
    """Download the adapter files at `uri` into staging_dir. The caller checks the URI's allow-list
    first (`check_source_uri`) and removes staging_dir afterwards."""
    source = open_store(uri.rstrip("/"))
    if not source.exists(ADAPTER_WEIGHTS):
        for name in _PICKLE_PROBES:
            if source.exists(name):
                raise pickle_refusal(name)
        raise NotFound(f"{uri} has no {ADAPTER_WEIGHTS}; {_EXPECTED}.")
    staging_dir.mkdir(parents=True, exist_ok=True)
    used = 0
    for name in ADAPTER_FILES:
        try:
            used += source.download(name, staging_dir / name, max_bytes=max_bytes - used)
        except NotFound:
            raise NotFound(f"{uri} has no {name}; {_EXPECTED}.") from None
        except TooLarge:
            raise _too_large(f"the adapter at {uri}", max_bytes) from None


class StagedUpload:
    """Writes a client-streamed upload into staging_dir, enforcing names and size as bytes arrive."""

    def __init__(self, staging_dir: Path, *, max_bytes: int) -> None:
        self.staging_dir = staging_dir
        self.max_bytes = max_bytes
        self.total_bytes = 0
        self._files: dict[str, BinaryIO] = {}
        staging_dir.mkdir(parents=True, exist_ok=True)

    def add_chunk(self, file_name: str, data: bytes) -> None:
        if file_name not in ADAPTER_FILES:
            if is_pickle_name(file_name):
                raise pickle_refusal(file_name)
            raise AdapterRejected(
                f"the upload contains {file_name!r}; send only {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}."
            )
        self.total_bytes += len(data)
        if self.total_bytes > self.max_bytes:
            self.close()
            raise _too_large("the upload", self.max_bytes)
        out = self._files.get(file_name)
        if out is None:
            out = self._files[file_name] = (self.staging_dir / file_name).open("wb")
        out.write(data)

    def finish(self) -> Path:
        self.close()
        for name in ADAPTER_FILES:
            if not (self.staging_dir / name).is_file():
                raise AdapterRejected(f"the upload has no {name}; {_EXPECTED}.")
        return self.staging_dir

    def close(self) -> None:
        for out in self._files.values():
            out.close()
        self._files.clear()

    def __enter__(self) -> StagedUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_config(path: Path, limits: AdapterLimits) -> dict[str, object]:
    if path.stat().st_size > limits.max_config_bytes:
        raise AdapterRejected(
            f"{ADAPTER_CONFIG} is over {limits.max_config_bytes} bytes; a PEFT config is a few kilobytes, "
            f"so this is not one."
        )
    try:
        config = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRejected(f"{ADAPTER_CONFIG} is not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise AdapterRejected(f"{ADAPTER_CONFIG} must hold a JSON object, as PEFT writes it.")
    return config


def accept_staged(
    staging_dir: Path, base: BaseModelSpec, limits: AdapterLimits, store: ObjectStore
) -> AcceptedAdapter:
    """Validate the staged files and store them under `<digest hex>/` (once per distinct content)."""
    paths = {name: staging_dir / name for name in ADAPTER_FILES}
    for name, path in paths.items():
        if not path.is_file():
            raise AdapterRejected(f"the adapter has no {name}; {_EXPECTED}.")
    size = sum(p.stat().st_size for p in paths.values())
    if size > limits.max_bytes:
        raise _too_large(f"the adapter ({size} bytes)", limits.max_bytes)
    config = _read_config(paths[ADAPTER_CONFIG], limits)
    header = read_safetensors_header(paths[ADAPTER_WEIGHTS], max_header_bytes=limits.max_header_bytes)
    validated = validate_adapter(config, header, base, limits)
    digest = adapter_digest(staging_dir)
    folder = digest_hex(digest)
    names = [f"{folder}/{name}" for name in ADAPTER_FILES]
    if all(store.exists(n) for n in names):
        return AcceptedAdapter(digest, store.uri_for(folder), validated, size, stored_new=False)
    try:
        # The config goes last: its presence marks a complete directory.
        store.upload(f"{folder}/{ADAPTER_WEIGHTS}", paths[ADAPTER_WEIGHTS])
        store.upload(f"{folder}/{ADAPTER_CONFIG}", paths[ADAPTER_CONFIG])
    except BaseException:
        for n in names:
            store.delete(n)
        raise
    return AcceptedAdapter(digest, store.uri_for(folder), validated, size, stored_new=True)


def discard_stored(store: ObjectStore, accepted: AcceptedAdapter) -> None:
    """Undo `accept_staged` when the caller's database insert fails (no-op after a dedupe)."""
    if not accepted.stored_new:
        return
    folder = digest_hex(accepted.digest)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        store.delete(f"{folder}/{name}")
