"""API key secrets, their hashes, and bearer-token parsing."""

from __future__ import annotations

import hashlib

from services.common.auth import admin_token_matches, bearer_token, hash_api_key, new_api_key


def test_new_api_keys_are_unique_prefixed_and_show_only_a_prefix() -> None:
    keys = [new_api_key() for _ in range(200)]
    secrets = {secret for secret, _ in keys}
    assert len(secrets) == 200
    for secret, prefix in keys:
        assert secret.startswith("lpx_") and len(secret) >= 4 + 43
        assert secret.startswith(prefix) and len(prefix) == 12


def test_hash_is_sha256_hex_of_the_secret_and_differs_per_secret() -> None:
    secret, _ = new_api_key()
    assert hash_api_key(secret) == hashlib.sha256(secret.encode()).hexdigest()
    assert hash_api_key(secret) != hash_api_key(secret + "x")
    assert len(hash_api_key(secret)) == 64


def test_bearer_token_is_read_case_insensitively_from_metadata() -> None:
    assert bearer_token([("x-other", "1"), ("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", b"Bearer raw")]) == "raw"


def test_missing_or_malformed_authorization_gives_no_token() -> None:
    assert bearer_token(None) is None
    assert bearer_token([]) is None
    assert bearer_token([("authorization", "Basic dXNlcjpwdw==")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token([("authorization", "abc")]) is None


def test_admin_token_matches_only_the_exact_token() -> None:
    expected = "s3cret-admin-token-0123"
    assert admin_token_matches(expected, expected)
    assert not admin_token_matches(expected[:-1], expected)
    assert not admin_token_matches(expected + "x", expected)
    assert not admin_token_matches(None, expected)
    assert not admin_token_matches("", "")
