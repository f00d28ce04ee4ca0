"""The exec readiness probe of the Kubernetes manifests: grpc.health.v1 over mutual TLS."""

from __future__ import annotations

import subprocess
import sys

from services.common.net import free_port
from services.common.tls import Role
from tests.fixtures.registry import RegistryProcess


def _probe(registry: RegistryProcess, target: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.common.probe", target],
        env={**registry.env, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_probe_passes_on_a_serving_mtls_service_and_fails_where_nothing_serves(
    registry: RegistryProcess,
) -> None:
    identity = registry.certs.env(Role.WORKER)  # a pod probes with its own certificate
    ok = _probe(registry, registry.target, **identity)
    assert ok.returncode == 0, ok.stderr
    assert "SERVING" in ok.stdout
    down = _probe(registry, f"127.0.0.1:{free_port()}", **identity)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
    # Plaintext against an mTLS port does not pass: the probe must speak TLS (why exec, not grpc:).
    plain = _probe(registry, registry.target, LORAPLEX_INSECURE_PLAINTEXT="true")
    assert plain.returncode == 1
