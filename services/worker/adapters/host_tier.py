"""The host tier: adapters in host memory, already in the engine's device layout.

What `LLMEngine.prepare_adapter` returns (rank bucket padded, scale folded, DoRA factor computed;
pinned when the engine runs on CUDA), so going to the device is one tensor copy and, on a CPU
engine, a move of references. A device adapter demoted here keeps that same layout.
"""

from __future__ import annotations

from services.worker.engine.adapter_slots import DeviceAdapter


class HostTier:
    def __init__(self) -> None:
        self._held: dict[str, DeviceAdapter] = {}

    def __contains__(self, digest: str) -> bool:
        return digest in self._held

    def put(self, adapter: DeviceAdapter) -> None:
        self._held[adapter.digest] = adapter

    def take(self, digest: str) -> DeviceAdapter | None:
        """Remove and return it (DEVICE and HOST are exclusive: it moves to the device)."""
        return self._held.pop(digest, None)

    def drop(self, digest: str) -> None:
        self._held.pop(digest, None)
