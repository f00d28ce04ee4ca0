"""What a request asks the adapter loader for, and the ways a load can fail (each a sentence a
user can act on; the servicer maps them to gRPC status codes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterSpec:
    """What the loader needs from an AdapterRef (kept free of proto types)."""

    digest: str
    uri: str
    base_model: str = ""
    label: str = ""  # "name@version" for messages
    adapter_id: str = ""
    size_bytes: int = 0  # file bytes from the registry; 0: learn it from the fetched files
    keep_warm: bool = False

    @property
    def name(self) -> str:
        return self.label or self.digest


class DigestMismatch(Exception):
    """The fetched bytes are not the adapter the reference names."""


class BaseModelMismatch(Exception):
    """The adapter was trained for another base model."""


class AdapterUnreadable(Exception):
    """The adapter's files match their digest but are not a LoRA adapter this worker can serve."""


class AdapterTooLarge(Exception):
    """The adapter is larger than a whole tier budget, so it can never load here."""


class StoreUnavailable(Exception):
    """The object store did not answer (timeout, connection refused, server error)."""


class AdaptersBusy(Exception):
    """No room for the adapter: the tier is full of adapters that requests hold; retry shortly."""
