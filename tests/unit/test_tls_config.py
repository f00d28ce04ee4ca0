"""Service identities: certificates `loraplex certs init` writes, how each service finds its own, and the
pure parts of the role checks (role from CN, allow tables, hosts a worker certificate speaks for)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from services.common.certs import init_certs, role_files
from services.common.config import ConfigError, RouterSettings, WorkerSettings
from services.common.identity import REGISTRY_ALLOW, WORKER_ALLOW, allowed_roles, refusal
from services.common.object_store import AllowedSources
from services.common.private_files import InsecureFileError
from services.common.tls import Role, address_host, client_ca, host_matches, role_of_common_name, tls_files


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_init_writes_a_ca_and_one_private_pair_per_role(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    result = init_certs(directory, hosts=["worker-7.internal", "10.1.2.3"])
    assert _mode(directory) == 0o700
    assert set(result.created) == {"ca.crt", "ca.key"} | {
        f"{r.value}.{x}" for r in Role for x in ("crt", "key")
    }
    ca = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    for role in Role:
        files = role_files(directory, role)
        assert (_mode(files.key), _mode(files.cert)) == (0o600, 0o644)
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"loraplex-{role.value}"
        assert cert.issuer == ca.subject
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"localhost", "worker-7.internal"} <= set(san.get_values_for_type(x509.DNSName))
        assert {"127.0.0.1", "::1", "10.1.2.3"} <= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://loraplex/{role.value}"]


def test_certs_init_keeps_what_is_there_unless_forced(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    init_certs(directory)
    before = (directory / "ca.crt").read_bytes(), (directory / "worker.crt").read_bytes()
    again = init_certs(directory)
    assert again.created == () and "worker.key" in again.kept
    assert ((directory / "ca.crt").read_bytes(), (directory / "worker.crt").read_bytes()) == before
    (directory / "router.crt").unlink()
    assert set(init_certs(directory).created) == {"router.crt", "router.key"}  # from the same CA
    forced = init_certs(directory, force=True)
    assert "ca.crt" in forced.created and (directory / "ca.crt").read_bytes() != before[0]
    assert (directory / "worker.crt").read_bytes() != before[1]  # re-signed by the new CA


def test_each_service_finds_its_role_under_home_and_explicit_variables_win(tmp_path: Path) -> None:
    init_certs(tmp_path / "certs")
    home = {"LORAPLEX_HOME": str(tmp_path)}
    files = tls_files(home, Role.WORKER)
    assert files is not None and (files.cert.name, files.key.name, files.ca.name) == (
        "worker.crt",
        "worker.key",
        "ca.crt",
    )
    explicit = tls_files({**home, "LORAPLEX_TLS_CERT": str(tmp_path / "certs" / "router.crt")}, Role.WORKER)
    assert explicit is not None and explicit.cert.name == "router.crt"
    assert tls_files({**home, "LORAPLEX_INSECURE_PLAINTEXT": "true"}, Role.WORKER) is None
    assert client_ca(home) == tmp_path / "certs" / "ca.crt"


def test_a_service_without_certificates_refuses_to_start_and_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        RouterSettings.from_env({"LORAPLEX_HOME": str(tmp_path)})
    message = str(info.value)
    assert "loraplex certs init" in message and "LORAPLEX_TLS_CERT" in message
    assert "LORAPLEX_INSECURE_PLAINTEXT=true" in message
    init_certs(tmp_path / "certs")
    with pytest.raises(ConfigError, match="LORAPLEX_TLS_KEY=/nope"):
        tls_files({"LORAPLEX_HOME": str(tmp_path), "LORAPLEX_TLS_KEY": "/nope"}, Role.ROUTER)


def test_a_key_others_may_read_is_refused(tmp_path: Path) -> None:
    init_certs(tmp_path / "certs")
    files = role_files(tmp_path / "certs", Role.ROUTER)
    files.key.chmod(0o644)
    with pytest.raises(InsecureFileError, match="chmod 600"):
        files.read()


def test_a_worker_needs_no_admin_token_and_fetches_only_from_the_registry_sources(tmp_path: Path) -> None:
    init_certs(tmp_path / "certs")
    s = WorkerSettings.from_env(
        {
            "LORAPLEX_HOME": str(tmp_path),
            "LORAPLEX_DEVICE": "cpu",
            "LORAPLEX_REGISTRY": "10.0.0.1:50051",
            "LORAPLEX_ADAPTER_STORE": "s3://store/adapters",
            "LORAPLEX_ALLOWED_BUCKETS": "team-bucket",
            "LORAPLEX_ALLOWED_FILE_ROOTS": "/data/adapters",
        }
    )
    assert s.registry == "10.0.0.1:50051" and not hasattr(s, "admin_token")
    assert s.tls is not None and s.tls.cert.name == "worker.crt"
    assert s.adapter_sources == AllowedSources(
        buckets=("team-bucket", "store"), file_roots=("/data/adapters",)
    )
    local = WorkerSettings.from_env({"LORAPLEX_HOME": str(tmp_path), "LORAPLEX_DEVICE": "cpu"})
    assert local.adapter_sources.file_roots == (str(tmp_path / "adapters"),)  # the default store's directory


def test_the_router_public_endpoint_takes_both_tls_files(tmp_path: Path) -> None:
    init_certs(tmp_path / "certs")
    router = role_files(tmp_path / "certs", Role.ROUTER)
    base = {"LORAPLEX_HOME": str(tmp_path)}
    s = RouterSettings.from_env(
        {**base, "LORAPLEX_ROUTER_TLS_CERT": str(router.cert), "LORAPLEX_ROUTER_TLS_KEY": str(router.key)}
    )
    assert s.public_tls is not None and s.public_tls.cert == router.cert
    assert RouterSettings.from_env(base).public_tls is None
    with pytest.raises(ConfigError, match="both"):
        RouterSettings.from_env({**base, "LORAPLEX_ROUTER_TLS_KEY": str(router.key)})


def test_roles_come_only_from_loraplex_common_names() -> None:
    assert role_of_common_name("loraplex-router") is Role.ROUTER
    assert role_of_common_name("loraplex-operator") is Role.OPERATOR
    assert role_of_common_name("loraplex-admin") is None
    assert role_of_common_name("router") is None


def test_allow_tables_close_what_they_do_not_name() -> None:
    worker = "loraplex.v1.WorkerService"
    assert allowed_roles(WORKER_ALLOW, f"/{worker}/Generate") == {Role.ROUTER}
    assert allowed_roles(WORKER_ALLOW, f"/{worker}/GetInfo") == {Role.ROUTER, Role.OPERATOR}
    assert allowed_roles(WORKER_ALLOW, "/loraplex.v1.Unknown/Call") == frozenset()
    assert allowed_roles(WORKER_ALLOW, "/grpc.health.v1.Health/Check") is None  # any verified peer
    registry = "loraplex.v1.AdapterRegistryService"
    assert allowed_roles(REGISTRY_ALLOW, f"/{registry}/RegisterWorker") == {Role.WORKER}
    assert allowed_roles(REGISTRY_ALLOW, f"/{registry}/CreateTenant") == {Role.ROUTER, Role.OPERATOR}
    assert refusal(f"/{worker}/Generate", {Role.ROUTER}, Role.WORKER) == (
        "WorkerService.Generate serves only the router identity; this caller presented 'worker'"
    )


@pytest.mark.parametrize(
    ("address", "names", "ok"),
    [
        ("127.0.0.1:50052", ["localhost", "127.0.0.1"], True),
        ("[::1]:50052", ["::1"], True),
        ("[0:0:0:0:0:0:0:1]:50052", ["::1"], True),
        ("Worker-0.Pool.svc:50052", ["worker-0.pool.svc"], True),
        ("worker-3.pool.svc:50052", ["*.pool.svc"], True),
        ("a.b.pool.svc:50052", ["*.pool.svc"], False),
        ("10.0.0.9:50052", ["localhost", "127.0.0.1", "10.0.0.8"], False),
        ("evil.example:50052", ["10.0.0.9"], False),
    ],
)
def test_a_worker_speaks_only_for_hosts_its_certificate_names(
    address: str, names: list[str], ok: bool
) -> None:
    assert host_matches(address_host(address), names) is ok
