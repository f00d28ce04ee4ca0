"""Why an adapter (or its bytes) was refused. `str(exc)` is the sentence shown to the user.

Shared by the registry's intake and the worker's adapter tiers; each servicer maps these to gRPC
status codes in its error table.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base of every error in this module; the message is meant for the user."""


class AdapterRejected(AdapterError):
    """The adapter's files are not something loraplex will serve (format, shape, variant, base)."""


class InvalidSafetensors(AdapterRejected):
    """adapter_model.safetensors is malformed: its header or layout fails a sanity check."""


class TooLarge(AdapterError):
    """More bytes than the configured limit; raised while streaming, before the excess is stored."""

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class UriNotAllowed(AdapterError):
    """A source URI outside the registry's allow-lists (bucket, file root, scheme)."""


class NotFound(AdapterError):
    """An object the caller named does not exist in the store."""
