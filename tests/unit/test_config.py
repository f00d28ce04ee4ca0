import pytest

from services.common.config import ConfigError, RegistrySettings, parse_bytes

PLAINTEXT = {"LORAPLEX_INSECURE_PLAINTEXT": "true"}


def test_sizes_accept_binary_units():
    assert parse_bytes("X", "512MiB") == 512 << 20
    assert parse_bytes("X", "64m") == 64 << 20
    assert parse_bytes("X", "1000") == 1000


def test_bad_size_names_the_variable():
    with pytest.raises(ConfigError, match="LORAPLEX_MAX_ADAPTER_BYTES"):
        RegistrySettings.from_env(
            {**PLAINTEXT, "LORAPLEX_ADMIN_TOKEN": "x" * 20, "LORAPLEX_MAX_ADAPTER_BYTES": "lots"}
        )


def test_registry_refuses_to_start_without_admin_token():
    with pytest.raises(ConfigError, match="ADMIN_TOKEN is required"):
        RegistrySettings.from_env(PLAINTEXT)


def test_s3_store_bucket_is_always_allowed():
    s = RegistrySettings.from_env(
        {**PLAINTEXT, "LORAPLEX_ADMIN_TOKEN": "x" * 20, "LORAPLEX_ADAPTER_STORE": "s3://store/ad"}
    )
    assert s.allowed_buckets == ("store",)
