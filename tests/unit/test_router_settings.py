"""RouterSettings from LORAPLEX_* variables: defaults, and a sentence naming the variable when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import ConfigError, RouterSettings

# Plaintext: these tests are about the other variables (tests/unit/test_tls_config.py covers identities).
BASE = {"LORAPLEX_INSECURE_PLAINTEXT": "true", "LORAPLEX_HOME": "/srv/lpx"}


def test_defaults_listen_on_50050_and_spool_under_home() -> None:
    s = RouterSettings.from_env(BASE)
    assert (s.listen, s.registry, s.workers, s.discover_workers) == (
        "127.0.0.1:50050",
        "127.0.0.1:50051",
        (),
        True,
    )
    assert s.spool_dir == Path("/srv/lpx/router-spool")
    assert s.auth_cache_ttl_s == 30.0 and s.auth_negative_ttl_s < s.auth_cache_ttl_s


def test_explicit_values_are_parsed() -> None:
    s = RouterSettings.from_env(
        {
            **BASE,
            "LORAPLEX_WORKERS": "10.0.0.1:7000, 10.0.0.2:7000",
            "LORAPLEX_SPOOL_DIR": "/var/spool/lpx",
            "LORAPLEX_ROUTER_SPOOL_MAX_BYTES": "2GiB",
            "LORAPLEX_MAX_INFLIGHT": "8",
            "LORAPLEX_ROUTER_DISCOVER_WORKERS": "false",
        }
    )
    assert s.workers == ("10.0.0.1:7000", "10.0.0.2:7000")
    assert (s.spool_dir, s.spool_max_bytes, s.max_inflight, s.discover_workers) == (
        Path("/var/spool/lpx"),
        2 << 30,
        8,
        False,
    )


@pytest.mark.parametrize(
    ("env", "phrase"),
    [
        ({"LORAPLEX_INSECURE_PLAINTEXT": "false"}, "loraplex certs init"),
        ({"LORAPLEX_ROUTER_TLS_CERT": "/srv/lpx/router.crt"}, "LORAPLEX_ROUTER_TLS_KEY"),
        ({"LORAPLEX_WORKERS": "10.0.0.1"}, "LORAPLEX_WORKERS"),
        ({"LORAPLEX_ROUTER_LISTEN": "nowhere"}, "LORAPLEX_ROUTER_LISTEN"),
        ({"LORAPLEX_MAX_INFLIGHT": "0"}, "LORAPLEX_MAX_INFLIGHT"),
        ({"LORAPLEX_ROUTER_SHIP_BATCH": "20000"}, "10000"),
        ({"LORAPLEX_ROUTER_SPOOL_MAX_BYTES": "10k"}, "at least 64KiB"),
        ({"LORAPLEX_AUTH_CACHE_TTL_S": "soon"}, "LORAPLEX_AUTH_CACHE_TTL_S"),
    ],
)
def test_bad_values_fail_with_the_variable_named(env: dict[str, str], phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        RouterSettings.from_env({**BASE, **env})


def test_routing_defaults_and_overrides() -> None:
    s = RouterSettings.from_env(BASE)
    assert (s.policy, s.worker_stale_s, s.worker_refresh_s, s.route_kv_full, s.keep_warm_s) == (
        "affinity",
        3.0,
        1.0,
        0.9,
        2.0,
    )
    s = RouterSettings.from_env(
        {
            **BASE,
            "LORAPLEX_ROUTER_POLICY": "Round_Robin",
            "LORAPLEX_ROUTER_WORKER_STALE_S": "4.5",
            "LORAPLEX_ROUTE_KV_FULL": "0.8",
            "LORAPLEX_ROUTER_KEEP_WARM_S": "0.5",
        }
    )
    assert (s.policy, s.worker_stale_s, s.route_kv_full, s.keep_warm_s) == ("round_robin", 4.5, 0.8, 0.5)


@pytest.mark.parametrize(
    ("env", "phrase"),
    [
        ({"LORAPLEX_ROUTER_POLICY": "random"}, "affinity, least_loaded, round_robin"),
        ({"LORAPLEX_ROUTER_WORKER_STALE_S": "2"}, "LORAPLEX_ROUTER_WORKER_STALE_S"),  # under a heartbeat
        ({"LORAPLEX_ROUTE_KV_FULL": "1.5"}, "fraction"),
        ({"LORAPLEX_ROUTER_KEEP_WARM_S": "-1"}, "LORAPLEX_ROUTER_KEEP_WARM_S"),
    ],
)
def test_bad_routing_values_fail_with_the_variable_named(env: dict[str, str], phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        RouterSettings.from_env({**BASE, **env})


def test_the_idempotency_window_defaults_to_a_day_and_is_validated() -> None:
    assert RouterSettings.from_env(BASE).idempotency_window_s == 86_400
    assert (
        RouterSettings.from_env({**BASE, "LORAPLEX_IDEMPOTENCY_WINDOW_S": "600"}).idempotency_window_s == 600
    )
    for bad in ("0", "soon", str(11 * 365 * 86_400)):
        with pytest.raises(ConfigError, match="LORAPLEX_IDEMPOTENCY_WINDOW_S"):
            RouterSettings.from_env({**BASE, "LORAPLEX_IDEMPOTENCY_WINDOW_S": bad})


def test_prompt_bound_and_limit_share_default_and_parse() -> None:
    s = RouterSettings.from_env(BASE)
    assert (s.max_prompt_bytes, s.limit_share, s.quota_refresh_s) == (1 << 20, 1.0, 2.0)
    s = RouterSettings.from_env(
        {**BASE, "LORAPLEX_MAX_PROMPT_BYTES": "256KiB", "LORAPLEX_ROUTER_LIMIT_SHARE": "0.25"}
    )
    assert (s.max_prompt_bytes, s.limit_share) == (256 << 10, 0.25)


@pytest.mark.parametrize(
    ("key", "value", "phrase"),
    [
        ("LORAPLEX_MAX_PROMPT_BYTES", "100", "at least 1KiB"),
        ("LORAPLEX_ROUTER_LIMIT_SHARE", "0", "fraction"),
        ("LORAPLEX_ROUTER_LIMIT_SHARE", "1.5", "fraction"),
    ],
)
def test_bad_prompt_bound_or_limit_share_names_the_variable(key: str, value: str, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase) as err:
        RouterSettings.from_env({**BASE, key: value})
    assert key in str(err.value)


def test_http_api_listens_on_8080_by_default_and_empty_turns_it_off() -> None:
    assert RouterSettings.from_env(BASE).http_listen == "127.0.0.1:8080"
    assert (
        RouterSettings.from_env({**BASE, "LORAPLEX_HTTP_LISTEN": "0.0.0.0:9000"}).http_listen
        == "0.0.0.0:9000"
    )
    assert RouterSettings.from_env({**BASE, "LORAPLEX_HTTP_LISTEN": ""}).http_listen == ""
    with pytest.raises(ConfigError, match="LORAPLEX_HTTP_LISTEN='8080' must be host:port"):
        RouterSettings.from_env({**BASE, "LORAPLEX_HTTP_LISTEN": "8080"})


def test_token_timeout_defaults_to_30s_and_refuses_values_that_would_cut_healthy_streams() -> None:
    assert RouterSettings.from_env(BASE).token_timeout_s == 30.0
    s = RouterSettings.from_env({**BASE, "LORAPLEX_ROUTER_TOKEN_TIMEOUT_S": "2.5"})
    assert s.token_timeout_s == 2.5
    for bad in ("0.2", "soon"):
        with pytest.raises(ConfigError, match="LORAPLEX_ROUTER_TOKEN_TIMEOUT_S"):
            RouterSettings.from_env({**BASE, "LORAPLEX_ROUTER_TOKEN_TIMEOUT_S": bad})


def test_cold_queue_defaults_and_overrides() -> None:
    s = RouterSettings.from_env(BASE)
    assert (s.cold_queue, s.cold_wait_s) == (256, 120.0)
    s = RouterSettings.from_env(
        {**BASE, "LORAPLEX_ROUTER_COLD_QUEUE": "0", "LORAPLEX_ROUTER_COLD_WAIT_S": "2.5"}
    )
    assert (s.cold_queue, s.cold_wait_s) == (0, 2.5)
    with pytest.raises(ConfigError, match="LORAPLEX_ROUTER_COLD_WAIT_S"):
        RouterSettings.from_env({**BASE, "LORAPLEX_ROUTER_COLD_WAIT_S": "-1"})
