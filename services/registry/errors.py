"""What the registry's queries raise: each message tells the caller what to do next.

The servicer maps these to gRPC status codes; nothing here knows about gRPC.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of the registry's domain errors."""


class NotFound(RegistryError):
    """The named tenant, key, base model or adapter does not exist (or belongs to another tenant)."""


class AlreadyExists(RegistryError):
    """A unique name is already taken."""


class Conflict(RegistryError):
    """The row exists but is in a state that does not allow the change."""


class InvalidArgument(RegistryError, ValueError):
    """A value the database would refuse; a ValueError so generic handlers map it to a bad request."""
