"""Service identity over mutual TLS: which files, which role, and the channels every service opens.

Each service holds one certificate signed by the deployment's CA; its role is the certificate's
Subject CN, `loraplex-<role>` (also written as a SAN URI `spiffe://loraplex/<role>`). Servers
require a client certificate from the same CA, so every peer of a router, worker or registry has
a verified role; services.common.identity decides what each role may call.

Files: LORAPLEX_TLS_CA, LORAPLEX_TLS_CERT, LORAPLEX_TLS_KEY, each defaulting to
`$LORAPLEX_HOME/certs/{ca.crt,<role>.crt,<role>.key}` when those exist (what `loraplex certs init`
writes; cert-manager Secrets mount as the three variables). LORAPLEX_INSECURE_PLAINTEXT=true runs
without TLS on a trusted network (benchmarks): no identity can be checked then.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.config import PREFIX, ConfigError, Env, loraplex_home
from services.common.private_files import read_secret

log = logging.getLogger(__name__)

CN_PREFIX = "loraplex-"
SPIFFE_PREFIX = "spiffe://loraplex/"


class Role(enum.StrEnum):
    REGISTRY = "registry"
    ROUTER = "router"
    WORKER = "worker"
    # The operator's CLI: admin RPCs still need the admin token on top of this certificate.
    OPERATOR = "operator"

    @property
    def common_name(self) -> str:
        return CN_PREFIX + self.value

    @property
    def spiffe_id(self) -> str:
        return SPIFFE_PREFIX + self.value


def role_of_common_name(common_name: str) -> Role | None:
    """The role a certificate's CN names, or None for any other CN."""
    if not common_name.startswith(CN_PREFIX):
        return None
    try:
        return Role(common_name.removeprefix(CN_PREFIX))
    except ValueError:
        return None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one identity: the CA that signs every peer, this service's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) bytes; the key file is refused when others may read it."""
        return self.ca.read_bytes(), self.cert.read_bytes(), (read_secret(self.key) + "\n").encode()


def certs_dir(home: Path) -> Path:
    return home / "certs"


def tls_files(environ: Mapping[str, str] | None, role: Role) -> TlsFiles | None:
    """The identity `role` runs with: the three variables, else `$LORAPLEX_HOME/certs`.

    None only with LORAPLEX_INSECURE_PLAINTEXT=true. Without either, the service refuses to start.
    """
    env = Env(environ)
    if env.flag("INSECURE_PLAINTEXT", False):
        return None
    directory = certs_dir(loraplex_home(env))
    names = {"CA": "ca.crt", "CERT": f"{role.value}.crt", "KEY": f"{role.value}.key"}
    paths: dict[str, Path] = {}
    for key, default in names.items():
        raw = env.raw(f"TLS_{key}")
        path = Path(raw).expanduser() if raw else directory / default
        if not path.is_file():
            given = f"{PREFIX}TLS_{key}={raw}" if raw else f"no {PREFIX}TLS_{key}, and {path}"
            raise ConfigError(
                f"{given} is not a file: the {role.value} needs a certificate for mutual TLS; run "
                f"'loraplex certs init' (writes {directory}) or set {PREFIX}TLS_CA, {PREFIX}TLS_CERT and "
                f"{PREFIX}TLS_KEY; on a trusted network only, {PREFIX}INSECURE_PLAINTEXT=true turns TLS off"
            )
        paths[key] = path
    return TlsFiles(ca=paths["CA"], cert=paths["CERT"], key=paths["KEY"])


def client_ca(environ: Mapping[str, str] | None = None) -> Path | None:
    """The CA a tenant client (CLI, Python client) checks the router's certificate against.

    LORAPLEX_TLS_CA, else `$LORAPLEX_HOME/certs/ca.crt` when present; None: plaintext to the router.
    """
    env = Env(environ)
    raw = env.raw("TLS_CA")
    if raw:
        return Path(raw).expanduser()
    default = certs_dir(loraplex_home(env)) / "ca.crt"
    return default if default.is_file() else None


def warn_plaintext(service: str) -> None:
    log.warning(
        "%s runs WITHOUT TLS (%sINSECURE_PLAINTEXT=true): peers are not authenticated and any "
        "host that reaches its port can call it; use this on a trusted network only",
        service,
        PREFIX,
    )


# -- credentials ------------------------------------------------------------------------------


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """mTLS: a peer without a certificate from our CA fails the handshake."""
    ca, cert, key = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def public_server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """TLS without client certificates: the router's public endpoint, where tenants send API keys."""
    return grpc.ssl_server_credentials([((read_secret(key) + "\n").encode(), cert.read_bytes())])


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


Options = Sequence[tuple[str, int | str]]


def aio_channel(target: str, tls: TlsFiles | None, options: Options = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to another loraplex service, with this service's identity (None: plaintext)."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=list(options))


def sync_channel(target: str, tls: TlsFiles | None, options: Options = ()) -> grpc.Channel:
    """A blocking channel to another loraplex service, with this identity (None: plaintext)."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, channel_credentials(tls), options=list(options))


def ca_channel_credentials(ca: Path) -> grpc.ChannelCredentials:
    """Server-authenticated TLS (no client certificate): tenants to the router."""
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())


# -- addresses --------------------------------------------------------------------------------


def address_host(address: str) -> str:
    """'10.0.0.5:50052' -> '10.0.0.5'; '[::1]:50052' -> '::1'; 'worker-0.svc:50052' -> 'worker-0.svc'."""
    host = address.rpartition(":")[0] if ":" in address else address
    return host.removeprefix("[").removesuffix("]")


def host_matches(host: str, names: Sequence[str]) -> bool:
    """Is `host` (a DNS name or IP literal) one of a certificate's SAN entries?

    IPs compare as addresses (so '::1' equals '0:0:0:0:0:0:0:1'), names case-insensitively; a
    wildcard SAN '*.example' matches exactly one leftmost label, as in RFC 6125.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for name in names:
        if ip is not None:
            try:
                if ipaddress.ip_address(name) == ip:
                    return True
            except ValueError:
                continue
            continue
        pattern, wanted = name.lower().rstrip("."), host.lower().rstrip(".")
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted:
            label, _, rest = wanted.partition(".")
            if label and rest == pattern[2:]:
                return True
    return False
