"""`loraplex certs init`: a local CA and one certificate per role, for dev stacks and tests.

ECDSA P-256 keys (milliseconds to make), certificates valid for a year (CA: ten). Each role's
certificate names its role in the Subject CN (`loraplex-<role>`) and a SAN URI
(`spiffe://loraplex/<role>`), and carries the SAN names the services are reached by: localhost,
127.0.0.1, ::1, this host's name, plus any --host. A worker may register only an address whose host
is one of its SANs, so a worker on another machine needs its name or IP here (or its own
certificate from your CA or cert-manager).

Keys are 0600 in a 0700 directory (services.common.private_files); certificates are 0644.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.private_files import private_dir, write_private
from services.common.tls import Role, TlsFiles

CA_NAME = "loraplex local CA"
CA_DAYS = 3650
CERT_DAYS = 365
ROLES = tuple(Role)


@dataclass(frozen=True)
class CertsResult:
    directory: Path
    created: tuple[str, ...]  # file names written this time
    kept: tuple[str, ...]  # already there, left as they were


def default_hosts() -> list[str]:
    return ["localhost", "127.0.0.1", "::1", socket.gethostname()]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san_entries(hosts: Iterable[str], role: Role) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = [x509.UniformResourceIdentifier(role.spiffe_id)]
    for host in dict.fromkeys(h.strip() for h in hosts if h.strip()):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # some clock skew


def make_ca() -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a new self-signed CA."""
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now())
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_role_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, role: Role, hosts: Sequence[str]
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for `role`, signed by the CA, usable as TLS server and client."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role.common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now())
        .not_valid_after(_now() + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts, role)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _write_cert(path: Path, pem: bytes) -> None:
    path.write_bytes(pem)
    path.chmod(0o644)


def init_certs(directory: Path, *, hosts: Sequence[str] = (), force: bool = False) -> CertsResult:
    """Writes ca.crt/ca.key and <role>.crt/<role>.key for every role into `directory`.

    Files already there are kept (a role whose pair is missing is made from the existing CA);
    force: a new CA and new certificates replace them all.
    """
    private_dir(directory)
    all_hosts = [*default_hosts(), *hosts]
    created: list[str] = []
    kept: list[str] = []
    ca_crt, ca_key = directory / "ca.crt", directory / "ca.key"
    if force or not (ca_crt.is_file() and ca_key.is_file()):
        cert_pem, key_pem = make_ca()
        write_private(ca_key, key_pem)
        _write_cert(ca_crt, cert_pem)
        created += ["ca.crt", "ca.key"]
        force = True  # certificates of an older CA would not verify against the new one
    else:
        kept += ["ca.crt", "ca.key"]
    ca_cert_pem = ca_crt.read_bytes()
    ca_key_pem = ca_key.read_bytes()
    for role in ROLES:
        files = role_files(directory, role)
        if not force and files.cert.is_file() and files.key.is_file():
            kept += [files.cert.name, files.key.name]
            continue
        cert_pem, key_pem = make_role_cert(ca_cert_pem, ca_key_pem, role, all_hosts)
        write_private(files.key, key_pem)
        _write_cert(files.cert, cert_pem)
        created += [files.cert.name, files.key.name]
    return CertsResult(directory, tuple(created), tuple(kept))


def role_files(directory: Path, role: Role) -> TlsFiles:
    return TlsFiles(
        ca=directory / "ca.crt", cert=directory / f"{role.value}.crt", key=directory / f"{role.value}.key"
    )


def describe(directory: Path) -> list[str]:
    """One line per certificate: file, CN, SANs, expiry (never key material)."""
    lines = []
    for path in sorted(directory.glob("*.crt")):
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
            names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            names = []
        value = cn[0].value if cn else "?"
        text = value.decode() if isinstance(value, bytes) else value
        lines.append(
            f"{path}  CN={text}  expires {cert.not_valid_after_utc:%Y-%m-%d}"
            + (f"  SAN={','.join(names)}" if names else "")
        )
    return lines
