"""Verified adapter files -> the engine's device layout in host memory (on the parse threads)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from services.common.adapter_files import ADAPTER_FILES
from services.worker.adapters.fetch import FetchedAdapter
from services.worker.adapters.spec import AdapterSpec, AdapterUnreadable
from services.worker.async_engine import AsyncEngine
from services.worker.engine.adapter_slots import DeviceAdapter
from services.worker.engine.adapter_weights import (
    AdapterWeights,
    adapter_weights_from_bytes,
    load_adapter_weights,
)

# Files are read at full precision and rounded once, into the slot layout in the engine's dtype
# (the scale folded into B before that rounding, not after).
PARSE_DTYPE = torch.float32


def prepare_from_files(engine: AsyncEngine, spec: AdapterSpec, path: Path) -> DeviceAdapter:
    weights = _parse(spec, lambda: load_adapter_weights(path, spec.digest, PARSE_DTYPE))
    return engine.prepare_adapter(weights)


def prepare_from_bytes(engine: AsyncEngine, spec: AdapterSpec, fetched: FetchedAdapter) -> DeviceAdapter:
    """Right after a cold fetch, from the bytes still in memory (the disk copy is written behind)."""
    config, weights = (fetched.files[name] for name in ADAPTER_FILES)
    parsed = _parse(spec, lambda: adapter_weights_from_bytes(config, weights, spec.digest, PARSE_DTYPE))
    return engine.prepare_adapter(parsed)


def _parse(spec: AdapterSpec, read: Callable[[], AdapterWeights]) -> AdapterWeights:
    try:
        return read()
    except Exception as exc:  # safetensors, JSON and format errors alike: the files are unusable
        raise AdapterUnreadable(
            f"adapter {spec.name} cannot be read: {exc}; re-register it from a PEFT save_pretrained output"
        ) from exc
