"""The two files of a PEFT LoRA adapter: their names, their content digest, and a safe header read.

Shared by the registry (validation at intake) and the worker (loading). Nothing here unpickles:
the only weights format accepted is safetensors, whose header is plain JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from services.common.adapter_errors import AdapterRejected, InvalidSafetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# Pickle-based checkpoints: loading them runs arbitrary code, so they are refused by name.
PICKLE_NAMES = ("adapter_model.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

DIGEST_PREFIX = "sha256:"
# Caps on what a safetensors header may declare, the same at the registry (intake) and the worker
# (loading), since both parse it with parse_safetensors_header below. A real adapter's header is
# tens of KiB (a few hundred tensor entries); a parser must not be made to read gigabytes of JSON.
DEFAULT_MAX_HEADER_BYTES = 8 << 20
# LoRA tensors are 2-D ([r, in], [out, r]), DoRA magnitudes 1-D; 4 leaves room and no more.
MAX_TENSOR_DIMS = 4
# Each dimension is a model dimension or a rank: hidden and intermediate sizes are at most tens of
# thousands, vocabularies a few hundred thousand, ranks a few hundred. 2**20 is 4x the largest
# vocabulary in use, and keeps the element count of 4 dims (at most 2**80) cheap to compute.
MAX_TENSOR_DIM = 1 << 20
_CHUNK = 1 << 20

# Bits per element; sub-byte types (F4, F6) are packed, so sizes are checked in bits.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def is_pickle_name(file_name: str) -> bool:
    return any(fnmatch(file_name, pattern) for pattern in PICKLE_NAMES)


def pickle_refusal(file_name: str) -> AdapterRejected:
    return AdapterRejected(
        f"{file_name} is a pickle checkpoint, which loraplex never loads because unpickling can run "
        f"arbitrary code; re-save the adapter with save_pretrained(..., safe_serialization=True) "
        f"(PEFT's default) to get {ADAPTER_WEIGHTS}."
    )


class AdapterDigest:
    """Streaming content digest of an adapter: feed each file's chunks, in any interleaving.

    digest = "sha256:" + sha256(sha256(config) || sha256(weights)); the per-file hashes keep the
    result independent of how the bytes were chunked and of the order the files arrive in.
    """

    def __init__(self) -> None:
        self._files = {name: hashlib.sha256() for name in ADAPTER_FILES}

    def update(self, file_name: str, chunk: bytes | memoryview) -> None:
        if file_name not in self._files:
            raise ValueError(f"{file_name!r} is not an adapter file; expected one of {ADAPTER_FILES}")
        self._files[file_name].update(chunk)

    def hexdigest(self) -> str:
        outer = hashlib.sha256(self._files[ADAPTER_CONFIG].digest() + self._files[ADAPTER_WEIGHTS].digest())
        return DIGEST_PREFIX + outer.hexdigest()


def adapter_digest(directory: Path) -> str:
    """Digest of the adapter files in `directory`, read in chunks."""
    digest = AdapterDigest()
    for name in ADAPTER_FILES:
        with (directory / name).open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(name, chunk)
    return digest.hexdigest()


def digest_hex(digest: str) -> str:
    """'sha256:ab12...' -> 'ab12...', checked, for use as a path component."""
    hex_part = digest.removeprefix(DIGEST_PREFIX)
    if not digest.startswith(DIGEST_PREFIX) or len(hex_part) != 64 or not _is_lower_hex(hex_part):
        raise ValueError(f"{digest!r} is not an adapter digest (sha256:<64 hex digits>)")
    return hex_part


def _is_lower_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offset: int = field(default=0, compare=False)  # where its bytes start in the data section

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def read_safetensors_header(
    path: Path, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Read and sanity-check only the header of a safetensors file (never its data)."""
    name = path.name
    with path.open("rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidSafetensors(
                f"{name} is {file_size} bytes, too short to be a safetensors file (it needs an 8-byte "
                f"header length); the file is truncated or not safetensors."
            )
        header_len = _header_length(prefix, file_size, max_header_bytes, name)
        raw = f.read(header_len)
    return parse_safetensors_header(raw, data_size=file_size - 8 - header_len, file_name=name)


def split_safetensors(
    buf: bytes | bytearray | memoryview,
    *,
    file_name: str = ADAPTER_WEIGHTS,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> tuple[SafetensorsHeader, int]:
    """A safetensors file already in memory: its checked header, and where its data section
    starts in `buf` (tensor offsets are relative to it)."""
    if len(buf) < 8:
        raise InvalidSafetensors(
            f"{file_name} is {len(buf)} bytes, too short to be a safetensors file (it needs an 8-byte "
            f"header length); the file is truncated or not safetensors."
        )
    header_len = _header_length(bytes(buf[:8]), len(buf), max_header_bytes, file_name)
    base = 8 + header_len
    header = parse_safetensors_header(bytes(buf[8:base]), data_size=len(buf) - base, file_name=file_name)
    return header, base


def safetensors_header_length(
    prefix: bytes,
    file_size: int,
    *,
    file_name: str = ADAPTER_WEIGHTS,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> int:
    """The header length a file's first 8 bytes declare, checked against the cap and the file's
    size (for a header read from a remote object a range at a time)."""
    if len(prefix) < 8:
        raise InvalidSafetensors(
            f"{file_name} is {file_size} bytes, too short to be a safetensors file (it needs an 8-byte "
            f"header length); the file is truncated or not safetensors."
        )
    return _header_length(prefix[:8], file_size, max_header_bytes, file_name)


def _header_length(prefix: bytes, file_size: int, max_header_bytes: int, name: str) -> int:
    """The header length the 8-byte prefix declares, checked against the cap and the file size
    before a byte of the header is read."""
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > max_header_bytes:
        raise InvalidSafetensors(
            f"{name} declares a {header_len}-byte header, over the limit of {max_header_bytes} "
            f"bytes; the file is corrupt or not a safetensors file."
        )
    if 8 + header_len > file_size:
        raise InvalidSafetensors(
            f"{name} declares a {header_len}-byte header but the file is only {file_size} bytes; "
            f"the file is truncated or corrupt."
        )
    return int(header_len)


def parse_safetensors_header(raw: bytes, *, data_size: int, file_name: str) -> SafetensorsHeader:
    """Check a header's JSON against the size of the data section that follows it."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, _DuplicateKey) as exc:
        raise InvalidSafetensors(
            f"the header of {file_name} is not valid JSON ({exc}); the file is corrupt or not safetensors."
        ) from None
    if not isinstance(doc, dict):
        raise InvalidSafetensors(f"the header of {file_name} is not a JSON object; the file is corrupt.")
    metadata = _metadata(doc.pop("__metadata__", None), file_name)
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for tensor_name, entry in doc.items():
        info, begin, end = _tensor_entry(tensor_name, entry, file_name)
        tensors[tensor_name] = info
        spans.append((begin, end, tensor_name))
    _check_layout(spans, data_size, file_name)
    return SafetensorsHeader(tensors=tensors, metadata=metadata)


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"key {key!r} appears twice")
        out[key] = value
    return out


def _metadata(raw: object, file_name: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise InvalidSafetensors(
            f"__metadata__ in {file_name} must map strings to strings; the file is corrupt."
        )
    return dict(raw)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(tensor_name: str, entry: object, file_name: str) -> tuple[TensorInfo, int, int]:
    where = f"tensor {_brief(tensor_name)} in {file_name}"
    if not isinstance(entry, dict):
        raise InvalidSafetensors(f"{where} is not described by a JSON object; the file is corrupt.")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InvalidSafetensors(
            f"{where} has unknown dtype {_brief(dtype)}; known dtypes are {', '.join(DTYPE_BITS)}."
        )
    if isinstance(shape, list) and len(shape) > MAX_TENSOR_DIMS:
        raise InvalidSafetensors(
            f"{where} has {len(shape)} dimensions, over the limit of {MAX_TENSOR_DIMS}; "
            f"LoRA tensors have 1 or 2, so the file is corrupt or not a LoRA adapter."
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidSafetensors(f"{where} has shape {_brief(shape)}, which is not a list of sizes.")
    if any(d > MAX_TENSOR_DIM for d in shape):
        raise InvalidSafetensors(
            f"{where} has shape {shape}, with a dimension over the limit of {MAX_TENSOR_DIM}; "
            f"no model dimension or rank is that large, so the file is corrupt."
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise InvalidSafetensors(
            f"{where} has data_offsets {_brief(offsets)}; expected [begin, end] with 0 <= begin <= end."
        )
    begin, end = offsets
    info = TensorInfo(dtype=dtype, shape=tuple(shape), offset=begin)
    bits = info.numel * DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        raise InvalidSafetensors(
            f"{where} has shape {list(shape)} of {dtype}, which needs {bits / 8:g} bytes, but its "
            f"data_offsets span {end - begin} bytes; the file is corrupt."
        )
    return info, begin, end


def _brief(value: object, limit: int = 80) -> str:
    """A value for an error sentence, cut short: a crafted header can hold megabytes in one field."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_layout(spans: list[tuple[int, int, str]], data_size: int, file_name: str) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing past the end."""
    position = 0
    for begin, end, tensor_name in sorted(spans):
        if end > data_size:
            raise InvalidSafetensors(
                f"tensor {tensor_name!r} in {file_name} ends at byte {end} of the data section, but the "
                f"file holds only {data_size} data bytes; the file is truncated."
            )
        if begin < position:
            raise InvalidSafetensors(
                f"tensor {tensor_name!r} in {file_name} overlaps the tensor before it; the file is corrupt."
            )
        if begin > position:
            raise InvalidSafetensors(
                f"{file_name} has {begin - position} unaccounted bytes before tensor {tensor_name!r}; "
                f"the file is corrupt."
            )
        position = end
    if position != data_size:
        raise InvalidSafetensors(
            f"{file_name} has {data_size - position} bytes after its last tensor; the file is corrupt "
            f"or was appended to."
        )
