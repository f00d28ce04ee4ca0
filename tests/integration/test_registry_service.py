"""The registry over real gRPC on loopback: lifecycle, auth, tenant isolation, and every bad input.

Each rejection must carry the right status and a sentence a user can act on, and leave nothing
behind: no adapter row and no stored object.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import threading
import uuid
from pathlib import Path

import boto3
import grpc
import psycopg
import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.v1 import common_pb2, registry_pb2
from services.common.model_spec import BaseModelSpec
from services.common.tls import Role
from tests.fixtures.registry import MAX_BYTES, MAX_RANK, RegistryProcess

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _tenant(registry: RegistryProcess) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    with registry.admin() as c:
        c.create_tenant(name)
    return name


def _adapter_rows(registry: RegistryProcess, tenant: str) -> int:
    with psycopg.connect(registry.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM adapters a JOIN tenants t ON t.id = a.tenant_id WHERE t.name = %s",
            (tenant,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _stored_objects(registry: RegistryProcess) -> set[Path]:
    if not registry.store_dir.exists():
        return set()
    return {p for p in registry.store_dir.rglob("*") if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(adapter_dir: Path, tensors: dict[str, torch.Tensor], **config_changes: object) -> None:
    save_file(tensors, str(adapter_dir / WEIGHTS))
    config = json.loads((adapter_dir / CONFIG).read_text())
    config.update(config_changes)
    (adapter_dir / CONFIG).write_text(json.dumps(config))


def _expect_rejected(
    registry: RegistryProcess,
    tmp_path: Path,
    adapter_dir: Path,
    base: BaseModelSpec,
    code: grpc.StatusCode,
    *phrases: str,
    files: list[Path] | None = None,
    name: str = "bad",
) -> str:
    tenant = _tenant(registry)
    before = _stored_objects(registry)
    with registry.admin() as c, pytest.raises(grpc.RpcError) as err:
        meta = registry_pb2.UploadAdapterMetadata(tenant=tenant, name=name, base_model=base.name)
        c.upload_files(meta, files or [adapter_dir / CONFIG, adapter_dir / WEIGHTS])
    assert err.value.code() == code, err.value.details()
    details = err.value.details() or ""
    for phrase in phrases:
        assert phrase.lower() in details.lower(), details
    assert _adapter_rows(registry, tenant) == 0
    assert _stored_objects(registry) == before
    assert not any((registry.home / "staging").glob("*")), "staging files left behind"
    return details


# -- the happy path -----------------------------------------------------------------------------


def test_cli_round_trip_registers_and_lists_the_smollm2_adapter(
    registry: RegistryProcess, smollm2_adapters: dict[str, Path], smollm2_spec: BaseModelSpec
) -> None:
    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    created = registry.cli("tenants", "create", tenant, "--json")
    assert created.returncode == 0, created.stderr
    reg = registry.cli(
        "adapters",
        "register",
        "support-bot",
        "--tenant",
        tenant,
        "--base-model",
        smollm2_spec.name,
        "--path",
        str(smollm2_adapters["qv-r8"]),
        "--json",
    )
    assert reg.returncode == 0, reg.stderr
    listed = registry.cli("adapters", "list", "--tenant", tenant, "--json")
    assert listed.returncode == 0, listed.stderr
    adapters = json.loads(listed.stdout)
    assert [(a["ref"]["name"], a["ref"]["version"], a["status"]) for a in adapters] == [
        ("support-bot", 1, "ADAPTER_STATUS_READY")
    ]
    assert adapters[0]["ref"]["digest"].startswith("sha256:")
    assert adapters[0]["ref"]["rank"] == 8
    human = registry.cli("adapters", "list", "--tenant", tenant)
    assert "support-bot@1" in human.stdout and "READY" in human.stdout


def test_cli_reports_server_errors_with_nonzero_exit(registry: RegistryProcess) -> None:
    result = registry.cli("adapters", "show", "nope", "--tenant", "no-such-tenant")
    assert result.returncode != 0
    assert "NOT_FOUND" in result.stderr and "no-such-tenant" in result.stderr


def test_versions_are_immutable_and_latest_ready_is_resolved(
    registry: RegistryProcess, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    tenant = _tenant(registry)
    with registry.admin() as c:
        names = sorted(tiny_adapters)
        v1 = c.upload_adapter(
            tiny_adapters[names[0]], tenant=tenant, name="a", base_model=tiny_llama_spec.name
        )
        v2 = c.upload_adapter(
            tiny_adapters[names[1]], tenant=tenant, name="a", base_model=tiny_llama_spec.name
        )
        assert (v1.ref.version, v2.ref.version) == (1, 2)
        assert v1.ref.digest != v2.ref.digest
        assert c.get_adapter("a", tenant).ref.version == 2
        assert c.get_adapter("a@1", tenant).ref.digest == v1.ref.digest
        archived = c.archive_adapter("a@2", tenant)
        assert archived.status == common_pb2.ADAPTER_STATUS_ARCHIVED
        assert c.get_adapter("a", tenant).ref.version == 1


def test_register_from_s3_and_file_uris(
    registry: RegistryProcess, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    tenant = _tenant(registry)
    src = tiny_adapters[sorted(tiny_adapters)[0]]
    s3 = boto3.client("s3")
    for f in (CONFIG, WEIGHTS):
        s3.upload_file(str(src / f), registry.bucket, f"team/x/{f}")
    local = _copy(src, registry.sources_dir / f"a-{uuid.uuid4().hex[:6]}")
    with registry.admin() as c:
        from_s3 = c.register_adapter(
            tenant=tenant,
            name="from-s3",
            base_model=tiny_llama_spec.name,
            uri=f"s3://{registry.bucket}/team/x",
        )
        from_file = c.register_adapter(
            tenant=tenant, name="from-file", base_model=tiny_llama_spec.name, uri=local.as_uri()
        )
    assert from_s3.ref.digest == from_file.ref.digest
    assert from_s3.status == common_pb2.ADAPTER_STATUS_READY


def test_concurrent_registrations_of_one_name_get_distinct_versions(
    registry: RegistryProcess, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    tenant = _tenant(registry)
    src = tiny_adapters[sorted(tiny_adapters)[0]]
    versions: list[int] = []
    failures: list[BaseException] = []

    def register() -> None:
        try:
            with registry.admin() as c:
                versions.append(
                    c.upload_adapter(
                        src, tenant=tenant, name="race", base_model=tiny_llama_spec.name
                    ).ref.version
                )
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=register) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert sorted(versions) == [1, 2]
    assert _adapter_rows(registry, tenant) == 2


def test_watch_adapters_streams_changes_in_revision_order(
    registry: RegistryProcess, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    tenant = _tenant(registry)
    src = tiny_adapters[sorted(tiny_adapters)[0]]
    with registry.admin() as c:
        first = c.upload_adapter(src, tenant=tenant, name="w", base_model=tiny_llama_spec.name)
        stream = c.stub.WatchAdapters(
            registry_pb2.WatchAdaptersRequest(since_revision=first.revision - 1),
            metadata=c.metadata,
            timeout=30,
        )
        seen = [next(stream)]
        c.archive_adapter("w@1", tenant)
        seen.append(next(stream))
        stream.cancel()
    assert [m.adapter.ref.adapter_id for m in seen] == [first.ref.adapter_id] * 2
    assert seen[0].revision < seen[1].revision
    assert seen[1].adapter.status == common_pb2.ADAPTER_STATUS_ARCHIVED


# -- auth and tenant isolation -----------------------------------------------------------------


def test_admin_calls_need_the_admin_token(registry: RegistryProcess) -> None:
    with registry.as_role(Role.OPERATOR) as anon, pytest.raises(grpc.RpcError) as err:
        anon.create_tenant("x")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in (err.value.details() or "")
    with (
        registry.as_role(Role.OPERATOR, "wrong-token-wrong-token") as bad,
        pytest.raises(grpc.RpcError) as err,
    ):
        bad.create_tenant("x")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    tenant = _tenant(registry)
    with registry.admin() as c:
        secret = c.create_api_key(tenant).secret
    with registry.as_key(secret) as keyed, pytest.raises(grpc.RpcError) as err:
        keyed.create_tenant("x")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_tenant_cannot_see_another_tenants_adapter(
    registry: RegistryProcess, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    a, b = _tenant(registry), _tenant(registry)
    src = tiny_adapters[sorted(tiny_adapters)[0]]
    with registry.admin() as c:
        b_adapter = c.upload_adapter(src, tenant=b, name="secret-sauce", base_model=tiny_llama_spec.name)
        key_a = c.create_api_key(a)
    with registry.as_key(key_a.secret) as as_a:
        errors = []
        for ref in ("secret-sauce", "secret-sauce@1", b_adapter.ref.adapter_id, "never-existed"):
            with pytest.raises(grpc.RpcError) as err:
                as_a.get_adapter(ref, tenant=b)  # naming tenant b must not help
            errors.append(err.value)
        assert {e.code() for e in errors} == {grpc.StatusCode.NOT_FOUND}
        assert all("not found" in (e.details() or "") for e in errors)
        assert list(as_a.list_adapters(tenant=b)) == []
    with registry.admin() as c:
        c.revoke_api_key(key_a.api_key.key_id)
    with registry.as_key(key_a.secret) as revoked, pytest.raises(grpc.RpcError) as err:
        list(revoked.list_adapters())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- bad input: the right status, an actionable message, nothing left behind --------------------


def test_pickled_weights_are_refused(
    registry: RegistryProcess, tmp_path: Path, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    d = _copy(tiny_adapters[sorted(tiny_adapters)[0]], tmp_path / "pickled")
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"not": "loaded"}))
    _expect_rejected(
        registry,
        tmp_path,
        d,
        tiny_llama_spec,
        grpc.StatusCode.INVALID_ARGUMENT,
        "safetensors",
        files=[d / CONFIG, d / "adapter_model.bin"],
    )


def test_corrupted_header_is_refused(
    registry: RegistryProcess, tmp_path: Path, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    d = _copy(tiny_adapters[sorted(tiny_adapters)[0]], tmp_path / "corrupt")
    data = bytearray((d / WEIGHTS).read_bytes())
    data[8:24] = b"#" * 16
    (d / WEIGHTS).write_bytes(bytes(data))
    _expect_rejected(registry, tmp_path, d, tiny_llama_spec, grpc.StatusCode.INVALID_ARGUMENT, "header")


def test_oversized_header_is_refused(
    registry: RegistryProcess, tmp_path: Path, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    d = _copy(tiny_adapters[sorted(tiny_adapters)[0]], tmp_path / "oversized")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    _expect_rejected(registry, tmp_path, d, tiny_llama_spec, grpc.StatusCode.INVALID_ARGUMENT, "header")


def test_truncated_file_is_refused(
    registry: RegistryProcess, tmp_path: Path, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    d = _copy(tiny_adapters[sorted(tiny_adapters)[0]], tmp_path / "truncated")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) - 100])
    _expect_rejected(registry, tmp_path, d, tiny_llama_spec, grpc.StatusCode.INVALID_ARGUMENT, "truncated")


def test_tensor_for_a_missing_module_is_refused(
    registry: RegistryProcess, tmp_path: Path, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    d = _copy(tiny_adapters[sorted(tiny_adapters)[0]], tmp_path / "missing-module")
    tensors = load_file(str(d / WEIGHTS))
    key = next(k for k in tensors if "lora_A" in k)
    bogus = key.rsplit(".", 3)[0].rsplit(".", 1)[0] + ".x_proj.lora_A.weight"
    tensors[bogus] = tensors.pop(key)
    _rewrite(d, tensors)
    _expect_rejected(registry, tmp_path, d, tiny_llama_spec, grpc.StatusCode.INVALID_ARGUMENT, "x_proj")


def test_right_module_wrong_shape_is_refused(
    registry: RegistryProcess, tmp_path: Path, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    d = _copy(tiny_adapters[sorted(tiny_adapters)[0]], tmp_path / "wrong-shape")
    tensors = load_file(str(d / WEIGHTS))
    key = next(k for k in tensors if "lora_A" in k)
    r, n_in = tensors[key].shape
    tensors[key] = torch.zeros(r, n_in + 3, dtype=tensors[key].dtype)
    _rewrite(d, tensors)
    _expect_rejected(registry, tmp_path, d, tiny_llama_spec, grpc.StatusCode.INVALID_ARGUMENT, "shape")


def test_rank_over_the_limit_is_refused(
    registry: RegistryProcess, tmp_path: Path, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    d = _copy(tiny_adapters[sorted(tiny_adapters)[0]], tmp_path / "high-rank")
    r = MAX_RANK * 2
    tensors = {}
    for k, t in load_file(str(d / WEIGHTS)).items():
        if "lora_A" in k:
            tensors[k] = torch.zeros(r, t.shape[1], dtype=t.dtype)
        elif "lora_B" in k:
            tensors[k] = torch.zeros(t.shape[0], r, dtype=t.dtype)
        else:
            tensors[k] = t
    _rewrite(d, tensors, r=r, rank_pattern={})
    _expect_rejected(
        registry, tmp_path, d, tiny_llama_spec, grpc.StatusCode.INVALID_ARGUMENT, "rank", str(MAX_RANK)
    )


def test_upload_over_the_size_limit_is_refused(
    registry: RegistryProcess, tmp_path: Path, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    d = _copy(tiny_adapters[sorted(tiny_adapters)[0]], tmp_path / "huge")
    tensors = load_file(str(d / WEIGHTS))
    tensors["padding"] = torch.zeros(MAX_BYTES // 4 + 1024, dtype=torch.float32)
    save_file(tensors, str(d / WEIGHTS))
    _expect_rejected(registry, tmp_path, d, tiny_llama_spec, grpc.StatusCode.INVALID_ARGUMENT, "limit")


def test_unknown_base_model_is_not_found(
    registry: RegistryProcess, tmp_path: Path, tiny_adapters: dict[str, Path], tiny_llama_spec: BaseModelSpec
) -> None:
    unknown = BaseModelSpec(
        name="gpt-17",
        architecture="x",
        num_layers=1,
        context_length=1,
        hidden_size=1,
        vocab_size=1,
        target_modules=(),
    )
    d = tiny_adapters[sorted(tiny_adapters)[0]]
    details = _expect_rejected(registry, tmp_path, d, unknown, grpc.StatusCode.NOT_FOUND, "gpt-17")
    assert tiny_llama_spec.name in details  # tells the user which base models exist


@pytest.mark.parametrize("name", ["../escape", "a/b", "UPPER", "", "x" * 80, ".hidden"])
def test_unsafe_adapter_names_are_refused(
    registry: RegistryProcess,
    tmp_path: Path,
    tiny_adapters: dict[str, Path],
    tiny_llama_spec: BaseModelSpec,
    name: str,
) -> None:
    d = tiny_adapters[sorted(tiny_adapters)[0]]
    _expect_rejected(
        registry, tmp_path, d, tiny_llama_spec, grpc.StatusCode.INVALID_ARGUMENT, "not allowed", name=name
    )


@pytest.mark.parametrize(
    ("uri", "named"),
    [
        ("s3://someone-elses-bucket/x", "someone-elses-bucket"),
        ("file:///etc", "/etc"),
        ("http://example.com/a", "http"),
    ],
)
def test_uris_outside_the_allowed_stores_are_refused(
    registry: RegistryProcess, tiny_llama_spec: BaseModelSpec, uri: str, named: str
) -> None:
    tenant = _tenant(registry)
    before = _stored_objects(registry)
    with registry.admin() as c, pytest.raises(grpc.RpcError) as err:
        c.register_adapter(tenant=tenant, name="x", base_model=tiny_llama_spec.name, uri=uri)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value.details()
    assert named in (err.value.details() or "")
    assert _adapter_rows(registry, tenant) == 0
    assert _stored_objects(registry) == before


def test_file_uri_escaping_the_allowed_root_is_refused(
    registry: RegistryProcess, tiny_llama_spec: BaseModelSpec
) -> None:
    tenant = _tenant(registry)
    escape = f"file://{registry.sources_dir}/../../"
    with registry.admin() as c, pytest.raises(grpc.RpcError) as err:
        c.register_adapter(tenant=tenant, name="x", base_model=tiny_llama_spec.name, uri=escape)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_health_and_reflection_describe_the_registry(registry: RegistryProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with registry.certs.channel(registry.target, Role.OPERATOR) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="loraplex.v1.AdapterRegistryService"), timeout=5
        )
    assert {"loraplex.v1.AdapterRegistryService", "grpc.health.v1.Health"} <= services
    assert health.status == health_pb2.HealthCheckResponse.SERVING
