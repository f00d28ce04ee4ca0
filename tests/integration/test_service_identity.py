"""Service identity: each attack on the workers and the registry's service RPCs, and what it now gets.

Before mutual TLS any network peer could call a worker's Generate (served, never billed), prefetch
or evict adapters, point a worker at any bucket or file, read WatchState, and register workers
with the admin token every worker held. Each test below makes one of those attempts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from loraplex.v1 import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.client.usage import UsageClient
from services.common.adapter_files import ADAPTER_FILES, digest_hex
from services.common.certs import make_ca, make_role_cert
from services.common.private_files import write_private
from services.common.tls import Role, TlsFiles, aio_channel, sync_channel
from services.devtools.tiny_model import TINY_LLAMA
from services.worker.server import RunningWorker
from tests.fixtures.registry import ADMIN_TOKEN, RegistryProcess
from tests.fixtures.tls import ServiceCerts
from tests.fixtures.worker import AdapterStore

PROMPT = common_pb2.Prompt(token_ids=common_pb2.TokenIdsPrompt(ids=[1, 9690, 198]))


def _generate_request(
    adapter: common_pb2.AdapterRef | None = None,
) -> worker_pb2.WorkerServiceGenerateRequest:
    return worker_pb2.WorkerServiceGenerateRequest(
        request_id=f"attack-{uuid.uuid4().hex}",
        adapter=adapter,
        prompt=PROMPT,
        sampling=common_pb2.SamplingParams(max_tokens=2),
    )


async def _worker_error(channel: grpc.aio.Channel, call: Callable[[Any], Any]) -> grpc.aio.AioRpcError:
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        result = call(stub)
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    return info.value


def _other_ca_identity(directory: Path, role: Role) -> TlsFiles:
    """A well-formed certificate for `role`, signed by a CA the services do not trust."""
    ca_pem, ca_key = make_ca()
    cert_pem, key_pem = make_role_cert(ca_pem, ca_key, role, ["localhost", "127.0.0.1"])
    files = TlsFiles(ca=directory / "ca.crt", cert=directory / f"{role.value}.crt", key=directory / "k.key")
    files.ca.write_bytes(ca_pem)
    files.cert.write_bytes(cert_pem)
    write_private(files.key, key_pem)
    return files


def _identity_for_hosts(certs: ServiceCerts, directory: Path, role: Role, hosts: list[str]) -> TlsFiles:
    """A certificate from the deployment's CA for `role`, naming only `hosts`."""
    ca = certs.files(role).ca
    ca_key = (ca.parent / "ca.key").read_bytes()
    cert_pem, key_pem = make_role_cert(ca.read_bytes(), ca_key, role, hosts)
    files = TlsFiles(
        ca=ca, cert=directory / f"{role.value}-{uuid.uuid4().hex[:6]}.crt", key=directory / "k.key"
    )
    files.cert.write_bytes(cert_pem)
    write_private(files.key, key_pem)
    return files


# -- the worker ---------------------------------------------------------------------------------


async def test_a_caller_without_a_certificate_cannot_reach_a_worker(
    tiny_worker: RunningWorker, certs: ServiceCerts
) -> None:
    target = f"127.0.0.1:{tiny_worker.port}"
    async with grpc.aio.insecure_channel(target) as plaintext:
        err = await _worker_error(plaintext, lambda s: s.Generate(_generate_request(), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # TLS that checks the worker but presents no client certificate fails the handshake too.
    ca = certs.files(Role.WORKER).ca.read_bytes()
    anonymous = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(target, anonymous) as channel:
        err = await _worker_error(channel, lambda s: s.Generate(_generate_request(), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("Generate", lambda s: s.Generate(_generate_request(), timeout=10)),
        (
            "PrefetchAdapter",
            lambda s: s.PrefetchAdapter(
                worker_pb2.PrefetchAdapterRequest(
                    adapter=common_pb2.AdapterRef(digest="sha256:" + "ab" * 32, uri="s3://any/x"),
                    tier=common_pb2.ADAPTER_TIER_DEVICE,
                ),
                timeout=10,
            ),
        ),
        (
            "EvictAdapter",
            lambda s: s.EvictAdapter(worker_pb2.EvictAdapterRequest(digest="sha256:" + "ab" * 32)),
        ),
        ("WatchState", lambda s: s.WatchState(worker_pb2.WatchStateRequest(), timeout=10)),
    ],
)
async def test_only_the_router_identity_may_use_a_worker(
    tiny_worker: RunningWorker, certs: ServiceCerts, method: str, call: Callable[[Any], Any]
) -> None:
    target = f"127.0.0.1:{tiny_worker.port}"
    for role in (Role.WORKER, Role.OPERATOR, Role.REGISTRY):
        async with certs.aio_channel(target, role) as channel:
            err = await _worker_error(channel, call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, (method, role)
        assert err.details() == (
            f"WorkerService.{method} serves only the router identity; this caller presented '{role.value}'"
        )


async def test_the_router_identity_is_served_and_an_operator_may_read_get_info(
    tiny_worker: RunningWorker, certs: ServiceCerts
) -> None:
    target = f"127.0.0.1:{tiny_worker.port}"
    async with certs.aio_channel(target, Role.ROUTER) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        events = [e async for e in stub.Generate(_generate_request(), timeout=60)]
    assert events[-1].HasField("finished")
    async with certs.aio_channel(target, Role.OPERATOR) as channel:
        info = await worker_pb2_grpc.WorkerServiceStub(channel).GetInfo(worker_pb2.GetInfoRequest())
    assert info.base_model == TINY_LLAMA


async def test_a_certificate_from_another_ca_fails_the_handshake(
    tiny_worker: RunningWorker, registry: RegistryProcess, tmp_path: Path
) -> None:
    foreign = _other_ca_identity(tmp_path, Role.ROUTER)
    # Our CA, so the client accepts the server: the server is what refuses the foreign client.
    foreign = TlsFiles(ca=registry.certs.files(Role.ROUTER).ca, cert=foreign.cert, key=foreign.key)
    async with aio_channel(f"127.0.0.1:{tiny_worker.port}", foreign) as channel:
        err = await _worker_error(channel, lambda s: s.Generate(_generate_request(), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    with sync_channel(registry.target, foreign) as channel:
        stub = registry_pb2_grpc.AdapterRegistryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListWorkers(registry_pb2.ListWorkersRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("uri", ["s3://someone-elses-bucket/adapters/x", "file:///etc"])
async def test_a_worker_refuses_an_adapter_outside_the_registry_store_and_caches_nothing(
    tiny_worker: RunningWorker, certs: ServiceCerts, uri: str
) -> None:
    digest = "sha256:" + uuid.uuid4().hex * 2
    ref = common_pb2.AdapterRef(
        adapter_id="x", name="x", version=1, digest=digest, uri=uri, base_model=TINY_LLAMA
    )
    async with certs.aio_channel(f"127.0.0.1:{tiny_worker.port}", Role.ROUTER) as channel:
        err = await _worker_error(channel, lambda s: s.Generate(_generate_request(ref), timeout=10))
        prefetch = await _worker_error(
            channel,
            lambda s: s.PrefetchAdapter(
                worker_pb2.PrefetchAdapterRequest(adapter=ref, tier=common_pb2.ADAPTER_TIER_DEVICE),
                timeout=10,
            ),
        )
    for refused in (err, prefetch):
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "this worker" in (refused.details() or "")
    assert not (tiny_worker.loader.cache_dir / digest_hex(digest)).exists()
    assert tiny_worker.loader.policy.known_size(digest) is None


async def test_a_worker_reads_no_more_than_the_registry_size_of_a_reference(
    tiny_worker: RunningWorker, certs: ServiceCerts, worker_tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / "adapter"
    shutil.copytree(worker_tiny_adapters["dora"], source)
    ref = AdapterStore(tmp_path / "store").publish(source, base_model=TINY_LLAMA, name="undersized")
    stored = sum((source / name).stat().st_size for name in ADAPTER_FILES)
    ref.size_bytes = stored // 2  # the registry says it is smaller than what the store holds
    async with certs.aio_channel(f"127.0.0.1:{tiny_worker.port}", Role.ROUTER) as channel:
        err = await _worker_error(channel, lambda s: s.Generate(_generate_request(ref), timeout=30))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "over the limit" in (err.details() or "")
    assert not (tiny_worker.loader.cache_dir / digest_hex(ref.digest)).exists()


# -- the registry --------------------------------------------------------------------------------


def _register(client: Any, worker_id: str, address: str) -> registry_pb2.RegisterWorkerResponse:
    response: registry_pb2.RegisterWorkerResponse = client.stub.RegisterWorker(
        registry_pb2.RegisterWorkerRequest(
            worker=registry_pb2.Worker(worker_id=worker_id, address=address, base_model=TINY_LLAMA)
        ),
        metadata=client.metadata,
        timeout=10,
    )
    return response


def test_only_a_worker_identity_may_register_a_worker(registry: RegistryProcess) -> None:
    worker_id = f"id-{uuid.uuid4().hex[:8]}"
    for role, token in ((Role.ROUTER, None), (Role.OPERATOR, ADMIN_TOKEN), (Role.ROUTER, ADMIN_TOKEN)):
        with registry.as_role(role, token) as c, pytest.raises(grpc.RpcError) as info:
            _register(c, worker_id, "127.0.0.1:7000")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, (role, token)
    with registry.as_role(Role.WORKER) as c:
        assert _register(c, worker_id, "127.0.0.1:7000").heartbeat_interval_ms > 0
        known = c.stub.HeartbeatWorker(registry_pb2.HeartbeatWorkerRequest(worker_id=worker_id), timeout=10)
    assert known.known


def test_a_worker_cannot_register_or_keep_alive_a_host_outside_its_certificate(
    registry: RegistryProcess, tmp_path: Path
) -> None:
    worker_id = f"id-{uuid.uuid4().hex[:8]}"
    with registry.as_role(Role.WORKER) as c, pytest.raises(grpc.RpcError) as info:
        _register(c, worker_id, "10.9.9.9:50052")  # not among localhost, 127.0.0.1, ::1, this host
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'10.9.9.9'" in (info.value.details() or "") and "own address" in (info.value.details() or "")
    with registry.as_role(Role.WORKER) as c:
        _register(c, worker_id, "127.0.0.1:50052")
    # Another worker, whose certificate names only 10.9.9.9, may register there but may not keep
    # the 127.0.0.1 registration alive.
    elsewhere = _identity_for_hosts(registry.certs, tmp_path, Role.WORKER, ["10.9.9.9"])
    with sync_channel(registry.target, elsewhere) as channel:
        stub = registry_pb2_grpc.AdapterRegistryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.HeartbeatWorker(registry_pb2.HeartbeatWorkerRequest(worker_id=worker_id), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        other = f"id-{uuid.uuid4().hex[:8]}"
        stub.RegisterWorker(
            registry_pb2.RegisterWorkerRequest(
                worker=registry_pb2.Worker(worker_id=other, address="10.9.9.9:50052", base_model=TINY_LLAMA)
            ),
            timeout=10,
        )


def test_a_service_certificate_without_the_admin_token_cannot_make_admin_calls(
    registry: RegistryProcess,
) -> None:
    for role in (Role.ROUTER, Role.WORKER, Role.OPERATOR):
        with registry.as_role(role) as c, pytest.raises(grpc.RpcError) as info:
            c.create_tenant(f"t-{uuid.uuid4().hex[:8]}")
        expected = (
            grpc.StatusCode.UNAUTHENTICATED if role is Role.OPERATOR else grpc.StatusCode.PERMISSION_DENIED
        )
        assert info.value.code() == expected, role
    with registry.as_role(Role.ROUTER) as c, pytest.raises(grpc.RpcError) as info:
        c.create_tenant(f"t-{uuid.uuid4().hex[:8]}")
    assert "admin token" in (info.value.details() or "") and "router identity" in (info.value.details() or "")


def test_the_router_identity_makes_its_registry_calls_without_the_admin_token(
    registry: RegistryProcess,
) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    with registry.admin() as c:
        c.create_tenant(name)
        secret = c.create_api_key(name).secret
    with registry.as_role(Role.ROUTER) as router:
        auth = router.stub.AuthenticateApiKey(
            registry_pb2.AuthenticateApiKeyRequest(secret=secret), timeout=10
        )
        router.stub.ListWorkers(registry_pb2.ListWorkersRequest(), timeout=10)
        router.stub.ListBaseModels(registry_pb2.ListBaseModelsRequest(), timeout=10)
        router.stub.ListAdapters(registry_pb2.ListAdaptersRequest(tenant=name), timeout=10)
    assert auth.tenant_id
    # A worker certificate is not a router: it reads neither keys nor adapters.
    with registry.as_role(Role.WORKER) as worker, pytest.raises(grpc.RpcError) as info:
        worker.stub.AuthenticateApiKey(registry_pb2.AuthenticateApiKeyRequest(secret=secret), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "AdapterRegistryService.AuthenticateApiKey" in (info.value.details() or "")


def test_usage_is_recorded_by_routers_and_read_only_with_the_admin_token(registry: RegistryProcess) -> None:
    with UsageClient(registry.target, None, tls=registry.certs.files(Role.ROUTER)) as router:
        assert router.record([]).inserted == 0
        with pytest.raises(grpc.RpcError) as info:
            router.summarize(None, None)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with sync_channel(registry.target, registry.certs.files(Role.WORKER)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            usage_pb2_grpc.UsageServiceStub(channel).RecordUsage(usage_pb2.RecordUsageRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_certs_init_on_the_command_line_writes_once_and_never_prints_a_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env["LORAPLEX_HOME"] = str(tmp_path)

    def certs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli.main", "certs", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = certs("init", "--host", "worker-7.internal")
    assert first.returncode == 0, first.stderr
    assert str(tmp_path / "certs") in first.stdout and "worker.key" in first.stdout
    again = certs("init")
    assert again.returncode == 0 and "kept" in again.stdout and "wrote" not in again.stdout
    shown = certs("show")
    assert "CN=loraplex-worker" in shown.stdout and "worker-7.internal" in shown.stdout
    for out in (first, again, shown):
        assert "PRIVATE KEY" not in out.stdout + out.stderr
