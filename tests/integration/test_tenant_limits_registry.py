"""Tenant limits and revocations in the registry: storage, the admin RPC, the CLI and the change feed."""

from __future__ import annotations

import json
import uuid

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.v1 import registry_pb2, usage_pb2, usage_pb2_grpc
from services.common.tls import Role, sync_channel
from tests.fixtures.registry import RegistryProcess


def _tenant(registry: RegistryProcess) -> str:
    name = f"l-{uuid.uuid4().hex[:10]}"
    with registry.admin() as c:
        c.create_tenant(name)
    return name


def _limits(t: registry_pb2.Tenant) -> tuple[int, int, int, int]:
    lim = t.limits
    return (lim.requests_per_s, lim.tokens_per_min, lim.max_concurrent, lim.monthly_tokens)


def test_cli_sets_any_subset_of_limits_and_zero_clears_one(registry: RegistryProcess) -> None:
    tenant = _tenant(registry)
    done = registry.cli("tenants", "set-limits", tenant, "--requests-per-s", "5", "--monthly-tokens", "1000")
    assert done.returncode == 0, done.stderr
    assert "5" in done.stdout and "1000" in done.stdout
    done = registry.cli("tenants", "set-limits", tenant, "--tokens-per-min", "600", "--max-concurrent", "2")
    assert done.returncode == 0, done.stderr
    listed = registry.cli("tenants", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    mine = next(t for t in json.loads(listed.stdout) if t["name"] == tenant)
    assert mine["limits"] == {
        "requests_per_s": 5,
        "tokens_per_min": "600",
        "max_concurrent": 2,
        "monthly_tokens": "1000",
    }
    # 0 clears one limit and keeps the others.
    assert registry.cli("tenants", "set-limits", tenant, "--requests-per-s", "0").returncode == 0
    table = registry.cli("tenants", "list")
    assert "REQUESTS/S" in table.stdout and "MONTHLY_TOKENS" in table.stdout
    row = next(line.split() for line in table.stdout.splitlines() if tenant in line)
    assert row[2:] == ["-", "600", "2", "1000"]


def test_cli_refuses_negative_limits_and_an_empty_change(registry: RegistryProcess) -> None:
    tenant = _tenant(registry)
    negative = registry.cli("tenants", "set-limits", tenant, "--max-concurrent", "-1")
    assert negative.returncode != 0 and "negative" in negative.stderr
    empty = registry.cli("tenants", "set-limits", tenant)
    assert empty.returncode == 2 and "--requests-per-s" in empty.stderr


def test_the_database_refuses_negative_limits(registry: RegistryProcess) -> None:
    tenant = _tenant(registry)
    with psycopg.connect(registry.database_url) as conn, pytest.raises(psycopg.errors.CheckViolation):
        conn.execute("UPDATE tenants SET tokens_per_min = -5 WHERE name = %s", (tenant,))


def test_set_tenant_limits_needs_the_admin_token(registry: RegistryProcess) -> None:
    tenant = _tenant(registry)
    with registry.admin() as c:
        secret = c.create_api_key(tenant).secret
    with registry.as_key(secret) as keyed, pytest.raises(grpc.RpcError) as err:
        keyed.set_tenant_limits(tenant, requests_per_s=1000)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with registry.admin() as c, pytest.raises(grpc.RpcError) as err:
        c.set_tenant_limits("no-such-tenant", requests_per_s=1)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_authenticate_returns_the_tenant_with_its_limits(registry: RegistryProcess) -> None:
    tenant = _tenant(registry)
    with registry.admin() as c:
        secret = c.create_api_key(tenant).secret
        c.set_tenant_limits(tenant, max_concurrent=3)
        resp = c.stub.AuthenticateApiKey(
            registry_pb2.AuthenticateApiKeyRequest(secret=secret), metadata=c.metadata, timeout=10
        )
    assert resp.tenant.name == tenant and resp.tenant.tenant_id == resp.tenant_id
    assert _limits(resp.tenant) == (0, 0, 3, 0) and resp.tenant.revision > 0


def test_the_change_feed_carries_revocations_and_limit_changes_in_order(registry: RegistryProcess) -> None:
    tenant = _tenant(registry)
    with registry.admin() as c:
        key = c.create_api_key(tenant).api_key
        start = c.set_tenant_limits(tenant, requests_per_s=7).revision
        stream = c.stub.WatchAdapters(
            registry_pb2.WatchAdaptersRequest(since_revision=start - 1), metadata=c.metadata, timeout=30
        )
        seen = [next(stream)]
        c.revoke_api_key(key.key_id)
        seen.append(next(stream))
        c.revoke_api_key(key.key_id)  # idempotent: no second event, the revision stays
        c.set_tenant_limits(tenant, requests_per_s=0, tokens_per_min=60)
        seen.append(next(stream))
        stream.cancel()
        # A watcher resuming after the revocation's revision does not see it again.
        resumed = c.stub.WatchAdapters(
            registry_pb2.WatchAdaptersRequest(since_revision=seen[1].revision),
            metadata=c.metadata,
            timeout=30,
        )
        again = next(resumed)
        resumed.cancel()
    assert seen[0].tenant.name == tenant and _limits(seen[0].tenant) == (7, 0, 0, 0)
    assert seen[1].revoked_api_key.key_id == key.key_id and seen[1].revoked_api_key.HasField("revoked_at")
    assert not seen[1].HasField("adapter") and not seen[1].HasField("tenant")
    assert _limits(seen[2].tenant) == (0, 60, 0, 0)
    assert seen[0].revision < seen[1].revision < seen[2].revision
    assert again.revision == seen[2].revision


def test_only_routers_and_the_operator_read_tenant_tokens_and_only_the_operator_sets_limits(
    registry: RegistryProcess,
) -> None:
    tenant = _tenant(registry)
    with registry.admin() as c:
        tenant_id = next(t.tenant_id for t in c.list_tenants() if t.name == tenant)
    since = Timestamp()
    since.FromSeconds(0)
    request = usage_pb2.TenantTokensRequest(tenant_id=tenant_id, since=since)
    with sync_channel(registry.target, registry.certs.files(Role.ROUTER)) as channel:
        assert usage_pb2_grpc.UsageServiceStub(channel).TenantTokens(request, timeout=10).tokens == 0
    with sync_channel(registry.target, registry.certs.files(Role.WORKER)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            usage_pb2_grpc.UsageServiceStub(channel).TenantTokens(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with registry.as_role(Role.ROUTER) as router, pytest.raises(grpc.RpcError) as info:
        router.set_tenant_limits(tenant, requests_per_s=1_000_000)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
