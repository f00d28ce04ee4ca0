"""API key secrets and bearer tokens.

API keys are `lpx_` + 32 random bytes (urlsafe base64). The registry stores only a SHA-256 of the
secret: a slow KDF (bcrypt, argon2) protects low-entropy passwords against guessing, but a
256-bit random secret cannot be guessed from its hash, and a fast hash keeps authentication off
the request path's latency budget.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable

API_KEY_PREFIX = "lpx_"
# How much of the secret users see to recognise a key: "lpx_" + 8 random characters (48 bits), which
# says nothing useful about the remaining 256 bits.
DISPLAY_PREFIX_LEN = len(API_KEY_PREFIX) + 8


def new_api_key() -> tuple[str, str]:
    """A fresh secret and its display prefix; the secret is shown once and never stored."""
    secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
    return secret, secret[:DISPLAY_PREFIX_LEN]


def hash_api_key(secret: str) -> str:
    """Hex SHA-256 of the secret: what the registry stores and looks keys up by."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def api_key_display_prefix(secret: str) -> str:
    return secret[:DISPLAY_PREFIX_LEN]


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, or None.

    `metadata` is what grpc's `invocation_metadata()` returns (key/value pairs). The key and the
    scheme are case-insensitive (HTTP semantics); an empty token counts as missing.
    """
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def admin_token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so response timing does not reveal how much of a guess was right."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
